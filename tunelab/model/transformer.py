"""The decoder: GQA attention with RoPE, SwiGLU MLP, RMSNorm, for Llama/Qwen2/Qwen3/Mistral.

Module and parameter names equal Hugging Face's (``model.embed_tokens``,
``model.layers["i"].self_attn.q_proj``, ..., ``model.norm``, ``lm_head``), so an HF state dict
loads with a dtype cast only. ``model.layers`` is an ``nn.ModuleDict`` keyed ``"0".."L-1"``:
a pipeline stage deletes the layers it does not own and keeps global names. Each layer is a
self-contained module (activation checkpointing and ``torch.compile`` wrap it as a unit).

The numerics follow transformers exactly (RMSNorm in fp32 then cast, rotary tables in fp32
then cast, rotate-half RoPE), which is what the parity tests check.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.model.attention import AttentionMask, attend, build_attention_mask, check_backend
from tunelab.model.config import ModelConfig
from tunelab.model.kv_cache import KVCache
from tunelab.model.loss import linear_cross_entropy, shift_labels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] in fp32, with linear / llama3 scaling."""
    dim = cfg.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponent)
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    if sc["rope_type"] == "linear":
        return inv_freq / sc["factor"]
    # llama3: long wavelengths are divided by ``factor``, short ones kept, the band between
    # interpolated smoothly.
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    low_freq_wavelen = old_len / lo
    high_freq_wavelen = old_len / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    cfg: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, S, head_dim] for ``position_ids`` [B, S], computed in fp32."""
    inv_freq = rope_inv_freq(cfg, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [B, S, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, q, kv = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        )
        self.q_proj = nn.Linear(h, q, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        # Heads are inferred (-1) so tensor parallelism can shard the projections.
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm block; the unit for activation checkpointing, compile and FSDP."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderBody(nn.Module):
    """HF's ``model.`` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LMHead(nn.Linear):
    """The output projection. ``forward(h, targets)`` computes the chunked loss *inside* the
    module call, so wrappers that act on module calls (FSDP2 unshard hooks) see the weight."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, chunk_size=None):
        if targets is None:
            return super().forward(x)
        if self.bias is not None:
            raise NotImplementedError("chunked loss with an lm_head bias")
        return linear_cross_entropy(x, self.weight, targets, chunk_size=chunk_size)


class Transformer(nn.Module):
    """Decoder-only LM. See module docstring for names; ``forward`` for the call contract."""

    def __init__(self, cfg: ModelConfig, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = cfg
        self.attn_backend = check_backend(attn_backend)
        # Tokens per chunk in the loss; None picks ~256 MiB of fp32 logits per chunk.
        self.loss_chunk_size: int | None = None
        self.model = DecoderBody(cfg)
        self.lm_head: LMHead | None = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``model.embed_tokens.weight`` when the config ties them.
        Call again after anything that replaces parameters (e.g. ``to_empty``)."""
        if (
            self.config.tie_word_embeddings
            and self.lm_head is not None
            and self.model.embed_tokens is not None
        ):
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attn_backend(self, backend: str) -> None:
        self.attn_backend = check_backend(backend)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        labels: torch.Tensor | None = None,
    ):
        """Run the decoder.

        ``input_ids`` [B, S] token ids, or hidden states [B, S, H] when ``model.embed_tokens``
        is None (a later pipeline stage). ``position_ids`` [B, S] restart at 0 for each packed
        document (attention never crosses documents); None means ``arange(S)`` per row (or the
        continuation of ``cache``). Returns logits [B, S, V] in the model dtype, or hidden
        states when ``return_hidden`` (final-normed) or when ``lm_head`` / ``model.norm`` are
        None (a stage before the last). With ``labels`` (unshifted, -100 ignored) it returns
        ``(loss_sum, num_tokens)`` instead, see :meth:`loss`.
        """
        body = self.model
        h = body.embed_tokens(input_ids) if body.embed_tokens is not None else input_ids
        b, s = h.shape[0], h.shape[1]
        if cache is not None:
            if position_ids is None:
                position_ids = cache.default_position_ids(b, s)
            window = self.config.sliding_window
            if window is not None and cache.max_seq_len > window:
                mask = cache.attention_mask(s, window=window)
            else:
                mask = cache.attention_mask(s)
        else:
            mask = build_attention_mask(
                self.attn_backend, position_ids, b, s, h.device, self.config.sliding_window
            )
            if position_ids is None:
                position_ids = torch.arange(s, device=h.device).expand(b, s)
        cos, sin = rope_cos_sin(self.config, position_ids, h.dtype)
        for layer in body.layers.values():
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(s)
        if body.norm is None:
            return h
        h = body.norm(h)
        if labels is not None and self.lm_head is not None:
            # Without lm_head (a pipeline stage before the last) labels are ignored.
            targets = shift_labels(labels, position_ids if cache is None else None)
            return self.lm_head(h, targets, chunk_size=self.loss_chunk_size)
        if return_hidden or self.lm_head is None:
            return h
        return self.lm_head(h)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy and the number of supervised tokens.

        ``labels`` [B, S] are aligned with ``input_ids`` (not shifted; -100 = ignore); the
        target of position t is ``labels[t + 1]`` unless position t + 1 starts a new document.
        Full-vocabulary logits are never materialized (chunked linear + CE). Returns
        ``(loss_sum fp32 scalar, num_tokens int64 scalar)``; divide by the global token count.
        Goes through ``__call__`` so module hooks (FSDP, compile wrappers) apply.
        """
        return self(input_ids, position_ids, labels=labels)
