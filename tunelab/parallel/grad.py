"""Gradient-norm clipping that sees the whole model, however it is split.

Under FSDP and TP the gradients are DTensors, and in a 2-D layout they live on different
meshes (TP-sharded weights on ``dp_shard x tp``, replicated ones on ``dp_shard`` only), so one
``torch.stack`` of their norms is impossible; under PP each rank holds only its stages. The
norm is therefore built from groups of gradients that share a mesh and placements, each
reduced to a full value, plus a sum over the pipeline ranks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def total_grad_norm(
    parameters: Iterable[torch.Tensor], pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The 2-norm of all gradients of the model (fp32 scalar, the same on every rank)."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    device = None
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        device = g.device
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups[key].append(g)
    squares = torch.zeros((), dtype=torch.float32, device=device or "cpu")
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares = squares + norm.float().to(squares.device) ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    return squares.sqrt()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
    norm_parameters: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before.

    ``norm_parameters`` (default: ``parameters``) are those the norm is computed over, e.g. a
    pipeline's :meth:`~tunelab.parallel.pipeline.Pipeline.norm_parameters`, which counts a
    tied embedding once although two stages hold a copy.
    A non-finite norm is returned as is (the trainer's NaN guard decides what to do) and the
    gradients are left untouched in that case.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(params if norm_parameters is None else norm_parameters, pp_group)
    if max_norm > 0 and torch.isfinite(norm):
        # torch's clip_grads_with_norm_ multiplies by a tensor, which DTensor gradients do
        # not accept mixed with plain ones; a Python float works for both.
        coef = min(1.0, float(max_norm) / (float(norm) + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
    return norm
