"""init_distributed outside torchrun: one process, no process group."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.parallel.launch import init_distributed, launched_by_torchrun


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_by_torchrun()
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.backend) == (0, 1, None)
    assert env.device == torch.device("cpu") and env.is_main and not env.distributed
    assert not torch.distributed.is_initialized()


def test_world_size_one_under_torchrun_needs_no_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    env = init_distributed("cpu")
    assert env.backend is None and not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    with pytest.raises(ConfigError, match="train.device = 'cuda' but CUDA is not available"):
        init_distributed("cuda")
