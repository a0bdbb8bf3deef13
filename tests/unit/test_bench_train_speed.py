"""bench/train_speed.py in its tiny CPU mode: every configured workload runs under both tools
in both data regimes, the JSON lines carry the documented fields, and tunelab's losses
equal Hugging Face's from the same weights on the same batches (fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {
    "tool", "model", "mode", "regime", "seq", "micro_batch", "tokens_per_s",
    "real_tokens_per_s", "supervised_tokens_per_s", "mfu", "peak_mem_gib", "device",
}  # fmt: skip
# the tiny CPU default: every workload but the compiled one (inductor is too slow here)
WORKLOADS = {"0.5b-full": "full", "1.5b-full": "full", "7b-lora": "lora-r16",
             "0.5b-lora": "lora-r16"}  # fmt: skip


def test_tiny_bench_runs_both_tools_and_losses_agree():
    cmd = [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--device", "cpu", "--tiny",
           "--steps", "1", "--warmup", "1", "--loss-steps", "3"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    rows = [x for x in lines if "tool" in x]
    checks = [x for x in lines if x.get("check") == "loss_agreement"]
    assert {(r["workload"], r["regime"], r["tool"]) for r in rows} == {
        (w, regime, tool)
        for w in WORKLOADS
        for regime in ("fixed", "sft")
        for tool in ("tunelab", "hf")
    }
    for r in rows:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["tokens_per_s"] > 0 and r["real_tokens_per_s"] > 0
        assert r["supervised_tokens_per_s"] > 0
        assert r["real_tokens_per_s"] <= r["tokens_per_s"] + 1e-6
        assert r["supervised_tokens_per_s"] <= r["real_tokens_per_s"] + 1e-6
        assert r["peak_mem_kind"] == "cpu_rss_delta" and r["mfu"] is None
        assert r["seq"] == 128 and r["device"].startswith("cpu")
        # tunelab rows carry the trainer's memory estimate (checked against CUDA on a GPU)
        assert (r["estimated_mem_gib"] is None) == (r["tool"] == "hf")
        if r["regime"] == "fixed":
            assert r["real_tokens_per_s"] == r["tokens_per_s"]
        elif r["tool"] == "hf":  # padded per batch: some positions are pads
            assert r["real_tokens_per_s"] < r["tokens_per_s"]
    assert {r["workload"]: r["mode"] for r in rows} == WORKLOADS
    assert "ratio table (tunelab / HF)" in proc.stdout
    assert len(checks) == 1
    check = checks[0]
    assert check["passed"] and check["steps"] == 3, check
    assert len(check["hf"]) == len(check["tunelab"]) == 3
    assert check["max_abs_diff"] <= 1e-4
