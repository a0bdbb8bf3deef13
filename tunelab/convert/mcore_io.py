"""Megatron checkpoint files on disk (torch format): directory layout, safe loading, saving.

Layout (reference/mindspeed-formats.md 4.2)::

    <dir>/latest_checkpointed_iteration.txt      "1" (or "release")
    <dir>/iter_0000001/mp_rank_{tp:02d}/model_optim_rng.pt          PP == 1
    <dir>/iter_0000001/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt PP > 1

Each file is one pickled dict with `args` (argparse.Namespace), `checkpoint_version`,
`iteration` and `model` (or `model0..modelK` with virtual pipeline stages).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import CheckpointError

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def _numpy_safe_globals() -> list:
    """Data-only numpy constructors found in Megatron `rng_state` entries (no code runs)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    out: list = [np.ndarray, np.dtype]
    try:
        from numpy.core.multiarray import _reconstruct  # numpy < 2 path, still importable

        out.append(_reconstruct)
    except ImportError:  # pragma: no cover
        pass
    try:
        out.append((np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"))
    except AttributeError:  # pragma: no cover
        pass
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "int32")]
    return out


SAFE_GLOBALS: list = [argparse.Namespace, *_numpy_safe_globals()]


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


@dataclass(frozen=True)
class McoreCheckpoint:
    """An existing Megatron checkpoint iteration directory and its TP/PP grid."""

    iter_dir: Path
    iteration: int | str
    tp: int
    pp: int

    def file(self, tp_rank: int, pp_rank: int) -> Path:
        return self.iter_dir / rank_dir_name(tp_rank, pp_rank, self.pp) / FILE_NAME


def find_checkpoint(load_dir: str | Path) -> McoreCheckpoint:
    """Locate the iteration to read: via the tracker file, or ``load_dir`` is itself one."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"{load_dir}: Megatron checkpoint directory not found")
    tracker = load_dir / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            iteration: int | str = "release"
        else:
            try:
                iteration = int(text)
            except ValueError:
                raise CheckpointError(
                    f"{tracker}: expected an iteration number or 'release', found {text!r}"
                ) from None
        iter_dir = load_dir / iteration_dir_name(iteration)
        if not iter_dir.is_dir():
            raise CheckpointError(f"{tracker} names iteration {text} but {iter_dir} is missing")
    elif any(_RANK_DIR.match(p.name) for p in load_dir.iterdir()):
        iter_dir = load_dir
        m = re.match(r"iter_(\d+)$", load_dir.name)
        iteration = int(m.group(1)) if m else ("release" if load_dir.name == "release" else 0)
    else:
        raise CheckpointError(
            f"{load_dir}: no {TRACKER} and no mp_rank_* directories; pass the directory that "
            f"holds {TRACKER} (Megatron --save dir) or an iter_XXXXXXX directory"
        )
    grid: set[tuple[int, int]] = set()
    for p in iter_dir.iterdir():
        m = _RANK_DIR.match(p.name)
        if not m:
            continue
        if m.group(3) is not None:
            raise CheckpointError(
                f"{p}: expert-parallel checkpoints (mp_rank_TT_PPP_EEE) are not supported"
            )
        grid.add((int(m.group(1)), int(m.group(2) or 0)))
    if not grid:
        if (iter_dir / ".metadata").is_file() or any(iter_dir.glob("*.distcp")):
            raise CheckpointError(
                f"{iter_dir} is a torch_dist (distributed checkpoint) iteration; tunelab converts "
                "the torch format. Save with --ckpt-format torch, or convert it with Megatron's "
                "tools first"
            )
        raise CheckpointError(f"{iter_dir}: no mp_rank_* directories")
    tp = max(t for t, _ in grid) + 1
    pp = max(q for _, q in grid) + 1
    ckpt = McoreCheckpoint(iter_dir, iteration, tp, pp)
    for t in range(tp):
        for q in range(pp):
            if not ckpt.file(t, q).is_file():
                raise CheckpointError(
                    f"{ckpt.file(t, q)} is missing: the checkpoint has TP={tp} PP={pp} "
                    "but not every rank's file (incomplete copy or save?)"
                )
    return ckpt


class Opaque:
    """Stands in for a class or function named in a checkpoint's pickled metadata (Megatron
    enums, activation functions in `args`). Its own code is never imported or run: pickle
    calls this placeholder instead, which only records the arguments."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}{self.__dict__.get('args', ())}>"


def _safe_names() -> set[str]:
    names = set()
    for g in SAFE_GLOBALS:
        obj, name = g if isinstance(g, tuple) else (g, None)
        names.add(name or f"{obj.__module__}.{obj.__qualname__}")
    return names


def load_file(path: Path, allow_unsafe_pickle: bool = False) -> dict[str, Any]:
    """torch.load with weights_only. Globals outside the allow-list (in Megatron's `args`) are
    read as inert :class:`Opaque` placeholders; they must not stand where tensors are.
    Unsafe unpickling only when explicitly allowed."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if allow_unsafe_pickle:
            log.warning("%s: loading with weights_only=False (--allow-unsafe-pickle)", path)
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        else:
            obj = _load_with_placeholders(path, e)
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(obj, dict) or not any(k == "model" or k.startswith("model") for k in obj):
        raise CheckpointError(f"{path}: no 'model' entry; not a Megatron model_optim_rng.pt")
    return obj


def _refuse(path: Path, names: list[str], detail: str) -> CheckpointError:
    listed = f" (it references {', '.join(names)})" if names else ""
    return CheckpointError(
        f"{path} cannot be loaded with torch.load(weights_only=True){listed}: {detail}. "
        "Unpickling it can run arbitrary code; if you trust this file, pass "
        "--allow-unsafe-pickle"
    )


def _load_with_placeholders(path: Path, first_error: Exception) -> dict[str, Any]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing itself is best effort
        names = []
    detail = str(first_error).splitlines()[0]
    safe = _safe_names()
    unknown = [n for n in names if n not in safe]
    if not unknown:
        raise _refuse(path, names, detail)
    stubs = [(type(n.rsplit(".", 1)[-1], (Opaque,), {"qualname": n}), n) for n in unknown]
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *stubs]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise _refuse(path, names, str(e).splitlines()[0]) from None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "model" or (key.startswith("model") and key[5:].isdigit()):
                if not isinstance(value, dict):
                    raise _refuse(path, unknown, f"'{key}' is a {type(value).__name__}")
                bad = [k for k, v in value.items() if not (v is None or torch.is_tensor(v)
                       or k.endswith("._extra_state"))]  # fmt: skip
                if bad:
                    raise _refuse(path, unknown, f"non-tensor entries in '{key}': {bad[:4]}")
    log.warning(
        "%s: read %s as opaque placeholders (metadata only; their code was not run)",
        path,
        ", ".join(unknown),
    )
    return obj


def model_chunks(obj: dict[str, Any], path: Path) -> list[dict[str, torch.Tensor]]:
    """The `model` dict, or `model0..modelK` in order (virtual pipeline stages)."""
    if "model" in obj:
        return [obj["model"]]
    chunks = []
    while f"model{len(chunks)}" in obj:
        chunks.append(obj[f"model{len(chunks)}"])
    if not chunks:
        raise CheckpointError(f"{path}: no 'model' or 'model0' entry")
    return chunks


def save_file(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
