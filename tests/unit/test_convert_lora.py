"""LoRA merged during conversion: a PEFT adapter (equals `tunelab merge-lora` and peft's
merge_and_unload) and a MindSpeed LoRA checkpoint in Megatron layout, built by hand from the
reference (section 5) and checked against peft's merge of the same update."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.helpers.lora import peft_adapter_dir
from tests.helpers.tiny_models import save_tiny_hf_model, tiny_hf_model
from tunelab.cli import main as cli_main
from tunelab.convert.megatron import ConvertOptions, convert
from tunelab.errors import ConfigError
from tunelab.model.hf import load_hf_state_dict

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_merged(family: str, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_hf_model(family), str(adapter))
    return {k: v for k, v in model.merge_and_unload().state_dict().items()}


def test_peft_adapter_merge_equals_merge_lora(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2_untied")
    adapter = peft_adapter_dir(tmp_path / "ad", "qwen2_untied", target_modules=ALL)
    assert cli_main(["merge-lora", "--base", str(hf), "--adapter", str(adapter),
                     "--out", str(tmp_path / "merged")]) == 0  # fmt: skip
    merged = load_hf_state_dict(tmp_path / "merged")
    # merge on the way in (HF -> mcore TP2 PP2), then back
    assert cli_main(["convert", "--load-model-type", "hf", "--save-model-type", "mg",
                     "--load-dir", str(hf), "--save-dir", str(tmp_path / "mg"),
                     "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                     "--lora-load", str(adapter), "--no-progress"]) == 0  # fmt: skip
    back = convert(ConvertOptions("mg", "hf", tmp_path / "mg", save_hf_dir=tmp_path / "b1",
                                  progress=False))  # fmt: skip
    # merge on the way out (plain mcore -> HF with the adapter)
    convert(ConvertOptions("hf", "mg", hf, tmp_path / "plain", tp=2, progress=False))
    back2 = convert(ConvertOptions("mg", "hf", tmp_path / "plain", save_hf_dir=tmp_path / "b2",
                                   lora_load=adapter, progress=False))  # fmt: skip
    oracle = _peft_merged("qwen2_untied", adapter)
    for out in (back, back2):
        got = load_hf_state_dict(out)
        assert got.keys() == merged.keys()
        for k in merged:
            assert torch.equal(got[k], merged[k]), k
            torch.testing.assert_close(got[k], oracle[k], rtol=0, atol=1e-6)
    base = load_hf_state_dict(hf)
    assert not torch.equal(merged["model.layers.1.mlp.down_proj.weight"],
                           base["model.layers.1.mlp.down_proj.weight"])  # fmt: skip
    with pytest.raises(ConfigError, match="--lora-r 8"):
        convert(ConvertOptions("hf", "mg", hf, tmp_path / "x", lora_load=adapter, lora_r=8,
                               progress=False))  # fmt: skip


def _ms_lora_case(tmp_path: Path):
    """Base mcore TP2 checkpoint of a tiny Qwen2 (4 heads, 2 groups, head_dim 16, hidden 64,
    ffn 128), a MindSpeed LoRA checkpoint for it written by hand, and the equivalent per-HF-
    module peft adapter (q/k/v share linear_qkv's A, gate/up share linear_fc1's A)."""
    from peft import LoraConfig, get_peft_model

    r, alpha, tp = 4, 8.0, 2
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2")
    base_mg = convert(ConvertOptions("hf", "mg", hf, tmp_path / "base", tp=tp, progress=False))
    # MindSpeed's own LoRA-trained base carries peft's base_layer names; read them too
    for t in range(tp):
        path = base_mg / "iter_0000001" / f"mp_rank_{t:02d}" / "model_optim_rng.pt"
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, weights_only=True)
        obj["model"] = {
            k.replace("linear_qkv.weight", "linear_qkv.base_layer.weight"): v
            for k, v in obj["model"].items()
        }
        torch.save(obj, path)

    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    peft_model = get_peft_model(
        tiny_hf_model("qwen2"), LoraConfig(r=r, lora_alpha=alpha, target_modules=ALL)
    )
    params = dict(peft_model.named_parameters())
    files = [{} for _ in range(tp)]
    for layer in range(2):
        a_qkv, a_o, a_f, a_d = rnd(r, 64), rnd(r, 64), rnd(r, 64), rnd(r, 128)
        b = {n: rnd(rows, r) for n, rows in
             (("q", 64), ("k", 32), ("v", 32), ("o", 64), ("gate", 128), ("up", 128), ("down", 64))}  # fmt: skip
        hp = f"base_model.model.model.layers.{layer}."
        with torch.no_grad():
            for n, a in (("self_attn.q_proj", a_qkv), ("self_attn.k_proj", a_qkv),
                         ("self_attn.v_proj", a_qkv), ("self_attn.o_proj", a_o),
                         ("mlp.gate_proj", a_f), ("mlp.up_proj", a_f), ("mlp.down_proj", a_d)):  # fmt: skip
                short = n.split(".")[1].removesuffix("_proj")
                params[f"{hp}{n}.lora_A.default.weight"].copy_(a)
                params[f"{hp}{n}.lora_B.default.weight"].copy_(b[short])
        pre = f"decoder.layers.{layer}."
        for t in range(tp):
            f = files[t]
            # column parallel: full A, B rows of this rank (one query group per rank)
            f[pre + "self_attention.linear_qkv.lora_A.default.weight"] = a_qkv
            f[pre + "self_attention.linear_qkv.lora_B.default.weight"] = torch.cat(
                [
                    b["q"][32 * t : 32 * t + 32],
                    b["k"][16 * t : 16 * t + 16],
                    b["v"][16 * t : 16 * t + 16],
                ]
            )
            f[pre + "mlp.linear_fc1.lora_A.default.weight"] = a_f
            f[pre + "mlp.linear_fc1.lora_B.default.weight"] = torch.cat(
                [b["gate"][64 * t : 64 * t + 64], b["up"][64 * t : 64 * t + 64]]
            )
            # row parallel: A columns of this rank, full B
            f[pre + "self_attention.linear_proj.lora_A.default.weight"] = a_o[
                :, 32 * t : 32 * t + 32
            ].clone()
            f[pre + "self_attention.linear_proj.lora_B.default.weight"] = b["o"]
            f[pre + "mlp.linear_fc2.lora_A.default.weight"] = a_d[:, 64 * t : 64 * t + 64].clone()
            f[pre + "mlp.linear_fc2.lora_B.default.weight"] = b["down"]
    lora_dir = tmp_path / "ms_lora"
    for t in range(tp):
        path = lora_dir / "iter_0000010" / f"mp_rank_{t:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        args = argparse.Namespace(lora_r=r, lora_alpha=alpha, tensor_model_parallel_size=tp)
        torch.save(
            {"args": args, "checkpoint_version": 3.0, "iteration": 10, "model": files[t]}, path
        )
    (lora_dir / "latest_checkpointed_iteration.txt").write_text("10")
    oracle = peft_model.merge_and_unload().state_dict()
    return hf, base_mg, lora_dir, oracle


def test_mindspeed_lora_checkpoint_merge(tmp_path):
    hf, base_mg, lora_dir, oracle = _ms_lora_case(tmp_path)
    # the seeds' flags, legacy target names
    assert cli_main(["convert", "--load-model-type", "mg", "--save-model-type", "hf",
                     "--load-dir", str(base_mg), "--lora-load", str(lora_dir), "--lora-r", "4",
                     "--lora-alpha", "8", "--lora-target-modules", "query_key_value", "dense",
                     "dense_h_to_4h", "dense_4h_to_h", "--save-dir", str(hf),
                     "--no-progress"]) == 0  # fmt: skip
    got = load_hf_state_dict(hf / "mg2hf")
    base = load_hf_state_dict(hf)
    assert got.keys() == base.keys()
    for k in got:
        torch.testing.assert_close(got[k], oracle[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(got["model.layers.0.self_attn.k_proj.weight"],
                           base["model.layers.0.self_attn.k_proj.weight"])  # fmt: skip
    # merged into mcore re-sharded output too (r/alpha read from the LoRA run's args)
    convert(ConvertOptions("mg", "mg", base_mg, tmp_path / "m", pp=2, lora_load=lora_dir,
                           progress=False))  # fmt: skip
    back = convert(ConvertOptions("mg", "hf", tmp_path / "m", save_hf_dir=tmp_path / "b",
                                  progress=False))  # fmt: skip
    again = load_hf_state_dict(back)
    assert all(torch.equal(again[k], got[k]) for k in got)
    with pytest.raises(ConfigError, match="differ from the values the LoRA run saved"):
        convert(ConvertOptions("mg", "hf", base_mg, save_hf_dir=tmp_path / "x", lora_load=lora_dir,
                               lora_r=8, progress=False))  # fmt: skip
    with pytest.raises(ConfigError, match="does not name linear_fc2"):
        convert(ConvertOptions("mg", "hf", base_mg, save_hf_dir=tmp_path / "x", lora_load=lora_dir,
                               lora_target_modules=["linear_qkv", "linear_proj", "linear_fc1"],
                               progress=False))  # fmt: skip
    assert not (tmp_path / "x").exists()
