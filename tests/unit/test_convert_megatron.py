"""A converted checkpoint loads into Megatron-core's own GPTModel (local spec, strict
load_state_dict) and gives the logits transformers gives on the HF original (fp32, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_hf_model, tiny_hf_model
from tunelab.convert.megatron import ConvertOptions, convert

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[2]
# mcore's llama3 rope scaling hard-codes original_max_position_embeddings=8192
# A large init so that attention is far from uniform: with the default 0.02 a k/v mix-up
# changes the logits by less than the tolerance.
INIT = dict(initializer_range=0.3)
CASES = {
    "llama2": {},
    "llama3": dict(
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    ),
    "qwen2": {},
    "qwen2_untied": {},
    "qwen3": {},
}


def test_megatron_core_gptmodel_matches_transformers(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 12))
    jobs, expected = [], {}
    for family, overrides in CASES.items():
        overrides = {**INIT, **overrides}
        hf_dir = save_tiny_hf_model(tmp_path / family / "hf", family, seed=1, **overrides)
        mg = convert(ConvertOptions("hf", "mg", hf_dir, tmp_path / family / "mg", progress=False))
        jobs.append((str(mg), str(tmp_path / f"{family}.pt")))
        with torch.no_grad():
            expected[family] = tiny_hf_model(family, seed=1, **overrides)(ids).logits
    # the re-sharding path too: HF -> TP2 PP2 -> TP1 PP1 -> Megatron
    convert(ConvertOptions("hf", "mg", tmp_path / "qwen2" / "hf", tmp_path / "mg22", tp=2, pp=2,
                           progress=False))  # fmt: skip
    convert(ConvertOptions("mg", "mg", tmp_path / "mg22", tmp_path / "resharded", progress=False))
    jobs.append((str(tmp_path / "resharded"), str(tmp_path / "resharded.pt")))
    expected["resharded"] = expected["qwen2"]
    torch.save({"input_ids": ids, "jobs": jobs}, tmp_path / "jobs.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.convert", str(tmp_path / "jobs.pt")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for family in expected:
        got = torch.load(tmp_path / f"{family}.pt", weights_only=True)
        assert got.shape == expected[family].shape
        torch.testing.assert_close(got, expected[family], rtol=1e-4, atol=1e-4, msg=family)
