"""Memory estimate of one training process, printed before training starts.

Four parts, in bytes, for one device:

- parameters: the model in its training dtype (pure bf16 keeps an extra fp32 master copy of
  the whole model, as the trainer does; LoRA keeps the frozen base in ``lora.base_dtype``);
- gradients: one per trainable parameter (pure bf16: bf16 on the model plus fp32 on the
  master while the optimizer steps);
- optimizer: AdamW's two fp32 moments per trainable parameter;
- activations of one micro-batch: the tensors autograd saves for backward, counted tensor by
  tensor for tunelab's decoder layer (RMSNorm in fp32, SDPA, SwiGLU), the chunked loss
  (its fp32 ``[vocab, hidden]`` gradient buffer, the per-token hidden gradient and one fp32
  logits chunk, never full logits) and, with activation checkpointing, only each block's
  input plus one block recomputed in backward.

``total`` is the plain sum (gradients are counted whole although in backward they grow while
activations are freed, so it errs high). Framework overhead (CUDA context, allocator
fragmentation, compile workspaces, optimizer temporaries) is not included. Parameter,
gradient and optimizer bytes are exact for one process; activations are checked on CPU
against the tensors autograd really saves (``tests/unit/test_train_memory.py``); how close
the total is to ``torch.cuda.max_memory_allocated`` still has to be measured on a GPU.
Under FSDP / TP / PP the states are divided by the number of model shards and activations by
``tp`` (pipeline micro-batches in flight are not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.model.config import ModelConfig
from tunelab.model.loss import default_chunk_size

GIB = 2**30


@dataclass
class _Bytes:
    """Element sizes of one precision policy."""

    compute: int  # matmul outputs
    residual: int  # the residual stream and RMSNorm outputs
    cast_copies: bool  # autocast: a bf16 copy of each fp32 matmul input


def _policy(precision: str) -> _Bytes:
    if precision == "fp32":
        return _Bytes(4, 4, False)
    if precision == "bf16":
        return _Bytes(2, 2, False)
    if precision == "bf16-mixed":
        # fp32 weights and residual stream, bf16 matmuls (torch.autocast)
        return _Bytes(2, 4, True)
    raise ValueError(f"unknown precision {precision!r}; use fp32, bf16-mixed or bf16")


def lora_param_count(cfg: ModelConfig, r: int, targets: str | list[str] = "all-linear") -> int:
    """Adapter parameters of LoRA rank ``r`` on ``targets`` (leaf names or all-linear)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    names = list(shapes) if targets in ("all-linear", "all") else list(targets)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; known: {', '.join(shapes)}")
    return cfg.num_hidden_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def _layer_bytes_per_token(
    cfg: ModelConfig, p: _Bytes, dense_mask_seq: int, cuda: bool, lora: _LoraInfo | None
) -> float:
    """Saved-for-backward bytes of one decoder layer per token."""
    h, i, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    q, kv = heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    a, res = p.compute, p.residual
    # Two RMSNorms: the fp32 input (a copy unless already fp32), the normalized value before
    # the weight (only kept when the weight trains, i.e. not under LoRA), and the output.
    pre = 0 if lora is not None else res * h
    norms = 2 * (4 * h + pre + res * h + 4)
    if p.cast_copies:  # each consuming linear casts the fp32 norm output to bf16
        norms += 3 * 2 * h + 2 * 2 * h
    if cfg.qk_norm:
        norms += 2 * (4 + 2 * a) * (q + kv) // 2
    # RoPE tables are in the residual dtype, so under autocast the rotated q/k come out fp32
    # and SDPA saves its own bf16 copies.
    rope_q, rope_k = res * q, res * kv
    if p.cast_copies:
        rope_q, rope_k = rope_q + a * q, rope_k + a * kv
    v = a * kv
    if cuda and dense_mask_seq and cfg.num_key_value_heads != heads:
        # masked CUDA SDPA gets K/V repeated to all heads (keeps the efficient kernel)
        rope_k, v = rope_k + a * q, a * q
    attn = rope_q + rope_k + v + a * q + 4 * heads  # + output and fp32 logsumexp
    if dense_mask_seq and not cuda:
        attn += 4 * dense_mask_seq  # CPU SDPA turns the bool mask into a float one per layer
    mlp = 4 * a * i  # gate, up, silu(gate), product
    extra = 0.0
    if lora is not None:
        extra = lora.layer_bytes_per_token
    return norms + attn + mlp + extra


@dataclass
class _LoraInfo:
    layer_bytes_per_token: float


def estimate_memory(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_length: int,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    lora_params: int | None = None,
    lora_rank: int = 16,
    lora_base_dtype: str | None = None,
    packed: bool = True,
    device_type: str = "cuda",
    loss_chunk_size: int | None = None,
    model_shards: int = 1,
    tp: int = 1,
) -> dict[str, Any]:
    """Bytes per part for one process; see the module docstring.

    ``lora_params``: number of adapter parameters (None: full fine-tuning). ``packed``: rows
    carry ``position_ids`` (the trainer always passes them, which gives SDPA a dense
    ``[B, 1, S, S]`` mask). ``model_shards``: dp_shard x tp x pp (states are divided by it).
    """
    p = _policy(precision)
    b, s = int(micro_batch_size), int(seq_length)
    tokens = b * s
    n = cfg.num_params()
    lora = lora_params is not None
    trainable = int(lora_params) if lora else n
    # ---- states
    if precision == "bf16":  # bf16 model + fp32 master of everything (adapters included)
        total_p = n + (trainable if lora else 0)
        params = 2 * total_p + 4 * total_p
        grads = (2 + 4) * trainable
    elif lora:
        base = 2 if lora_base_dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
        params = base * n + 4 * trainable
        grads = 4 * trainable
    else:
        params = 4 * n
        grads = 4 * n
    optimizer = 8 * trainable
    shards = max(1, int(model_shards))
    params, grads, optimizer = params / shards, grads / shards, optimizer / shards
    # ---- activations of one micro-batch
    lora_info = None
    if lora:
        h, i = cfg.hidden_size, cfg.intermediate_size
        q = cfg.num_attention_heads * cfg.head_dim
        in_feats = 3 * h + q + 2 * h + i  # inputs of the 7 adapted linears of one layer
        # The adapter branch runs in fp32: an fp32 copy of each input when the compute dtype
        # is lower, and the rank-r intermediate.
        copy = 4 * in_feats if p.compute != 4 else 0
        lora_info = _LoraInfo(copy + 7 * 4 * lora_rank)
    cuda = device_type == "cuda"
    dense = s if packed else 0
    per_layer = _layer_bytes_per_token(cfg, p, dense, cuda, lora_info) * tokens
    L = cfg.num_hidden_layers
    if activation_checkpointing:
        # each block keeps its input; backward recomputes one block at a time
        layers = L * p.residual * cfg.hidden_size * tokens + per_layer
    else:
        layers = L * per_layer
    h, V = cfg.hidden_size, cfg.vocab_size
    rope = 2 * p.residual * cfg.head_dim * tokens  # cos / sin, shared by all layers
    final_norm = (4 + (0 if lora else p.residual)) * h * tokens
    chunk = int(loss_chunk_size or default_chunk_size(V))
    loss = (
        p.compute * h * tokens  # the hidden gradient per supervised token
        + 8 * tokens  # indices of supervised tokens
        + (0 if lora else 4 * V * h)  # fp32 output-head gradient (the head is frozen in LoRA)
        + 4 * min(chunk, tokens) * V  # one fp32 logits chunk (transient)
    )
    mask = tokens * s if (packed and cuda) else 0  # bool [B, 1, S, S], once
    chunk_logits = 4 * min(chunk, tokens) * V
    activations = (layers + rope + final_norm + loss + mask) / max(1, int(tp))
    total = params + grads + optimizer + activations
    return {
        "parameters": int(params),
        "gradients": int(grads),
        "optimizer": int(optimizer),
        "activations": int(activations),
        # parts of activations: the transient fp32 logits chunk of the loss and, with
        # checkpointing, the one block recomputed in backward
        "loss_chunk_logits": int(chunk_logits / max(1, int(tp))),
        "recompute_block": int(per_layer / max(1, int(tp))) if activation_checkpointing else 0,
        "total": int(total),
        "trainable_parameters": trainable,
        "parameters_count": n + (trainable if lora else 0),
        "micro_batch_size": b,
        "seq_length": s,
        "precision": precision,
        "activation_checkpointing": bool(activation_checkpointing),
    }


def summary(est: dict[str, Any]) -> str:
    """One line: ``memory estimate: 12.3 GiB = params 1.8 + grads 1.8 + ...``."""

    def g(key: str) -> str:
        return f"{est[key] / GIB:.2f}"

    ac = "on" if est["activation_checkpointing"] else "off"
    return (
        f"memory estimate per device: {g('total')} GiB = parameters {g('parameters')} + "
        f"gradients {g('gradients')} + optimizer {g('optimizer')} + activations "
        f"{g('activations')} (micro-batch {est['micro_batch_size']} x {est['seq_length']}, "
        f"{est['precision']}, activation checkpointing {ac}; framework overhead not included)"
    )
