"""MindSpeed-style LoRA checkpoints (Megatron layout) merged into base weights per TP shard.

A MindSpeed LoRA run saves the same directory tree as its base checkpoint; the adapter keys
are ``<module>.lora_A.default.weight`` / ``<module>.lora_B.default.weight`` (reference 5).
Column-parallel bases (linear_qkv, linear_fc1) hold a full A [r, in] and a row shard of
B [out/tp, r]; row-parallel bases (linear_proj, linear_fc2) a column shard of A [r, in/tp]
and a full B [out, r]. Either way the shard update is W_rank += B_file @ A_file * alpha / r,
which is what peft's merge does on each rank.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from tunelab.convert.mcore_io import McoreCheckpoint, find_checkpoint, load_file, model_chunks
from tunelab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MCORE_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# Megatron legacy and HF spellings users pass in --lora-target-modules (the seeds use legacy).
_TARGET_ALIASES = {
    "query_key_value": "linear_qkv",
    "dense": "linear_proj",
    "dense_h_to_4h": "linear_fc1",
    "dense_4h_to_h": "linear_fc2",
    "q_proj": "linear_qkv",
    "k_proj": "linear_qkv",
    "v_proj": "linear_qkv",
    "o_proj": "linear_proj",
    "gate_proj": "linear_fc1",
    "up_proj": "linear_fc1",
    "down_proj": "linear_fc2",
}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def normalize_targets(names: list[str] | None) -> set[str] | None:
    if not names:
        return None
    out = set()
    for raw in names:
        for n in re.split(r"[,\s]+", raw.strip()):
            if not n:
                continue
            mapped = _TARGET_ALIASES.get(n, n)
            if mapped not in MCORE_TARGETS:
                raise ConfigError(
                    f"--lora-target-modules {n!r} is not a Megatron mcore linear; use "
                    f"{' '.join(MCORE_TARGETS)} (or legacy query_key_value dense "
                    "dense_h_to_4h dense_4h_to_h)"
                )
            out.add(mapped)
    return out


@dataclass
class McoreLora:
    """A MindSpeed LoRA checkpoint to fold into a base Megatron checkpoint of the same layout."""

    ckpt: McoreCheckpoint
    r: int
    alpha: float
    targets: set[str] | None
    allow_unsafe_pickle: bool = False
    merged_modules: set[str] = field(default_factory=set)

    @classmethod
    def open(
        cls,
        lora_dir,
        base: McoreCheckpoint,
        r: int | None,
        alpha: float | None,
        targets: list[str] | None,
        allow_unsafe_pickle: bool = False,
    ) -> McoreLora:
        ckpt = find_checkpoint(lora_dir)
        if (ckpt.tp, ckpt.pp) != (base.tp, base.pp):
            raise CheckpointError(
                f"{lora_dir}: LoRA checkpoint has TP={ckpt.tp} PP={ckpt.pp} but the base "
                f"{base.iter_dir} has TP={base.tp} PP={base.pp}; they must match (the LoRA run "
                "trained on that layout)"
            )
        args = load_file(ckpt.file(0, 0), allow_unsafe_pickle).get("args")
        ck_r, ck_alpha = getattr(args, "lora_r", None), getattr(args, "lora_alpha", None)
        if r is None:
            r = int(ck_r) if ck_r else 16
        if alpha is None:
            alpha = float(ck_alpha) if ck_alpha else 32.0
        if ck_r and int(ck_r) != r or ck_alpha and float(ck_alpha) != alpha:
            raise ConfigError(
                f"--lora-r {r} --lora-alpha {alpha:g} differ from the values the LoRA run saved "
                f"in its args (lora_r={ck_r}, lora_alpha={ck_alpha}); pass the training values"
            )
        return cls(ckpt, r, alpha, normalize_targets(targets), allow_unsafe_pickle)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def merge(
        self, base: dict[str, torch.Tensor], tp_rank: int, pp_rank: int, vchunk: int
    ) -> dict[str, torch.Tensor]:
        """``base`` (one rank's model chunk, `base_layer.` already dropped) with LoRA folded in."""
        path = self.ckpt.file(tp_rank, pp_rank)
        chunks = model_chunks(load_file(path, self.allow_unsafe_pickle), path)
        if vchunk >= len(chunks):
            raise CheckpointError(f"{path}: has {len(chunks)} model chunks, base has more")
        out = dict(base)
        halves: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in chunks[vchunk].items():
            if key.endswith("._extra_state"):
                continue
            m = _LORA_KEY.match(key)
            if m:
                halves.setdefault(m["module"], {})[m["ab"]] = t
                continue
            plain = key.replace(".base_layer.", ".")
            if plain not in out:
                raise CheckpointError(f"{path}: {key} has no counterpart in the base checkpoint")
            out[plain] = t  # MindSpeed loads the LoRA checkpoint on top of the base
        for module, ab in halves.items():
            kind = module.rsplit(".", 1)[-1]
            if self.targets is not None and kind not in self.targets:
                raise ConfigError(
                    f"{path}: holds LoRA weights for {module} but --lora-target-modules "
                    f"does not name {kind}; pass the target modules the LoRA run used"
                )
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{path}: {module} has lora_{''.join(ab)} only")
            a, b = ab["A"], ab["B"]
            if a.shape[0] != self.r:
                raise ConfigError(
                    f"{path}: {module}.lora_A has rank {a.shape[0]} but --lora-r is {self.r}"
                )
            wkey = f"{module}.weight"
            w = out.get(wkey)
            if w is None:
                raise CheckpointError(f"{path}: base has no {wkey} for LoRA module {module}")
            if tuple(w.shape) != (b.shape[0], a.shape[1]):
                raise CheckpointError(
                    f"{path}: {module}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} does "
                    f"not match the base shard {tuple(w.shape)}"
                )
            delta = (b.float() @ a.float()) * self.scaling
            out[wkey] = (w.float() + delta).to(w.dtype)
            self.merged_modules.add(kind)
        return out

    def check_done(self) -> None:
        if self.targets is not None:
            missing = self.targets - self.merged_modules
            if missing:
                log.warning(
                    "--lora-target-modules names %s but the LoRA checkpoint has no weights for "
                    "them",
                    ", ".join(sorted(missing)),
                )
        if not self.merged_modules:
            raise CheckpointError(f"{self.ckpt.iter_dir}: no lora_A / lora_B weights found")
