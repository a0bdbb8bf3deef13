"""Layout-independent model and optimizer state dicts for DCP checkpoints.

Keys are the model's own (Hugging Face) names whatever the layout: FSDP / TP parameters stay
DTensors, so ``torch.distributed.checkpoint`` writes each rank's shards and reads them back
under any other mesh; wrapper prefixes (activation checkpointing, compile) are dropped; a
pipeline rank contributes only its stages' keys. Optimizer state is flattened to
``state.<param name>.<key>`` / ``param_groups.<param name>.<key>``, so it too is keyed by
parameter name and reshards the same way. Under pipeline parallelism each stage (model part)
has its own optimizer, as in torchtitan: an optimizer's state must map to one module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: a pipeline part owns only some of the checkpoint's keys.
    return StateDictOptions(
        flatten_optimizer_state_dict=True, strict=False, full_state_dict=full, cpu_offload=full
    )


def model_state_dict(parts: Sequence[nn.Module]) -> dict[str, Any]:
    """This rank's model state (sharded DTensors where parallelized), keyed by HF names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out: dict[str, Any] = {}
    for part in parts:
        out.update(get_model_state_dict(part, options=_options()))
    return out


def optimizer_state_dict(
    parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
) -> dict[str, Any]:
    """This rank's optimizer state, flattened and keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _check_pairs(parts, optimizers)
    out: dict[str, Any] = {}
    for part, opt in zip(parts, optimizers):
        out.update(get_optimizer_state_dict(part, opt, options=_options()))
    return out


def load_model_state_dict(parts: Sequence[nn.Module], state: dict[str, Any]) -> None:
    """Copy ``state`` (as filled by ``dcp.load``) into each part's own keys."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    for part in parts:
        own = get_keys(part)
        set_model_state_dict(part, {k: v for k, v in state.items() if k in own}, options=_options())


def load_optimizer_state_dict(
    parts: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    state: dict[str, Any],
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _check_pairs(parts, optimizers)
    for part, opt in zip(parts, optimizers):
        own = get_keys(part)
        mine = {k: v for k, v in state.items() if _param_of(k) in own}
        set_optimizer_state_dict(part, opt, mine, options=_options())


def get_keys(part: nn.Module) -> set[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return set(get_model_state_dict(part, options=_options()).keys())


def _param_of(key: str) -> str:
    """``state.model.layers.0.mlp.up_proj.weight.exp_avg`` -> the parameter name."""
    head, _, rest = key.partition(".")
    if head not in ("state", "param_groups"):
        return key
    return rest.rsplit(".", 1)[0]


def _check_pairs(parts, optimizers) -> None:
    if len(parts) != len(optimizers):
        raise ValueError(
            f"{len(parts)} model parts but {len(optimizers)} optimizers: under pipeline "
            "parallelism build one optimizer per stage (Pipeline.model_parts)"
        )
