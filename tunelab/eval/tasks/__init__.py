"""Evaluation tasks, one module per task; `get_task(name)` returns a fresh instance."""

from __future__ import annotations

import importlib

from tunelab.errors import ConfigError

TASKS = ("mmlu", "ceval", "cmmlu", "boolq", "gsm8k", "bbh", "agieval", "human_eval")


def get_task(name: str):
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    module = importlib.import_module(f"tunelab.eval.tasks.{name}")
    return type(module.TASK)()
