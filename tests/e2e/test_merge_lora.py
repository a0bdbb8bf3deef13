"""`tunelab merge-lora` as a user runs it: a peft-trained adapter merged into a sharded HF
base; the result loads in `transformers` and gives the logits of base + adapter (via peft)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers.lora import IDS, hf_logits, peft_adapter_dir, peft_logits
from tests.helpers.tiny_models import tiny_hf_model
from tunelab.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]


def _save_base(out_dir: Path, tokenizer_dir: Path, dtype=torch.float32, shard=None, **kw) -> Path:
    import shutil

    model = tiny_hf_model("qwen2", **kw).to(dtype)
    model.save_pretrained(str(out_dir), **({"max_shard_size": shard} if shard else {}))
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out_dir / f.name)
    return out_dir


def _load(model_dir: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft_adapter_dir(tmp_path_factory.mktemp("adapter"), "qwen2", target_modules=targets)


def test_merge_lora_cli_fp32_matches_peft(tmp_path, tiny_tokenizer_dir, adapter):
    base = _save_base(tmp_path / "base", tiny_tokenizer_dir)
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "merge-lora", "--base", str(base),
         "--adapter", str(adapter), "--out", str(out)],  # fmt: skip
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "merged 14 LoRA modules" in proc.stdout
    expected = peft_logits(_load(base), adapter)
    got = hf_logits(_load(out))
    assert (expected - hf_logits(_load(base))).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (out / name).is_file(), name
    # tunelab's own loader reads the merged directory too
    from tunelab.model.hf import load_model

    with torch.no_grad():
        ours = load_model(out, dtype=torch.float32)(IDS)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-5)


def test_merge_lora_sharded_bf16_keeps_dtype_and_shards(tmp_path, tiny_tokenizer_dir, adapter):
    base = _save_base(tmp_path / "base", tiny_tokenizer_dir, torch.bfloat16, shard="100KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    out = tmp_path / "merged"
    rc = cli_main(["merge-lora", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "model.safetensors.index.json").read_text()) == index
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )
    # base + adapter (peft, fp32 compute on the bf16 weights) vs the merged bf16 weights:
    # they differ only by the bf16 rounding of the merged weights.
    expected = peft_logits(_load(base, torch.float32), adapter)
    got = hf_logits(_load(out, torch.float32))
    assert (got - expected).abs().max() < 2e-2
    assert (got - hf_logits(_load(base, torch.float32))).abs().max() > 5e-2
    # --out exists now: refused without --overwrite
    rc = cli_main(["merge-lora", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert rc == 2


def test_merge_lora_errors(tmp_path, tiny_tokenizer_dir, adapter, capsys):
    base = _save_base(tmp_path / "base", tiny_tokenizer_dir)
    cfg_path = base / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(
        json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes"}})
    )
    args = ["merge-lora", "--base", str(base), "--adapter", str(adapter)]
    assert cli_main([*args, "--out", str(tmp_path / "o1")]) == 2
    assert "quantized (bitsandbytes)" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()

    other = _save_base(tmp_path / "other", tiny_tokenizer_dir, hidden_size=32, intermediate_size=64)
    args = ["merge-lora", "--base", str(other), "--adapter", str(adapter)]
    assert cli_main([*args, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj.weight has shape (32, 64)" in err
    assert not (tmp_path / "o2").exists()

    fewer = _save_base(tmp_path / "fewer", tiny_tokenizer_dir, num_hidden_layers=1)
    args = ["merge-lora", "--base", str(fewer), "--adapter", str(adapter)]
    assert cli_main([*args, "--out", str(tmp_path / "o3")]) == 2
    assert "model.layers.1." in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_merge_lora_prefers_adapter_tokenizer(tmp_path, tiny_tokenizer_dir, adapter):
    import shutil

    base = _save_base(tmp_path / "base", tiny_tokenizer_dir)
    adapter_copy = tmp_path / "adapter"
    shutil.copytree(adapter, adapter_copy)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, adapter_copy / f.name)
    (adapter_copy / "chat_template.jinja").write_text("{{ 'trained template' }}")
    out = tmp_path / "merged"
    rc = cli_main(
        ["merge-lora", "--base", str(base), "--adapter", str(adapter_copy), "--out", str(out)]
    )
    assert rc == 0
    assert (out / "chat_template.jinja").read_text() == "{{ 'trained template' }}"
