"""Helpers for LoRA tests: non-zero adapters (a fresh B is zero, which would hide bugs) and
adapters made by the real ``peft`` library."""

from __future__ import annotations

from pathlib import Path

import torch

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def randomize_tunelab_lora(model, seed: int = 1, std: float = 0.05) -> None:
    """Give every tunelab LoRA layer random A and B, so the adapter changes the outputs."""
    from tunelab.model.lora import lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for w in (layer.lora_A.weight, layer.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * std)


def peft_adapter_dir(
    out_dir: str | Path,
    family: str = "qwen2",
    seed: int = 0,
    adapter_seed: int = 3,
    **lora_kwargs,
) -> Path:
    """Save an adapter made by ``peft`` on the tiny transformers model, with random (non-zero)
    A and B; ``lora_kwargs`` go to ``peft.LoraConfig``."""
    from peft import LoraConfig, get_peft_model

    from tests.helpers.tiny_models import tiny_hf_model

    base = tiny_hf_model(family, seed=seed)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(base, LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(adapter_seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def peft_logits(hf_model, adapter_dir, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Logits of ``hf_model`` with the adapter at ``adapter_dir`` loaded by ``peft``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def hf_logits(hf_model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids, use_cache=False).logits
