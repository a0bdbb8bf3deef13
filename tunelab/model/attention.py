"""Causal GQA attention backends with document masking derived from ``position_ids``.

Packed rows hold several documents; each document's positions restart at 0, so a token may
attend to an earlier token only when no position 0 lies between them (inclusive of the key's
own start). All backends implement exactly that rule and give the same outputs:

- ``sdpa``  : ``F.scaled_dot_product_attention`` with a boolean block-diagonal causal mask
              (CPU and GPU; the default). Without ``position_ids`` it uses ``is_causal``.
- ``flex``  : ``flex_attention`` with a document ``BlockMask`` (compiled on GPU; on CPU PyTorch
              has no backward, so it is forward-only there).
- ``flash`` : ``flash_attn_varlen_func`` over cumulative document lengths (needs the
              ``flash-attn`` package, CUDA and fp16/bf16).

The mask is built once per model forward by :func:`build_attention_mask` and shared by all
layers; :func:`attend` runs one layer's attention. Tensors are ``[B, H, S, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.errors import ConfigError

BACKENDS = ("sdpa", "flex", "flash")
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what flash-attn kernels accept


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    if name == "flash" and not flash_available():
        raise ConfigError(
            "attention backend 'flash' needs the flash-attn package (pip install flash-attn) "
            "and a CUDA GPU; use 'sdpa' or 'flex' instead"
        )
    return name


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] int: a new document starts wherever the position is 0."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


@dataclass
class AttentionMask:
    """What one backend needs to mask a forward pass (built once, shared by all layers)."""

    backend: str
    dense: torch.Tensor | None = None  # sdpa: bool [B, 1, S, T], True = may attend
    causal: bool = False  # sdpa: plain causal, no dense mask
    block_mask: Any = None  # flex
    cu_seqlens: torch.Tensor | None = None  # flash
    max_seqlen: int = 0  # flash
    window: int | None = None  # flash: sliding window (the other backends bake it into the mask)


def build_attention_mask(
    backend: str,
    position_ids: torch.Tensor | None,
    batch: int,
    seq_len: int,
    device,
    window: int | None = None,
) -> AttentionMask:
    """Mask for a training / prefill forward without KV cache. ``window``: sliding window
    (a query sees at most ``window`` keys, itself included), None for full causal attention."""
    if window is not None and window >= seq_len:
        window = None  # cannot bind: keep the cheaper full-causal paths
    if backend == "sdpa":
        if position_ids is None and window is None:
            return AttentionMask("sdpa", causal=True)
        idx = torch.arange(seq_len, device=device)
        allowed = idx[None, :] <= idx[:, None]
        if window is not None:
            allowed = allowed & (idx[:, None] - idx[None, :] < window)
        if position_ids is None:
            return AttentionMask("sdpa", dense=allowed[None, None])
        doc = document_ids(position_ids)
        same = doc[:, :, None] == doc[:, None, :]
        return AttentionMask("sdpa", dense=(same & allowed)[:, None])
    if backend == "flex":
        block_mask = _flex_block_mask(position_ids, batch, seq_len, device, window)
        return AttentionMask("flex", block_mask=block_mask)
    if backend == "flash":
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device).expand(batch, seq_len)
        starts = position_ids == 0
        starts[:, 0] = True  # every row starts a sequence even mid-document
        idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten().to(torch.int32)
        total = torch.tensor([batch * seq_len], dtype=torch.int32, device=device)
        cu = torch.cat([idx, total])
        max_len = int((cu[1:] - cu[:-1]).max().item())
        return AttentionMask("flash", cu_seqlens=cu, max_seqlen=max_len, window=window)
    raise ConfigError(f"unknown attention backend {backend!r}")


_compiled_block_mask = None


def _create_block_mask(*args, device):
    """``create_block_mask``, compiled on GPU (eager evaluates the mask on every q/k pair)."""
    global _compiled_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    if torch.device(device).type != "cuda":
        return create_block_mask(*args, device=device)
    if _compiled_block_mask is None:
        _compiled_block_mask = torch.compile(create_block_mask)
    return _compiled_block_mask(*args, device=device)


def _flex_block_mask(position_ids, batch: int, seq_len: int, device, window: int | None = None):
    w = seq_len if window is None else window

    if position_ids is None:

        def mask_mod(b, h, q, k):
            return (q >= k) & (q - k < w)

        return _create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)
    doc = document_ids(position_ids)

    def doc_mask_mod(b, h, q, k):
        return (q >= k) & (q - k < w) & (doc[b, q] == doc[b, k])

    return _create_block_mask(doc_mask_mod, batch, None, seq_len, seq_len, device=device)


_compiled_flex = None


def _flex_attention():
    """``flex_attention`` compiled on GPU (eager flex materializes the full score matrix)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, h_kv, s, d = x.shape
    return x[:, :, None].expand(b, h_kv, heads // h_kv, s, d).reshape(b, heads, s, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention, GQA (k/v have fewer heads). In/out ``[B, H, S, D]``."""
    gqa = q.shape[1] != k.shape[1]
    if mask.backend == "sdpa":
        if mask.dense is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, enable_gqa=gqa)
        if gqa and q.is_cuda:
            # With an explicit mask, CUDA SDPA supports GQA only in its quadratic-memory math
            # kernel; repeating K/V heads keeps the memory-efficient kernel eligible.
            k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
    if mask.backend == "flex":
        if not q.is_cuda and q.requires_grad and torch.is_grad_enabled():
            raise ConfigError(
                "attention backend 'flex' has no backward pass on CPU in PyTorch; train with "
                "attn_backend='sdpa' on CPU (flex works for CPU inference only)"
            )
        return _flex_attention()(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    if mask.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        if q.dtype not in FLASH_DTYPES:
            raise ConfigError(
                f"attention backend 'flash' needs bf16 or fp16, the model is {q.dtype}; load "
                "with dtype='bf16' or use attn_backend='sdpa' / 'flex'"
            )

        b, h, s, d = q.shape
        qf = q.transpose(1, 2).reshape(b * s, h, d)
        kf = k.transpose(1, 2).reshape(b * s, k.shape[1], d)
        vf = v.transpose(1, 2).reshape(b * s, v.shape[1], d)
        out = flash_attn_varlen_func(
            qf, kf, vf, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
            causal=True,
            window_size=(-1, -1) if mask.window is None else (mask.window - 1, 0),
        )  # fmt: skip
        return out.reshape(b, s, h, d).transpose(1, 2)
    raise ConfigError(f"unknown attention backend {mask.backend!r}")
