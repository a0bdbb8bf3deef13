"""AdamW with the usual weight-decay exclusions, and warmup + cosine / linear / constant LR."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.config import OptimSection, RunConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and norm weights (1-D tensors) are not decayed: decay would pull a norm's
    scale toward 0 and a bias toward 0 for no regularizing benefit."""
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return param.ndim < 2 or name.endswith(".bias") or "norm" in module


def param_groups(
    named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float
) -> list[dict]:
    decay, keep = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (keep if no_decay(name, p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``; fused when every one is on CUDA
    (``optim.fused=auto``), else the foreach implementation."""
    groups = param_groups(model.named_parameters(), cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.fused == "auto":
        fused = all(p.device.type == "cuda" for p in params)
    else:
        fused = cfg.fused == "true"
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


@dataclass
class LRSchedule:
    """The learning rate of update number ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup`` updates, then ``style`` decay to ``min_lr`` at update ``decay_steps``."""

    lr: float
    min_lr: float
    warmup: int
    decay_steps: int
    style: str = "cosine"

    @classmethod
    def from_config(cls, cfg: RunConfig) -> LRSchedule:
        o = cfg.optim
        return cls(o.lr, o.min_lr, cfg.warmup_steps(), cfg.decay_steps(), o.schedule)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.style == "constant":
            return self.lr
        span = max(1, self.decay_steps - self.warmup)
        progress = min(1.0, max(0.0, (step - self.warmup) / span))
        if self.style == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor


class Scheduler:
    """Sets the optimizers' learning rate for each update; its state is the update count.

    Takes one optimizer or a list (one per pipeline stage)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        schedule: LRSchedule,
    ):
        self.optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
        self.schedule = schedule
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule(self.step_count)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    @property
    def lr(self) -> float:
        return self.schedule(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
