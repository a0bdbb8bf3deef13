"""One optimizer step's forward and backward, the same call with or without pipelining.

The trainer hands over the step's micro-batches (this data-parallel rank's share of the
global batch) and the global number of supervised tokens; the loss of every micro-batch is
its summed token loss divided by that count, so accumulated gradients equal one big batch's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import DataError
from tunelab.parallel.pipeline import Pipeline


def _stack_for_pipeline(pipe: Pipeline, micro_batches) -> dict[str, torch.Tensor]:
    shapes = {tuple(mb["input_ids"].shape) for mb in micro_batches}
    if len(shapes) > 1:
        raise DataError(
            f"pipeline parallel needs equally shaped micro-batches, got {sorted(shapes)}; "
            "pack the data or pad every batch to seq_length (data.pad_to_multiple_of)"
        )
    if len(micro_batches) != pipe.n_microbatches:
        raise ValueError(
            f"the pipeline was built for {pipe.n_microbatches} micro-batches, "
            f"got {len(micro_batches)}"
        )
    return {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


def forward_backward(
    model: nn.Module | Pipeline,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    num_tokens_global: float | torch.Tensor,
) -> torch.Tensor:
    """Accumulate gradients over ``micro_batches``; return this rank's share of the loss.

    Each batch holds ``input_ids``, ``labels`` and optionally ``position_ids`` [B, S]. With a
    :class:`Pipeline` the micro-batches are stacked and the schedule splits them again (they
    must then have the same shape); only the last stage's share is non-zero. Sum the result
    with :func:`global_loss` for the step's loss.
    """
    n = float(num_tokens_global)
    if n <= 0:
        n = 1.0  # a step without supervised tokens: zero loss, zero gradients
    if isinstance(model, Pipeline):
        cat = _stack_for_pipeline(model, micro_batches)
        return model.step(cat["input_ids"], cat["labels"], cat.get("position_ids"), n)
    total = None
    for mb in micro_batches:
        loss_sum, _ = model.loss(mb["input_ids"], mb["labels"], mb.get("position_ids"))
        loss = loss_sum / n
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total.float()


@torch.no_grad()
def evaluate(
    model: nn.Module | Pipeline,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    num_tokens_global: float | torch.Tensor,
) -> torch.Tensor:
    """Forward only: this rank's share of the normalized loss, as :func:`forward_backward`."""
    n = max(float(num_tokens_global), 1.0)
    if isinstance(model, Pipeline):
        cat = _stack_for_pipeline(model, micro_batches)
        out = model.eval_step(cat["input_ids"], cat["labels"], cat.get("position_ids"), n)
        for part in model.model_parts:
            reshard(part)
        return out
    total = torch.zeros((), dtype=torch.float32)
    for mb in micro_batches:
        loss_sum, _ = model.loss(mb["input_ids"], mb["labels"], mb.get("position_ids"))
        total = total + loss_sum.detach().float().cpu() / n
    reshard(model)
    return total


def reshard(model: nn.Module) -> None:
    """Free FSDP's gathered parameters after a forward without backward.

    Modules kept gathered after forward (the root, pipeline stages) would otherwise keep
    their full (and, with mixed precision, low-precision) parameters registered, which a
    following state-dict read or optimizer step would see instead of the shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def global_loss(local: torch.Tensor, mesh) -> torch.Tensor:
    """Sum a per-rank loss share over data-parallel and pipeline ranks (not over tp, whose
    ranks all hold the same value)."""
    from tunelab.parallel.dims import dp_group

    out = local.detach().clone().float()
    if mesh is None:
        return out
    groups = [dp_group(mesh)]
    if mesh["pp"].size() > 1:
        groups.append(mesh["pp"].get_group())
    for group in groups:
        if group is not None:
            dist.all_reduce(out, group=group)
    return out


def global_count(count: int | torch.Tensor, mesh, device=None) -> torch.Tensor:
    """All-reduce a supervised-token count over the data-parallel ranks (float64 on
    ``device``: NCCL needs it on the GPU)."""
    from tunelab.parallel.dims import dp_group

    t = torch.as_tensor(count, dtype=torch.float64, device=device).clone()
    group = None if mesh is None else dp_group(mesh)
    if group is not None:
        dist.all_reduce(t, group=group)
    return t
