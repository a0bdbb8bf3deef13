"""`tunelab preprocess` + `tunelab train` as a user runs them: SFT on a tiny model drives the
loss down, and the exported hf/ loads in transformers with the trained weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.data import write_jsonl
from tunelab.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    {"instruction": f"say the sentence {i % 4}", "input": "", "output": text}
    for i, text in enumerate(
        [
            "The quick brown fox jumps over the lazy dog.",
            "Hello world! This is a tiny tokenizer.",
            "def add(a, b): return a + b",
            "Output: 42.",
        ]
        * 6
    )
]


def test_sft_loss_goes_down_and_hf_export_loads(tmp_path, tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    inp = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    prefix = tmp_path / "data" / "sft"
    assert (
        cli(
            [
                "preprocess",
                "--input",
                str(inp),
                "--tokenizer-name-or-path",
                str(tiny_hf_dir),
                "--handler-name",
                "alpaca",
                "--prompt-type",
                "chatml",
                "--pack",
                "--neat-pack",
                "--seq-length",
                "64",
                "--output-prefix",
                str(prefix),
            ]
        )  # fmt: skip
        == 0
    )
    out = tmp_path / "run"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        f"""
model: {{path: {tiny_hf_dir}}}
data: {{mode: sft, path: {prefix}, seq_length: 64, split: "90,10,0"}}
train: {{output_dir: {out}, steps: 30, micro_batch_size: 2, global_batch_size: 4, device: cpu,
        eval_interval: 10}}
optim: {{lr: 3e-3, min_lr: 3e-4, lr_warmup_fraction: 0.1, weight_decay: 0.0}}
checkpoint: {{save_interval: 10, keep_last: 2}}
logging: {{progress: line, plot: true}}
"""
    )
    # one thread: tiny matmuls only lose to thread hand-offs on a shared 2-core machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(cfg), "--train.seed=5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training sample (supervised spans in [[ ]])" in proc.stderr
    assert "tok/s" in proc.stderr and "eta" in proc.stderr

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r["loss"] for r in records if r["kind"] == "eval"]
    assert len(train) == 30 and len(evals) == 3
    assert sum(train[-5:]) / 5 < 0.5 * sum(train[:3]) / 3, train
    assert (out / "loss.png").stat().st_size > 0
    assert list((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-30"

    # hf/ loads in transformers and holds the weights of the final checkpoint
    hf = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    import torch.distributed.checkpoint as dcp

    from tunelab.model.hf import load_model

    base = load_model(tiny_hf_dir, torch.float32)
    state = {"model": {k: torch.zeros_like(v) for k, v in base.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(out / "checkpoints" / "step-30"))
    hf_sd = hf.state_dict()
    changed = 0
    for k, v in state["model"].items():
        torch.testing.assert_close(hf_sd[k], v, rtol=0, atol=0, msg=k)
        changed += not torch.equal(v, base.state_dict()[k])
    assert changed > len(hf_sd) // 2
    for f in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / "hf" / f).is_file(), f
