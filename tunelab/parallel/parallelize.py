"""Apply tensor parallel, activation checkpointing, torch.compile and FSDP2, in that order.

The order matters: TP replaces weights by DTensors sharded over ``tp``; checkpointing and
compile wrap each block as it then is; FSDP shards last, over the data-parallel axes, so a
2-D layout ends up with parameters sharded over both. Parameter names do not change
(``checkpoint_wrapper`` adds a prefix to ``named_parameters`` but strips it from
``state_dict``; ``Module.compile`` compiles in place), so checkpoints and adapters keep the
Hugging Face keys.

Gradient reduction: the trainer divides the summed loss by the global number of supervised
tokens (all data-parallel ranks and micro-batches), so gradients must be *summed* across
data-parallel ranks, not averaged; FSDP's divide factor is set to 1 on every sharded module,
with plain SUM collectives (gloo has no pre-multiplied sum).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.parallel.dims import cfg_get, dp_size

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(value: Any, key: str) -> torch.dtype | None:
    """A dtype from a config value (``"bf16"``, ``"float32"``, a torch.dtype or None)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(
            f"parallel.{key} = {value!r} is not a dtype; use one of bfloat16, float32, float16"
        )
    return _DTYPES[name]


def model_blocks(model: nn.Module) -> nn.ModuleDict:
    """The decoder blocks (``model.layers``, a ModuleDict keyed by global layer index)."""
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "model"):
        layers = getattr(model.model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(
            f"{type(model).__name__} has no `layers` ModuleDict; parallelize expects tunelab's "
            "Transformer (or a pipeline stage of it)"
        )
    return layers


def mixed_precision(parallel_cfg: Any = None, precision: str | None = None):
    """FSDP2 MixedPrecisionPolicy for ``train.precision`` (``parallel_cfg`` keys win).

    ``bf16-mixed``: fp32 parameters, all-gathered and computed in bf16, gradients reduced in
    fp32 (FSDP's form of autocast). ``fp32`` and ``bf16``: compute in the parameters' own
    dtype. Gradients are always reduced in fp32: summing bf16 over many ranks loses bits.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    default_param = torch.bfloat16 if precision == "bf16-mixed" else None
    param = cfg_get(parallel_cfg, "param_dtype", default_param)
    reduce = cfg_get(parallel_cfg, "reduce_dtype", torch.float32)
    return MixedPrecisionPolicy(
        param_dtype=parse_dtype(param, "param_dtype"),
        reduce_dtype=parse_dtype(reduce, "reduce_dtype"),
    )


def parallelize(
    model: nn.Module, parallel_cfg: Any = None, mesh=None, *, precision: str | None = None
) -> nn.Module:
    """Prepare ``model`` (in place) for training under ``mesh``; returns the same module.

    ``mesh=None`` means one device: only activation checkpointing and compile apply.
    Keys read from ``parallel_cfg`` (the ``parallel`` config section, a dataclass, namespace
    or dict): ``activation_checkpointing``, ``compile``, ``sequence_parallel`` (default
    true), optionally ``param_dtype`` / ``reduce_dtype`` and ``reshard_after_forward``
    (default true; pipeline stages use false). ``precision`` is ``train.precision``; it picks
    the FSDP mixed-precision policy (see :func:`mixed_precision`).
    Apply LoRA before calling this (wrapper prefixes would hide the target names).
    """
    tp_size = 1 if mesh is None else mesh["tp"].size()
    check_options(parallel_cfg, tp_size)
    if tp_size > 1:
        from tunelab.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(
            model,
            mesh["tp"],
            sequence_parallel=bool(cfg_get(parallel_cfg, "sequence_parallel", True)),
        )
    if _truthy(cfg_get(parallel_cfg, "activation_checkpointing", False)):
        apply_activation_checkpointing(model)
    if _truthy(cfg_get(parallel_cfg, "compile", False)):
        apply_compile(model)
    if mesh is not None and dp_size(mesh) > 1:
        apply_fsdp(model, mesh, mixed_precision(parallel_cfg, precision), parallel_cfg)
    return model


def check_options(parallel_cfg: Any, tp_size: int) -> None:
    """Refuse combinations that torch cannot run, before anything is changed."""
    if tp_size > 1 and _truthy(cfg_get(parallel_cfg, "compile", False)):
        # Seen with torch 2.13 (gloo, CPU): dynamo fails to trace the tensor-parallel blocks
        # (DTensor mesh as a fake script object; `_local_tensor` on a plain tensor).
        raise ConfigError(
            "parallel.compile = true with parallel.tp > 1 is not supported: torch.compile "
            "fails on the tensor-parallel blocks in this torch version; set parallel.compile: "
            "false, or use compile with FSDP / pipeline parallel only (tp: 1)"
        )


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model_blocks(model)
    for name in list(blocks.keys()):
        # preserve_rng_state keeps dropout (e.g. LoRA dropout) identical in the recompute.
        blocks[name] = checkpoint_wrapper(blocks[name], preserve_rng_state=True)
    logger.info("activation checkpointing on %d blocks", len(blocks))


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: small graphs, reused across identical blocks."""
    blocks = model_blocks(model)
    for block in blocks.values():
        block.compile(fullgraph=False)
    logger.info("torch.compile on %d blocks", len(blocks))


def apply_fsdp(model: nn.Module, mesh, mp, parallel_cfg: Any = None) -> None:
    """FSDP2 ``fully_shard`` on every block, then on the root (embeddings, norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    from tunelab.parallel.dims import ParallelDims, fsdp_mesh

    dims = ParallelDims(
        dp_replicate=mesh["dp_replicate"].size(),
        dp_shard=mesh["dp_shard"].size(),
        tp=mesh["tp"].size(),
        pp=mesh["pp"].size(),
    )
    shard_mesh = fsdp_mesh(mesh, dims)
    reshard = bool(cfg_get(parallel_cfg, "reshard_after_forward", True))
    blocks = model_blocks(model)
    sharded = []
    for block in blocks.values():
        fully_shard(block, mesh=shard_mesh, mp_policy=mp, reshard_after_forward=reshard)
        sharded.append(block)
    # The root owns what is left (embeddings, final norm, lm_head: tied weights stay together);
    # it is needed right after the last block, so resharding it after forward only costs.
    fully_shard(model, mesh=shard_mesh, mp_policy=mp, reshard_after_forward=False)
    sharded.append(model)
    for module in sharded:
        # Sum, not average: with factor 1 a plain SUM collective is exact on every backend
        # (gloo has no PREMUL_SUM, which the divide factor would otherwise use).
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    logger.info(
        "FSDP2 over %s (%d ranks), param %s, reduce %s",
        "dp_replicate x dp_shard" if dims.dp_replicate > 1 else "dp_shard",
        dims.dp_size,
        mp.param_dtype or "as stored",
        mp.reduce_dtype,
    )


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (False) or do (True) FSDP's reduce-scatter in the next backward.

    Turning it off for all but the last micro-batch of an accumulation step saves
    communication; gradients stay unsharded and local until the last one.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "none", "off")
    return bool(value)
