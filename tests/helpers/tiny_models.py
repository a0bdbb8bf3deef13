"""Tiny random Hugging Face models of each supported family, saved as HF directories.

Used as the oracle side of parity tests and as inputs for every command. Vocab 512 matches
the tiny tokenizer fixture, so a tokenizer directory can be copied next to the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=0,
)

# family -> (model_type, overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama2": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3": (
        "llama",
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=None)),
}


def tiny_hf_config(family: str = "qwen2", **overrides):
    """A `transformers` config object for ``family`` with tiny shapes."""
    from transformers import AutoConfig

    model_type, fam = FAMILIES[family]
    kwargs = {**_BASE, **fam, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_hf_model(family: str = "qwen2", seed: int = 0, **overrides):
    """A random-init `transformers` causal LM (fp32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random (not zero) norm weights and biases so parity tests exercise every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


def save_tiny_hf_model(
    out_dir: str | Path,
    family: str = "qwen2",
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    dtype=None,
    **overrides,
) -> Path:
    """Save a tiny random model (and optionally a tokenizer) as an HF directory."""
    out_dir = Path(out_dir)
    model = tiny_hf_model(family, seed=seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out_dir / f.name)
    return out_dir
