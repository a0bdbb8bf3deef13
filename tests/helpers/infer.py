"""Tiny models and adapters for inference tests (oracle side: transformers + peft)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_models import save_tiny_hf_model

# Families and init scales whose greedy continuations are varied (not one repeated token), so
# token-for-token comparisons mean something.
LIVELY = {
    "qwen2_untied": dict(initializer_range=0.02),
    "llama3": dict(initializer_range=0.3),
}


def lively_model_dir(out_dir: Path, family: str, tokenizer_dir: Path) -> Path:
    return save_tiny_hf_model(out_dir, family, tokenizer_dir=tokenizer_dir, **LIVELY[family])


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
    """`transformers` generate on a left-padded batch; returns new tokens per row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad_id,
    )
    return out[:, width:].tolist()


def make_peft_adapter(hf_dir: Path, out_dir: Path, seed: int = 0):
    """A peft LoRA adapter with random (nonzero) A and B on q/v/o/gate; returns the peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    cfg = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
        init_lora_weights=False,  # B is random too, so the adapter changes the outputs
        lora_dropout=0.0,
    )
    model = get_peft_model(base, cfg).eval()
    model.save_pretrained(str(out_dir))
    return model
