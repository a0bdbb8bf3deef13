"""SIGTERM to a running `tunelab train`: it saves, exits 143, and the same command (with more
steps) continues with exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.train import random_sft_rows, run_config, write_sft

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(cfg_path, *overrides, wait=True):
    cmd = [sys.executable, "-m", "tunelab", "train", str(cfg_path), *overrides]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path, tiny_hf_dir):
    data = write_sft(tmp_path / "d", random_sft_rows(10, seed=7))
    cfg = run_config(tmp_path / "run", tiny_hf_dir, data, "--train.steps=100000")
    cfg.optim.decay_steps = 100000  # the LR of a step does not depend on when the run stops
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())

    proc = _train(path, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    # wait for progress (not for a time): at least two finished steps
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "rerun the same command to resume" in err
    stopped = int((tmp_path / "run/checkpoints/latest").read_text().strip().split("-")[1])
    assert stopped >= 2 and max(_losses(tmp_path / "run")) == stopped

    resumed = _train(path, f"--train.steps={stopped + 2}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run/checkpoints'}/step-{stopped}" in resumed.stderr

    ref = _train(path, f"--train.steps={stopped + 2}", f"--save={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")  # bit-exact
