"""PEFT adapter files: what tunelab writes, ``peft`` loads (and the reverse), checked on the
tiny transformers model with tunelab's LoRA layers injected (names are the same as in
tunelab's Transformer; the Transformer itself is covered in test_lora_model.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.lora import hf_logits, peft_adapter_dir, peft_logits, randomize_tunelab_lora
from tests.helpers.tiny_models import tiny_hf_model
from tunelab.errors import CheckpointError
from tunelab.model.lora import (
    LoraAdapter,
    LoraSpec,
    apply_lora,
    load_peft_adapter,
    lora_layers,
    lora_state_dict,
    merge_adapter_into_state_dict,
    save_peft_adapter,
)


def test_saved_adapter_files_and_peft_parity(tmp_path):
    model = tiny_hf_model("qwen2")
    spec = LoraSpec(r=4, alpha=8, target_modules="linear_qkv linear_fc2")
    apply_lora(model, spec)
    randomize_tunelab_lora(model)
    ours = hf_logits(model)
    save_peft_adapter(model, spec, tmp_path / "a", "tiny-qwen2")

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "tiny-qwen2"
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 4

    base_only = hf_logits(tiny_hf_model("qwen2"))
    assert (ours - base_only).abs().max() > 1e-2  # the adapter matters
    theirs = peft_logits(tiny_hf_model("qwen2"), tmp_path / "a")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_partial_regex_targets_round_trip_through_peft(tmp_path):
    # Only layer 1's o_proj: the saved target_modules must not widen to every o_proj.
    model = tiny_hf_model("llama2")
    spec = LoraSpec(r=2, alpha=4, target_modules=r"model\.layers\.1\.self_attn\.o_proj")
    apply_lora(model, spec)
    randomize_tunelab_lora(model)
    save_peft_adapter(model, spec, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)
    torch.testing.assert_close(
        peft_logits(tiny_hf_model("llama2"), tmp_path / "a"), hf_logits(model), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        # rsLoRA, a per-module rank and alpha, and peft's own all-linear
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules="all-linear",
            rank_pattern={"down_proj": 2},
            alpha_pattern={"o_proj": 3},
        ),  # fmt: skip
    ],
)
def test_peft_adapter_loads_into_tunelab(tmp_path, lora_kwargs):
    adapter = peft_adapter_dir(tmp_path / "p", "qwen2", **lora_kwargs)
    theirs = peft_logits(tiny_hf_model("qwen2"), adapter)
    model = tiny_hf_model("qwen2")
    spec = load_peft_adapter(model, adapter)
    assert spec.r == 4
    torch.testing.assert_close(hf_logits(model), theirs, rtol=0, atol=1e-5)
    # re-saved by tunelab, peft still agrees (per-module ranks / alphas survive)
    save_peft_adapter(model, spec, tmp_path / "again")
    torch.testing.assert_close(
        peft_logits(tiny_hf_model("qwen2"), tmp_path / "again"), theirs, rtol=0, atol=1e-5
    )


def test_load_into_model_with_lora_already_applied(tmp_path):
    src = tiny_hf_model("qwen2")
    spec = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(src, spec)
    randomize_tunelab_lora(src, seed=5)
    save_peft_adapter(src, spec, tmp_path / "a")

    dst = tiny_hf_model("qwen2")
    apply_lora(dst, spec)
    load_peft_adapter(dst, tmp_path / "a")
    for k, v in lora_state_dict(src).items():
        assert torch.equal(lora_state_dict(dst)[k], v)

    wrong_rank = tiny_hf_model("qwen2")
    apply_lora(wrong_rank, LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_A\.weight has shape \(4, 64\)"):
        load_peft_adapter(wrong_rank, tmp_path / "a")

    wrong_targets = tiny_hf_model("qwen2")
    apply_lora(wrong_targets, LoraSpec(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match=r"v_proj\.lora_A\.weight has no LoRA layer"):
        load_peft_adapter(wrong_targets, tmp_path / "a")


def test_load_errors_name_the_key(tmp_path):
    adapter = peft_adapter_dir(tmp_path / "p", "qwen2")
    # an adapter for another model: shapes differ
    other = tiny_hf_model("qwen2", hidden_size=32, intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_A\.weight has shape"):
        load_peft_adapter(other, adapter)
    # a key naming a module the model lacks
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\.self_attn\.q_proj"):
        load_peft_adapter(tiny_hf_model("qwen2"), adapter)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_peft_adapter(tiny_hf_model("qwen2"), tmp_path)


def test_dora_and_modules_to_save_are_refused(tmp_path):
    adapter = peft_adapter_dir(tmp_path / "p", "qwen2")
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        LoraAdapter.load(adapter)
    cfg_path.write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(CheckpointError, match="modules_to_save"):
        LoraAdapter.load(adapter)


def test_merge_into_state_dict_matches_peft_merge(tmp_path):
    adapter = peft_adapter_dir(tmp_path / "p", "qwen2", target_modules=["q_proj", "down_proj"])
    from peft import PeftModel

    merged_by_peft = PeftModel.from_pretrained(tiny_hf_model("qwen2"), str(adapter))
    merged_by_peft = merged_by_peft.merge_and_unload().state_dict()
    base = tiny_hf_model("qwen2").state_dict()
    seen: set[str] = set()
    ours = merge_adapter_into_state_dict(base, adapter, merged=seen)
    assert len(seen) == 4
    for k, v in ours.items():
        torch.testing.assert_close(v, merged_by_peft[k], rtol=0, atol=1e-6)
    # one shard at a time: only what the shard holds is merged; dtype is kept
    shard = {k: v.to(torch.bfloat16) for k, v in base.items() if ".layers.1." in k}
    seen = set()
    out = merge_adapter_into_state_dict(shard, adapter, merged=seen)
    assert seen == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert all(v.dtype == torch.bfloat16 for v in out.values()) and set(out) == set(shard)
    bad = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 63)}
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        merge_adapter_into_state_dict(bad, adapter)
    quantized = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64, dtype=torch.int8)}
    with pytest.raises(CheckpointError, match="quantized"):
        merge_adapter_into_state_dict(quantized, adapter)


def test_lora_layers_listed(tmp_path):
    model = tiny_hf_model("qwen2")
    apply_lora(model, LoraSpec(target_modules=["o_proj"]))
    assert list(lora_layers(model)) == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]


def test_wrapper_prefixes_do_not_leak_into_adapter_keys(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_hf_model("qwen2")
    spec = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, spec)
    randomize_tunelab_lora(model)
    expected = hf_logits(model)
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in lora_state_dict(model)
    save_peft_adapter(model, spec, tmp_path / "a")
    assert cfg_targets(tmp_path / "a") == ["q_proj", "v_proj"]
    torch.testing.assert_close(
        peft_logits(tiny_hf_model("qwen2"), tmp_path / "a"), expected, rtol=0, atol=1e-5
    )
    # loading back into the wrapped model finds the layers by their plain names
    load_peft_adapter(model, tmp_path / "a")


def cfg_targets(adapter_dir):
    return json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]
