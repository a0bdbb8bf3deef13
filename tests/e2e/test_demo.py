"""`tunelab demo --quick` as a new user runs it: every stage leaves its artifact, the printed
commands are the ones that ran, and held-out accuracy rises with training."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "tunelab-demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "demo", "--quick", "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_every_stage_leaves_its_artifact(demo):
    out, _ = demo
    for f in ("sft_alpaca.jsonl", "lora_sharegpt.jsonl", "pretrain.jsonl", "heldout.jsonl"):
        assert (out / "data" / f).stat().st_size > 0, f
    assert set(_rows(out / "data" / "sft_alpaca.jsonl")[0]) == {"instruction", "input", "output"}
    assert "conversations" in _rows(out / "data" / "lora_sharegpt.jsonl")[0]
    tok = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>"
    assert json.loads((out / "models/init/config.json").read_text())["model_type"] == "qwen2"
    for name in ("sft", "lora"):
        for field in ("input_ids", "labels", "attention_mask"):
            assert (out / "datasets" / f"{name}_packed_{field}_document.bin").stat().st_size > 0
    assert (out / "datasets" / "pretrain_text_document.idx").is_file()
    for stage in ("pretrain", "sft", "lora"):
        run = out / "runs" / stage
        assert (run / "config.yaml").is_file() and (run / "loss.png").stat().st_size > 0
        train = [r for r in _rows(run / "metrics.jsonl") if r["kind"] == "train"]
        assert train and all(r["loss"] == r["loss"] for r in train)  # no NaN
        assert (run / "checkpoints" / "latest").is_file()
    for stage in ("pretrain", "sft"):
        assert (out / "runs" / stage / "hf" / "model.safetensors").is_file()
    assert (out / "runs/lora/adapter/adapter_config.json").is_file()
    assert (out / "models/merged/model.safetensors").is_file()
    for label in ("initial", "pretrained", "sft", "sft+lora"):
        assert (out / "preds" / f"{label}.jsonl").is_file()


def test_training_lowers_the_loss(demo):
    out, _ = demo
    for stage in ("pretrain", "sft", "lora"):
        losses = [r["loss"] for r in _rows(out / "runs" / stage / "metrics.jsonl")
                  if r["kind"] == "train"]  # fmt: skip
        first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
        assert last < 0.8 * first, (stage, losses)


def test_heldout_questions_are_not_trained_on(demo):
    out, _ = demo
    held = {r["prompt"] for r in _rows(out / "data" / "heldout.jsonl")}
    trained = {r["instruction"] for r in _rows(out / "data" / "sft_alpaca.jsonl")}
    trained |= {r["conversations"][0]["value"] for r in _rows(out / "data/lora_sharegpt.jsonl")}
    assert held and not held & trained
    texts = [r["text"] for r in _rows(out / "data" / "pretrain.jsonl")]
    assert not [p for p in held if any(f"\n{p}<|im_end|>" in t for t in texts)]


def _accuracy(preds: Path) -> dict[str, float]:
    """Exact match recomputed here, independently of the demo's scorer."""
    by_task: dict[str, list[bool]] = {}
    for r in _rows(preds):
        by_task.setdefault(r["task"], []).append(r["completion"].strip() == r["answer"])
    return {t: sum(v) / len(v) for t, v in by_task.items()}


def test_accuracy_rises_after_sft_and_lora(demo):
    out, stdout = demo
    summary = json.loads((out / "summary.json").read_text())
    acc = {label: _accuracy(out / "preds" / f"{label}.jsonl") for label in summary["accuracy"]}
    for label, per_task in acc.items():
        assert per_task == pytest.approx(summary["accuracy"][label]), label
    assert list(acc) == ["initial", "pretrained", "sft", "sft+lora"]
    before, sft, lora = acc["initial"], acc["sft"], acc["sft+lora"]
    # the easiest task goes from never right to mostly right; SFT keeps or improves on
    # what pretraining on the transcripts reached
    assert sft["echo"] >= before["echo"] + 0.5, acc
    assert sft["echo"] >= acc["pretrained"]["echo"] - 0.1, acc
    assert (
        sum(sft[t] for t in ("echo", "add", "count"))
        > sum(before[t] for t in ("echo", "add", "count")) + 0.8
    ), acc
    # LoRA teaches the new task on top of the SFT model
    assert lora["reverse"] >= sft["reverse"] + 0.3, acc
    assert "held-out exact match per task" in stdout
    assert len(summary["chat"]) == 4 and all(x["assistant"] is not None for x in summary["chat"])


def test_printed_commands_are_the_ones_that_ran(demo, monkeypatch):
    out, stdout = demo
    printed = [line[2:] for line in stdout.splitlines() if line.startswith("$ tunelab ")]
    summary = json.loads((out / "summary.json").read_text())
    assert printed == [c["command"] for c in summary["commands"]]
    verbs = {shlex.split(c)[1] for c in printed}
    assert verbs == {"preprocess", "train", "generate", "merge-lora", "chat"}
    # rerunning a printed command from the demo directory reproduces its output
    cmd = next(c for c in printed if "preds/sft.jsonl" in c)
    argv = shlex.split(cmd)[1:]
    argv[argv.index("--output") + 1] = "preds/rerun.jsonl"
    monkeypatch.chdir(out)
    assert cli(argv) == 0
    assert _rows(out / "preds/rerun.jsonl") == _rows(out / "preds/sft.jsonl")


def test_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert cli(["demo", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "not written by `tunelab demo`" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_replaces_a_previous_demo_directory(tmp_path):
    from tunelab.demo.run import MARKER, prepare_dir

    out = prepare_dir(tmp_path / "d")
    (out / "runs").mkdir()
    (out / "runs" / "old.txt").write_text("x")
    assert prepare_dir(out) == out
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
