"""Process-group start and end for entry points run under torchrun (or as one process).

``init_distributed`` reads torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``),
picks NCCL with one GPU per process when CUDA is there and gloo otherwise, and starts the
default process group with a bounded timeout. ``exit_process`` ends a distributed process
without interpreter finalization: gloo's worker thread can otherwise drop a tensor while
Python is shutting down and abort the process (pytorch#190489), failing a finished job.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Start the process group if torchrun launched us; otherwise describe one process.

    ``device``: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``. Under torchrun
    each process takes GPU ``LOCAL_RANK``.
    """
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {device!r} but CUDA is not available; use cpu or auto")
    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if want_cuda:
            dev = torch.device(device if device.startswith("cuda") else "cuda")
        else:
            dev = torch.device("cpu")
        return DistEnv(0, 0, 1, dev, None)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ["WORLD_SIZE"])
    if want_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "set --nproc_per_node to at most the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # After `torchrun --max-restarts` restarts the workers, the rendezvous store can still
        # hold the dead workers' gloo addresses under the same keys; a restarted rank would
        # connect to them and fail. Keys of each attempt get their own prefix.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"tunelab/attempt_{attempt}/", store)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs
        )
    logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistEnv(rank, local_rank, world, dev, backend)


def quiet_other_ranks(env: DistEnv) -> None:
    """Only rank 0 logs progress; other ranks keep warnings and errors (they still reach
    the user, prefixed with the rank)."""
    if env.is_main or not env.distributed:
        return
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    prefix = f"[rank {env.rank}] "
    for handler in root.handlers:
        old = handler.formatter
        fmt = old._fmt if old is not None and old._fmt else "%(message)s"
        handler.setFormatter(logging.Formatter(prefix + fmt, old.datefmt if old else None))


def exit_process(code: int) -> None:
    """End a distributed process: destroy the group, flush, and skip finalization."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; the exit code carries the failure
            logger.exception("destroy_process_group failed")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
