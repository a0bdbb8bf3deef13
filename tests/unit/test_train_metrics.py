"""Metrics records, MFU, resumed-run de-duplication, loss plot; a variable-length SFT run."""

from __future__ import annotations

import json

import pytest

from tests.helpers.train import random_sft_rows, run_config, write_sft
from tunelab.train.metrics import MetricsLogger, plot_loss_curve, read_metrics
from tunelab.train.trainer import Trainer


def test_records_mfu_and_variable_lengths(tmp_path, tiny_hf_dir):
    data = write_sft(tmp_path / "d", random_sft_rows(8, seed=3, lo=5, hi=20))
    cfg = run_config(
        tmp_path / "o", tiny_hf_dir, data, "--train.steps=2", "--logging.peak_tflops=0.001",
        "--data.variable_seq_lengths=true", "--data.pad_to_multiple_of=4",
        "--checkpoint.save_final=false", "--checkpoint.export_hf=false",
    )  # fmt: skip
    t = Trainer(cfg)
    shapes = {tuple(mb["input_ids"].shape) for mb in t.loader.next_batch()}
    t.loader.consumed_samples = 0
    assert all(s[1] % 4 == 0 and s[1] <= 20 for s in shapes), shapes
    records = []
    t.callbacks.append(lambda tr, step, rec: records.append(rec))
    t.train()
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        fpt = t.model_config.flops_per_token(32)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e9)
        assert r["memory_gib"] > 0 and r["num_supervised_tokens"] > 0
    on_disk = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in on_disk] == [r["loss"] for r in records]


def test_resumed_steps_keep_the_newest_record_and_plot(tmp_path):
    for losses in ([3.0, 2.0, 1.5], [1.4, 1.0]):  # the second run resumed at step 2
        m = MetricsLogger(tmp_path, 4, start_step=4 - len(losses) - 1, progress="none", plot=False)
        start = 1 if len(losses) == 3 else 2
        for i, loss in enumerate(losses):
            rec = dict(step=start + i, loss=loss, lr=1.0, grad_norm=1.0, tokens_per_s=1.0)
            m.log_step({**rec, "mfu": None, "memory_gib": 0.1})
        m.log_eval(start + len(losses) - 1, loss - 0.1, 10)
        m.close()
    train = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")
             if r["kind"] == "train"]  # fmt: skip
    assert train == [(1, 3.0), (2, 1.4), (3, 1.0)]
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
