"""User errors before training (config, data) and the NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.train import packed_rows, random_sft_rows, run_config, write_pretrain, write_sft
from tunelab.errors import ConfigError, DataError
from tunelab.train.checkpoint import CheckpointManager
from tunelab.train.trainer import Trainer, TrainingError


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return write_sft(tmp_path_factory.mktemp("sft") / "d", random_sft_rows(12, seed=2))


def test_packed_row_length_must_match_seq_length(tmp_path, tiny_hf_dir):
    rows, masks = packed_rows(6, 32)
    data = write_sft(tmp_path / "p", rows, masks)
    with pytest.raises(DataError, match=r"rows of 32 tokens.*--data.seq_length=32"):
        Trainer(run_config(tmp_path / "o", tiny_hf_dir, data, "--data.seq_length=48"))


def test_forcing_packed_on_rows_of_several_lengths(tmp_path, tiny_hf_dir, sft):
    with pytest.raises(DataError, match=r"data.packed=true but the rows.*lengths \d+\.\.\d+"):
        Trainer(run_config(tmp_path / "o", tiny_hf_dir, sft, "--data.packed=true"))


def test_token_ids_outside_vocab(tmp_path, tiny_hf_dir):
    rows = random_sft_rows(4, seed=0)
    rows[2][0][1] = 700  # the tiny model has 512 ids
    data = write_sft(tmp_path / "v", rows)
    with pytest.raises(DataError, match=r"v_packed_input_ids_document\.bin.*700.*512"):
        Trainer(run_config(tmp_path / "o", tiny_hf_dir, data))


def test_missing_files_and_wrong_mode(tmp_path, tiny_hf_dir):
    with pytest.raises(DataError, match=r"nope_packed_input_ids_document\.bin/\.idx"):
        Trainer(run_config(tmp_path / "o", tiny_hf_dir, tmp_path / "nope"))
    pre = write_pretrain(tmp_path / "pre", [np.arange(3, 40)] * 4)
    with pytest.raises(DataError, match="data.mode=pretrain"):
        Trainer(run_config(tmp_path / "o", tiny_hf_dir, pre))
    with pytest.raises(DataError, match=r"missing_text_document\.bin/\.idx"):
        Trainer(
            run_config(tmp_path / "o", tiny_hf_dir, tmp_path / "missing", "--data.mode=pretrain")
        )


def test_config_errors_reach_the_cli(tmp_path, tiny_hf_dir, sft, capsys):
    from tunelab.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(run_config(tmp_path / "o", tiny_hf_dir, sft).to_yaml())
    assert main(["train", str(cfg), "--optim.lrr=1e-3"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(["train", str(cfg), "--train.global_batch_size=3"]) == 2
    assert "train.global_batch_size (3)" in capsys.readouterr().err
    assert main(["train", str(cfg), "--train.steps=many"]) == 2
    assert "train.steps: expected an integer" in capsys.readouterr().err
    # overrides only (no file), --print-config anywhere, -h
    assert main(["train", f"--model.path={tiny_hf_dir}", "--print-config", "--lr", "5e-4"]) == 0
    assert "lr: 0.0005" in capsys.readouterr().out
    assert main(["train", "-h"]) == 0 and "--section.key=value" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="tensor_model_parallel_size|parallel.tp"):
        Trainer(run_config(tmp_path / "o", tiny_hf_dir, sft, "--tensor_model_parallel_size=2"))


def _poison_loss_at(trainer, call: int):
    real = trainer.model.loss
    n = {"calls": 0}

    def loss(*a, **k):
        n["calls"] += 1
        s, c = real(*a, **k)
        return (s * float("nan"), c) if n["calls"] == call else (s, c)

    trainer.model.loss = loss


def test_nan_stops_without_saving_a_poisoned_checkpoint(tmp_path, tiny_hf_dir, sft):
    cfg = run_config(tmp_path, tiny_hf_dir, sft, "--train.steps=4", "--save_interval=1")
    t = Trainer(cfg)
    _poison_loss_at(t, call=5)  # 2 micro-batches per step: step 3
    with pytest.raises(TrainingError, match=r"step 3: the loss became nan.*step-2.*nan_policy"):
        t.train()
    assert CheckpointManager(tmp_path).latest().name == "step-2"
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_nan_skip_policy_skips_the_update(tmp_path, tiny_hf_dir, sft):
    cfg = run_config(
        tmp_path,
        tiny_hf_dir,
        sft,
        "--train.steps=4",
        "--train.nan_policy=skip",
        "--save_interval=1",
    )
    t = Trainer(cfg)
    _poison_loss_at(t, call=5)
    before = {}

    def snap(trainer, step, record):
        if step == 2:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        if step == 3:
            assert record["skipped"]
            for k, v in trainer.model.state_dict().items():
                assert torch.equal(v, before[k]), k

    t.callbacks.append(snap)
    res = t.train()
    assert res.skipped_steps == 1 and res.last_step == 4
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
