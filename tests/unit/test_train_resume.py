"""Exact resume (bit-exact on CPU): stop mid-epoch by SIGTERM or at a step, crash while
writing a checkpoint; the resumed run's losses and weights equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.helpers.train import random_sft_rows, run_config, write_sft
from tunelab.errors import CheckpointError
from tunelab.train.checkpoint import CheckpointManager, is_complete
from tunelab.train.trainer import Trainer

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 14 rows, 4 per step: an epoch ends in the middle of step 4
    return write_sft(tmp_path_factory.mktemp("sft") / "d", random_sft_rows(14, seed=1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_hf_dir, data):
    out = tmp_path_factory.mktemp("ref")
    t = Trainer(run_config(out, tiny_hf_dir, data, f"--train.steps={STEPS}"))
    res = t.train()
    return res.losses, {k: v.clone() for k, v in t.model.state_dict().items()}


def _same_weights(model, ref_state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_sigterm_mid_epoch_then_resume(tmp_path, tiny_hf_dir, data, reference):
    ref_losses, ref_state = reference

    def kill_at_3(trainer, step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = run_config(tmp_path, tiny_hf_dir, data, f"--train.steps={STEPS}")
    first = Trainer(cfg, callbacks=[kill_at_3]).train()
    assert first.stopped_by_signal == signal.SIGTERM and first.last_step == 3
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and latest.name == "step-3"
    assert not (tmp_path / "hf").exists()  # stopped: no export yet
    # the default handler is back after the run
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    second = Trainer(cfg)
    assert second.step == 3 and second.loader.consumed_samples == 12  # 12 of 14: mid-epoch
    res = second.train()
    assert {**first.losses, **res.losses} == ref_losses  # bit-exact
    _same_weights(second.model, ref_state)


def test_stop_at_step_then_continue_with_more_steps(tmp_path, tiny_hf_dir, data, reference):
    ref_losses, ref_state = reference
    # same schedule length, so the LR of every step matches the 6-step run
    half = run_config(tmp_path, tiny_hf_dir, data, "--train.steps=3", "--optim.decay_steps=6")
    first = Trainer(half).train()
    full = run_config(tmp_path, tiny_hf_dir, data, f"--train.steps={STEPS}")
    res = Trainer(full).train()
    assert {**first.losses, **res.losses} == ref_losses
    assert min(res.losses) == 4


def test_crash_while_writing_checkpoint(tmp_path, tiny_hf_dir, data, reference, monkeypatch):
    import torch.distributed.checkpoint as dcp

    ref_losses, _ = reference
    real_save = dcp.save
    calls = {"n": 0}

    def crashing_save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save: write part of it, then die
            real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)
            raise OSError("simulated crash: disk full")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", crashing_save)
    cfg = run_config(tmp_path, tiny_hf_dir, data, f"--train.steps={STEPS}", "--save_interval=2")
    with pytest.raises(OSError, match="simulated crash"):
        Trainer(cfg).train()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-2"
    assert not (root / "step-4").exists() and (root / ".step-4.tmp").exists()
    monkeypatch.setattr(dcp, "save", real_save)

    resumed = Trainer(cfg)
    assert resumed.step == 2
    res = resumed.train()
    assert {k: ref_losses[k] for k in res.losses} == res.losses
    assert not (root / ".step-4.tmp").exists()  # debris removed by the next save
    assert is_complete(root / "step-6")


def test_keep_last_and_explicit_resume(tmp_path, tiny_hf_dir, data):
    cfg = run_config(
        tmp_path, tiny_hf_dir, data, "--train.steps=4", "--save_interval=1", "--keep_last=2"
    )
    Trainer(cfg).train()
    names = [p.name for p in CheckpointManager(tmp_path).complete_steps()]
    assert names == ["step-3", "step-4"]
    again = run_config(
        tmp_path, tiny_hf_dir, data, "--train.steps=4", f"--load={tmp_path}/checkpoints/step-3"
    )
    assert Trainer(again).step == 3
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(run_config(tmp_path, tiny_hf_dir, data, "--train.steps=4", "--load=never"))


def test_resume_from_an_earlier_step_abandons_the_later_ones(tmp_path, tiny_hf_dir, data):
    cfg = run_config(tmp_path, tiny_hf_dir, data, "--train.steps=3", "--save_interval=1")
    Trainer(cfg).train()
    root = tmp_path / "checkpoints"
    branch = run_config(tmp_path, tiny_hf_dir, data, "--train.steps=2", f"--load={root}/step-1")
    Trainer(branch).train()  # re-saves step-2 from the step-1 state
    assert (root / "latest").read_text().strip() == "step-2"
    assert Trainer(cfg).step == 2  # auto follows `latest`, not the abandoned step-3


def test_lora_checkpoints_only_adapters_and_resumes_exactly(tmp_path, tiny_hf_dir, data):
    from torch.distributed.checkpoint import FileSystemReader

    args = (f"--train.steps={4}", "--lora.r=4", "--optim.lr=1e-2", "--save_interval=2")
    ref = Trainer(run_config(tmp_path / "ref", tiny_hf_dir, data, *args)).train()
    cfg = run_config(tmp_path / "run", tiny_hf_dir, data, *args[:-1], "--train.steps=2")
    cfg.optim.decay_steps = 4
    first = Trainer(cfg).train()
    meta = FileSystemReader(str(tmp_path / "run/checkpoints/step-2")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys
    res = Trainer(run_config(tmp_path / "run", tiny_hf_dir, data, *args)).train()
    assert {**first.losses, **res.losses} == ref.losses
    assert (tmp_path / "run/adapter/adapter_config.json").is_file()
    assert not (tmp_path / "run/hf").exists()  # LoRA: hf/ only with checkpoint.export_hf
