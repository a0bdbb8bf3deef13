"""The `args` Namespace of Megatron checkpoint files <-> tunelab's ModelConfig."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from tunelab.convert import layout as L
from tunelab.errors import CheckpointError, ConfigError
from tunelab.model.config import ModelConfig

log = logging.getLogger(__name__)

# MindSpeed --model-type-hf names -> HF model_type (used only when no config.json is at hand).
MODEL_TYPE_HF = {
    "llama2": "llama",
    "llama3": "llama",
    "llama": "llama",
    "mistral": "mistral",
    "magistral": "mistral",
    "qwen2": "qwen2",
    "qwen25": "qwen2",
    "qwen3": "qwen3",
}


def dims_from_config(cfg: ModelConfig) -> L.ModelDims:
    if cfg.o_bias or cfg.mlp_bias:
        raise ConfigError(
            "the model has biases on o_proj or the MLP (attention_bias / mlp_bias); Megatron "
            "mcore conversion supports bias on q/k/v only (--add-qkv-bias)"
        )
    return L.ModelDims(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        tie_embeddings=cfg.tie_word_embeddings,
        qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm,
    )


def padded_vocab_size(vocab: int, tp: int, divisible_by: int | None) -> int:
    """Megatron's _vocab_size_with_padding: round up to a multiple of divisible_by x TP."""
    if not divisible_by:
        return vocab
    if divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by {divisible_by}: must be >= 1")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def megatron_args(cfg: ModelConfig, lay: L.ParallelLayout, te: bool, dtype: torch.dtype | None,
                  model_type_hf: str | None, padded_vocab: int | None = None
                  ) -> argparse.Namespace:  # fmt: skip
    """The `args` Namespace stored in every file: Megatron's own names for the architecture
    (what Megatron checks on load) plus ``hf_config`` so mcore -> HF needs no other input."""
    dtype = dtype or torch.float32
    scaling = cfg.rope_scaling or {}
    return argparse.Namespace(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_key_value_heads != cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings,
        padded_vocab_size=padded_vocab or cfg.vocab_size,
        vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=1,
        normalization="RMSNorm",
        norm_epsilon=cfg.rms_norm_eps,
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=cfg.rope_theta,
        use_rope_scaling=scaling.get("rope_type") == "llama3",
        rope_scaling_factor=scaling.get("factor", 1.0),
        add_qkv_bias=cfg.qkv_bias,
        add_bias_linear=False,
        disable_bias_linear=True,
        qk_layernorm=cfg.qk_norm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=(len(lay.chunks[0][0]) if lay.vpp > 1 else None),
        num_layer_list=",".join(str(len(s[0])) for s in lay.chunks) if lay.vpp == 1 else None,
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        use_mcore_models=True,
        transformer_impl="transformer_engine" if te else "local",
        model_type_hf=model_type_hf,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        hf_config=cfg.to_hf_dict(),
    )


def config_from_megatron_args(args, model_type_hf: str | None, where: Path) -> ModelConfig:
    """An HF config dict from a checkpoint's `args` (ours carry it whole as ``hf_config``)."""
    hf = getattr(args, "hf_config", None)
    if isinstance(hf, dict):
        return ModelConfig.from_hf(hf)
    if args is None or not hasattr(args, "num_layers"):
        raise CheckpointError(
            f"{where}: the checkpoint's args do not describe the model; pass --hf-config-dir "
            "(or --save-dir) pointing at the original Hugging Face directory"
        )
    mt = MODEL_TYPE_HF.get(model_type_hf or "")
    if mt is None:
        mt = (
            "qwen3"
            if getattr(args, "qk_layernorm", False)
            else ("qwen2" if getattr(args, "add_qkv_bias", False) else "llama")
        )
        log.warning("%s: no --model-type-hf; reading the checkpoint as model_type %s", where, mt)
    heads = int(args.num_attention_heads)
    raw = {
        "model_type": mt,
        "num_hidden_layers": int(args.num_layers),
        "hidden_size": int(args.hidden_size),
        "intermediate_size": int(args.ffn_hidden_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(
            args.num_query_groups if getattr(args, "group_query_attention", False) else heads
        ),
        "head_dim": int(getattr(args, "kv_channels", None) or args.hidden_size // heads),
        "vocab_size": int(getattr(args, "padded_vocab_size", None) or args.vocab_size),
        "max_position_embeddings": int(getattr(args, "max_position_embeddings", 4096) or 4096),
        "rms_norm_eps": float(getattr(args, "norm_epsilon", 1e-6)),
        "rope_theta": float(getattr(args, "rotary_base", 10000)),
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
    }
    if mt == "llama" and getattr(args, "add_qkv_bias", False):
        raise CheckpointError(
            f"{where}: qkv bias without o_proj bias has no Llama equivalent; pass "
            "--model-type-hf qwen25 or --hf-config-dir"
        )
    return ModelConfig.from_hf(raw)
