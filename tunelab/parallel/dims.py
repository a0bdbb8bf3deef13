"""Parallel degrees from the world size, checked against the model, and the one DeviceMesh.

Mesh axes, outermost first: ``pp``, ``dp_replicate``, ``dp_shard``, ``tp``. Every axis is
present (size 1 where unused) so callers can always say ``mesh["tp"]``; the data-parallel
axes are also flattened into ``dp`` (the group that splits data and sums token counts).
Keeping ``tp`` innermost puts tensor-parallel peers on the same node, where the bandwidth is.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")

# Megatron / MindSpeed names users know -> our key in the `parallel` section.
ALIASES = {
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "data_parallel_replicate": "dp_replicate",
    "data_parallel_shard": "dp_shard",
    "fsdp_size": "dp_shard",
    "pp_virtual_stages": "virtual_stages",
    "recompute": "activation_checkpointing",
}


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a config section given as a dataclass, namespace, dict or None.

    Megatron aliases are honoured too, so a plain dict from YAML works as well as the parsed
    dataclass (which has already mapped them).
    """
    if cfg is None:
        return default
    names = [key] + [alias for alias, ours in ALIASES.items() if ours == key]
    for name in names:
        if isinstance(cfg, dict):
            if name in cfg and cfg[name] is not None:
                return cfg[name]
        elif getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
    return default


@dataclass(frozen=True)
class ParallelDims:
    """Resolved parallel degrees; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def from_config(cls, parallel_cfg: Any, world_size: int) -> ParallelDims:
        """Resolve ``-1`` (fill with what the world size leaves) and check the product.

        At most one degree may be ``-1``; by default ``dp_shard`` is the one that fills.
        """
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        raw = {
            "dp_replicate": int(cfg_get(parallel_cfg, "dp_replicate", 1)),
            "dp_shard": int(cfg_get(parallel_cfg, "dp_shard", -1)),
            "tp": int(cfg_get(parallel_cfg, "tp", 1)),
            "pp": int(cfg_get(parallel_cfg, "pp", 1)),
        }
        for key, value in raw.items():
            if value == 0 or value < -1:
                raise ConfigError(
                    f"parallel.{key} = {value}: a parallel degree must be >= 1, or -1 to fill "
                    "the world size"
                )
        fill = [k for k, v in raw.items() if v == -1]
        if len(fill) > 1:
            raise ConfigError(
                f"parallel: only one degree may be -1 (fill), got {', '.join(fill)}; "
                "set all but one explicitly"
            )
        fixed = math.prod(v for v in raw.values() if v != -1)
        if fill:
            if world_size % fixed:
                raise ConfigError(
                    f"parallel.{fill[0]} = -1 cannot fill the world size {world_size}: the other "
                    f"degrees ({_layout({k: v for k, v in raw.items() if v != -1})}) multiply "
                    f"to {fixed}, which does not divide it; change them or the number of "
                    "processes"
                )
            raw[fill[0]] = world_size // fixed
        elif fixed != world_size:
            raise ConfigError(
                f"parallel: {_layout(raw)} multiply to {fixed} but {world_size} processes were "
                f"launched; make the product equal the world size (or set parallel.dp_shard = -1 "
                "to fill it)"
            )
        return cls(**raw)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas: how many ways each global batch is split."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def validate_model(
        self,
        *,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        vocab_size: int | None = None,
        num_layer_list: Sequence[int] | None = None,
        virtual_stages: int = 1,
    ) -> None:
        """Raise ConfigError when the model cannot be cut this way; names the key to change."""
        if self.tp > 1:
            for what, n in (
                ("num_attention_heads", num_heads),
                ("num_key_value_heads", num_kv_heads),
                ("intermediate_size", intermediate_size),
                ("hidden_size", hidden_size),
            ):
                if n is not None and n % self.tp:
                    raise ConfigError(
                        f"parallel.tp = {self.tp} does not divide the model's {what} ({n}); "
                        f"choose a tp that divides {what}"
                    )
            if vocab_size is not None and vocab_size % self.tp:
                raise ConfigError(
                    f"parallel.tp = {self.tp} does not divide the model's vocab_size "
                    f"({vocab_size}); choose a tp that divides it (or pad the vocabulary)"
                )
        stage_layer_counts(
            num_layers, self.pp, num_layer_list=num_layer_list, virtual_stages=virtual_stages
        )

    def check_model(self, model_cfg: Any, parallel_cfg: Any = None) -> None:
        """``validate_model`` with the sizes read from a ModelConfig and the parallel section."""
        self.validate_model(
            num_layers=model_cfg.num_hidden_layers,
            num_heads=model_cfg.num_attention_heads,
            num_kv_heads=model_cfg.num_key_value_heads,
            hidden_size=model_cfg.hidden_size,
            intermediate_size=model_cfg.intermediate_size,
            vocab_size=model_cfg.vocab_size,  # embedding and lm_head are vocabulary-parallel
            num_layer_list=cfg_get(parallel_cfg, "num_layer_list", None),
            virtual_stages=int(cfg_get(parallel_cfg, "virtual_stages", 1)),
        )

    def build_mesh(self, device_type: str):
        """Create the DeviceMesh (needs an initialized default process group)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs torch.distributed to be initialized first")
        if dist.get_world_size() != self.world_size:
            raise ConfigError(
                f"parallel layout {self} needs {self.world_size} processes, "
                f"{dist.get_world_size()} were launched"
            )
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)
        mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        logger.info("device mesh %s", dict(zip(MESH_AXES, shape)))
        return mesh


def dp_mesh(mesh):
    """The flattened data-parallel sub-mesh (all replicas that read different data)."""
    with warnings.catch_warnings():
        # torch announces that slicing a flattened axis from the root mesh will change; the
        # flattened axis is created by build_mesh and slicing it works in this torch.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh["dp"]


def dp_rank(mesh) -> int:
    """This process's index among data-parallel replicas: which slice of data it reads."""
    return 0 if mesh is None else dp_mesh(mesh).get_local_rank()


def dp_size(mesh) -> int:
    return 1 if mesh is None else mesh["dp_replicate"].size() * mesh["dp_shard"].size()


def dp_group(mesh):
    """Process group over which token counts and losses are summed (None on one device)."""
    if mesh is None or dp_size(mesh) == 1:
        return None
    return dp_mesh(mesh).get_group()


def fsdp_mesh(mesh, dims: ParallelDims):
    """Mesh for fully_shard: 1-D over dp_shard, or 2-D (replicate, shard) for HSDP."""
    if dims.dp_replicate > 1:
        return mesh[("dp_replicate", "dp_shard")]
    return mesh["dp_shard"]


def stage_layer_counts(
    num_layers: int,
    pp: int,
    *,
    num_layer_list: Sequence[int] | None = None,
    virtual_stages: int = 1,
) -> list[int]:
    """Layers per pipeline stage (pp * virtual_stages of them, in stage order)."""
    if virtual_stages < 1:
        raise ConfigError(f"parallel.virtual_stages must be >= 1, got {virtual_stages}")
    num_stages = pp * virtual_stages
    if num_layer_list:
        counts = [int(n) for n in num_layer_list]
        if len(counts) != num_stages:
            raise ConfigError(
                f"parallel.num_layer_list has {len(counts)} entries but there are {num_stages} "
                f"pipeline stages (pp = {pp} x virtual_stages = {virtual_stages}); give one "
                "layer count per stage"
            )
        if sum(counts) != num_layers:
            raise ConfigError(
                f"parallel.num_layer_list {counts} sums to {sum(counts)} but the model has "
                f"{num_layers} layers; the counts must add up to num_hidden_layers"
            )
        if min(counts) < 1:
            raise ConfigError(
                f"parallel.num_layer_list {counts}: every stage needs at least one layer"
            )
        return counts
    if num_stages > num_layers:
        raise ConfigError(
            f"parallel.pp = {pp} x virtual_stages = {virtual_stages} gives {num_stages} "
            f"pipeline stages but the model has only {num_layers} layers; use fewer stages"
        )
    if num_layers % num_stages:
        raise ConfigError(
            f"the model's {num_layers} layers do not split evenly over {num_stages} pipeline "
            f"stages (pp = {pp} x virtual_stages = {virtual_stages}); give an uneven split "
            "with parallel.num_layer_list (e.g. num_layer_list: [...]) or change pp"
        )
    return [num_layers // num_stages] * num_stages


def _layout(raw: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in raw.items())
