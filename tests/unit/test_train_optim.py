"""LR schedules, weight-decay exclusions, precision modes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.train import random_sft_rows, run_config, write_sft
from tunelab.train.optim import LRSchedule, Scheduler, build_optimizer, no_decay
from tunelab.train.trainer import Trainer


def test_schedules():
    cos = LRSchedule(lr=1.0, min_lr=0.1, warmup=2, decay_steps=12, style="cosine")
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == 1.0 and cos(12) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    assert cos(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = LRSchedule(1.0, 0.0, 0, 10, "linear")
    assert [lin(0), lin(5), lin(10)] == [1.0, 0.5, 0.0]
    const = LRSchedule(1.0, 0.0, 4, 10, "constant")
    assert [const(0), const(3), const(9)] == [0.25, 1.0, 1.0]


def test_scheduler_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = Scheduler(opt, LRSchedule(1.0, 0.0, 2, 10, "linear"))
    assert opt.param_groups[0]["lr"] == 0.5
    s.step()
    s.step()
    s2 = Scheduler(opt, LRSchedule(1.0, 0.0, 2, 10, "linear"))
    s2.load_state_dict(s.state_dict())
    assert opt.param_groups[0]["lr"] == s.lr == 1.0


def test_weight_decay_excludes_norms_and_biases(tiny_hf_dir):
    from tunelab.config import OptimSection
    from tunelab.model.hf import load_model

    model = load_model(tiny_hf_dir, torch.float32)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimSection(weight_decay=0.1))
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if not g["weight_decay"] for p in g["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert "model.layers.0.self_attn.q_proj.bias" in plain  # qwen2 has qkv bias
    assert "model.layers.0.input_layernorm.weight" in plain and "model.norm.weight" in plain
    assert not no_decay("model.layers.0.mlp.up_proj.weight", torch.zeros(2, 2))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_modes_train_with_fp32_master(tmp_path, tiny_hf_dir, precision):
    data = write_sft(tmp_path / "d", random_sft_rows(8, seed=1))
    cfg = run_config(
        tmp_path / "o",
        tiny_hf_dir,
        data,
        f"--train.precision={precision}",
        "--train.steps=2",
        "--checkpoint.save_final=false",
        "--checkpoint.export_hf=false",
    )
    t = Trainer(cfg)
    res = t.train()
    assert all(math.isfinite(v) for v in res.losses.values())
    opt_params = [p for g in t.optimizer.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in opt_params)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert next(t.model.parameters()).dtype == want
    if precision == "bf16":  # the bf16 model is the rounded fp32 master
        m = dict(t.master.named_parameters())
        for n, p in t.model.named_parameters():
            assert torch.equal(p, m[n].to(torch.bfloat16)), n
