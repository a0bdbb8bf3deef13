"""Resumable checkpoints: ``{output_dir}/checkpoints/step-N/`` written with DCP.

A step directory holds the DCP files (``.metadata`` + ``*.distcp``: model, optimizer,
scheduler, dataloader position, train state, all keyed by name so they reshard), one
``rng-rank{r}.pt`` per process and ``meta.json`` (written last: its presence marks the
directory complete). It is written under ``.step-N.tmp`` and renamed when every rank is done;
``latest`` (a text file) then names it. A crash while writing leaves the previous checkpoint
as ``latest``; the leftover temporary is removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tunelab.errors import CheckpointError
from tunelab.utils import atomic_write_text

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
META = "meta.json"
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(step_dir: Path) -> bool:
    return (step_dir / META).is_file() and (step_dir / ".metadata").is_file()


def step_of(step_dir: Path) -> int:
    m = STEP_RE.match(step_dir.name)
    if not m:
        raise CheckpointError(f"{step_dir}: not a step-N checkpoint directory")
    return int(m.group(1))


class CheckpointManager:
    """Save, find and load step checkpoints of one run directory."""

    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    # ---- discovery ---------------------------------------------------------------------
    def complete_steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
        return sorted((p for p in dirs if is_complete(p)), key=step_of)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; a scan for the newest complete one when the pointer
        is missing or names an incomplete directory. The pointer wins over a scan, so after
        resuming from an earlier step the abandoned later steps are not picked up again."""
        pointer = self.root / LATEST
        if pointer.is_file():
            cand = self.root / pointer.read_text(encoding="utf-8").strip()
            if STEP_RE.match(cand.name) and is_complete(cand):
                return cand
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint ``checkpoint.resume`` asks for: auto / never / a path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if p.is_dir() and not STEP_RE.match(p.name):
            # a run directory or its checkpoints/ directory
            sub = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            found = CheckpointManager(sub.parent, self.keep_last).latest()
            if found is None:
                raise CheckpointError(f"checkpoint.resume={resume}: no complete step-N in {sub}")
            return found
        if not is_complete(p):
            raise CheckpointError(
                f"checkpoint.resume={resume}: not a complete checkpoint directory (needs "
                f"{META} and .metadata); use 'auto' for the newest complete one"
            )
        return p

    # ---- save --------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write ``state`` with DCP as step ``step``; every rank calls this."""
        import torch.distributed.checkpoint as dcp

        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        rank = _rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for old in self.root.glob(".step-*.tmp"):
                shutil.rmtree(old, ignore_errors=True)  # debris of a crashed save
            tmp.mkdir()
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        _barrier()
        if rank == 0:
            meta = {**meta, "step": step, "world_size": _world()}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            if final.exists():  # re-saving a step after resuming from an earlier one
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune(keep=final)
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        steps = self.complete_steps()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- load --------------------------------------------------------------------------
    @staticmethod
    def load(step_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Fill ``state`` (same structure as saved) in place from ``step_dir``; restore this
        rank's RNG when the world size matches. Returns meta.json."""
        import torch.distributed.checkpoint as dcp

        meta = json.loads((step_dir / META).read_text(encoding="utf-8"))
        try:
            dcp.load(state, checkpoint_id=str(step_dir))
        except Exception as e:  # DCP raises bare RuntimeErrors / CheckpointException
            raise CheckpointError(
                f"{step_dir}: cannot load this checkpoint into the current run ({e}); was it "
                "written by a different model, LoRA setting or optimizer?"
            ) from e
        rng = step_dir / f"rng-rank{_rank()}.pt"
        if meta.get("world_size") == _world() and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        else:
            logger.warning(
                "%s was saved by %s processes, this run has %d: RNG states are not restored "
                "(data order and weights still resume exactly; dropout draws differ)",
                step_dir,
                meta.get("world_size"),
                _world(),
            )
        return meta
