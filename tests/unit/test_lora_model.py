"""LoRA on tunelab's Transformer: parity with ``peft`` on the ``transformers`` model both ways,
merged = base + adapter (dtype kept), and training moves only the adapters."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.lora import IDS, peft_adapter_dir, peft_logits, randomize_tunelab_lora
from tests.helpers.tiny_models import save_tiny_hf_model, tiny_hf_model
from tunelab.model.hf import load_model
from tunelab.model.lora import (
    LoraSpec,
    apply_lora,
    load_peft_adapter,
    lora_layers,
    merge_adapter_into_state_dict,
    merge_lora,
    save_peft_adapter,
)

ALL = "linear_qkv linear_proj linear_fc1 linear_fc2"


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    return {
        fam: save_tiny_hf_model(tmp_path_factory.mktemp(fam), fam)
        for fam in ("qwen2", "llama3", "qwen3")
    }


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).float()


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen3"])
def test_tunelab_adapter_in_peft_gives_same_logits(tmp_path, base_dirs, family, tiny_tokenizer_dir):
    model = load_model(base_dirs[family], dtype=torch.float32)
    base = _logits(model)
    spec = LoraSpec(r=4, alpha=8, target_modules=ALL)
    apply_lora(model, spec)
    randomize_tunelab_lora(model, seed=2)
    ours = _logits(model)
    assert (ours - base).abs().max() > 1e-2
    save_peft_adapter(
        model, spec, tmp_path / "adapter", str(base_dirs[family]), tokenizer_dir=tiny_tokenizer_dir
    )
    assert (tmp_path / "adapter" / "chat_template.jinja").is_file()
    theirs = peft_logits(tiny_hf_model(family), tmp_path / "adapter")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen3"])
def test_peft_adapter_in_tunelab_gives_same_logits(tmp_path, base_dirs, family):
    adapter = peft_adapter_dir(
        tmp_path / "p", family, target_modules="all-linear", lora_alpha=16, use_rslora=True
    )
    theirs = peft_logits(tiny_hf_model(family), adapter)
    model = load_model(base_dirs[family], dtype=torch.float32)
    load_peft_adapter(model, adapter)
    assert len(lora_layers(model)) == 14
    torch.testing.assert_close(_logits(model), theirs, rtol=0, atol=2e-5)


def test_merge_equals_base_plus_adapter(tmp_path, base_dirs):
    model = load_model(base_dirs["qwen2"], dtype=torch.float32)
    spec = LoraSpec(r=4, alpha=8, target_modules="all-linear")
    apply_lora(model, spec)
    randomize_tunelab_lora(model, seed=4)
    with_adapter = _logits(model)
    save_peft_adapter(model, spec, tmp_path / "a")
    merged = merge_lora(model)
    assert len(merged) == 14 and not lora_layers(model)
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(_logits(model), with_adapter, rtol=0, atol=1e-5)
    # merging the saved adapter into the plain state dict gives the same weights
    fresh = load_model(base_dirs["qwen2"], dtype=torch.float32).state_dict()
    by_sd = merge_adapter_into_state_dict(fresh, tmp_path / "a")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(by_sd[k], v, rtol=0, atol=1e-6)


def test_merge_keeps_bf16_base_dtype(tmp_path, base_dirs):
    model = load_model(base_dirs["qwen2"], dtype=torch.bfloat16)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=ALL))  # adapters fp32
    randomize_tunelab_lora(model, seed=6)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    with_adapter = _logits(model)
    assert model(IDS).dtype == torch.bfloat16
    merge_lora(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # only the bf16 rounding of the merged weights separates the two
    assert (_logits(model) - with_adapter).abs().max() < 3e-2


@pytest.mark.parametrize("base_dtype", [None, torch.bfloat16])
def test_training_changes_only_adapters(base_dirs, base_dtype):
    torch.manual_seed(0)
    model = load_model(base_dirs["llama3"], dtype=torch.float32)
    apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=ALL),
               base_dtype=base_dtype)  # fmt: skip
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(lora_before) == 28
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss_sum, num = model.loss(ids, ids)
        loss = loss_sum / num
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"base parameter {n} changed"
            assert p.grad is None
        else:
            assert not torch.equal(p, lora_before[n]), f"adapter {n} did not train"
