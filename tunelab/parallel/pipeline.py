"""Pipeline parallelism with ``torch.distributed.pipelining``: stage split and schedules.

A stage is a copy of the Transformer that keeps only its layers (global names kept, since
``model.layers`` is a ModuleDict keyed by layer index) and sets ``model.embed_tokens`` (all
but the first stage), ``model.norm`` and ``lm_head`` (all but the last) to None; the model's
forward then takes / returns hidden states. With ``virtual_stages = v`` each rank holds v
stages, stage ``s`` on pp rank ``s % pp`` (the looped placement interleaved schedules need).

The last stage computes the chunked loss inside its forward (labels are passed to every stage
as a keyword argument and ignored where there is no ``lm_head``), so full-vocabulary logits
are never materialized; the schedule's loss function divides the summed loss by the global
number of supervised tokens, and the schedule's own 1/n_microbatches gradient scaling is off.
Build the full model on the ``meta`` device when it is large: splitting copies it.

Tied embeddings (``tie_word_embeddings``): the first stage's embedding and the last stage's
``lm_head`` are two copies of one matrix, kept equal by summing their gradients after each
step (Megatron does the same); clip with :meth:`Pipeline.norm_parameters` so it counts once.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.parallel.dims import cfg_get, stage_layer_counts

logger = logging.getLogger(__name__)

SCHEDULE_ALIASES = {
    "1f1b": "1F1B",
    "gpipe": "GPipe",
    "interleaved1f1b": "Interleaved1F1B",
    "interleaved_1f1b": "Interleaved1F1B",
    "loopedbfs": "LoopedBFS",
    "interleavedzerobubble": "InterleavedZeroBubble",
}


def stage_ids(pp_rank: int, pp_size: int, virtual_stages: int = 1) -> list[int]:
    """Stages held by ``pp_rank``: rank r holds r, r + pp, r + 2 pp, ... (looped placement)."""
    return [pp_rank + k * pp_size for k in range(virtual_stages)]


def split_stage(model: nn.Module, stage: int, layer_counts: list[int]) -> nn.Module:
    """A copy of ``model`` that keeps only what pipeline stage ``stage`` owns."""
    num_stages = len(layer_counts)
    names = list(model.model.layers.keys())
    if len(names) != sum(layer_counts):
        raise ConfigError(
            f"parallel.num_layer_list {layer_counts} covers {sum(layer_counts)} layers but the "
            f"model has {len(names)}"
        )
    start = sum(layer_counts[:stage])
    keep = set(names[start : start + layer_counts[stage]])
    # Copy without the layers this stage drops: a deepcopy of everything would briefly hold
    # the whole model once per stage.
    layers = model.model.layers
    memo = {id(layers[n]): None for n in names if n not in keep}
    part = copy.deepcopy(model, memo)
    for name in names:
        if name not in keep:
            del part.model.layers[name]
    if stage != 0:
        part.model.embed_tokens = None
    if stage != num_stages - 1:
        part.model.norm = None
        part.lm_head = None
    return part


class TokenNormalizedLoss:
    """Loss function for the schedule: the stage's summed loss / global supervised tokens.

    The last stage returns ``(loss_sum, num_tokens)``; ``num_tokens_global`` is set before
    each step (the count over all micro-batches and data-parallel ranks).
    """

    def __init__(self) -> None:
        self.num_tokens_global: float = 1.0

    def __call__(self, output, target=None) -> torch.Tensor:
        loss_sum = output[0] if isinstance(output, tuple | list) else output
        return loss_sum / self.num_tokens_global


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them."""

    schedule: Any
    stages: list
    model_parts: list[nn.Module]
    loss_fn: TokenNormalizedLoss
    n_microbatches: int
    stage_indices: list[int] = field(default_factory=list)
    tied_params: list[torch.Tensor] = field(default_factory=list)
    tied_group: Any = None

    def parameters(self):
        """All parameters of this rank's stages (for the optimizer)."""
        for part in self.model_parts:
            yield from part.parameters()

    def norm_parameters(self):
        """Parameters for the gradient norm: a tied lm_head copy is left out (its gradient
        equals the embedding's after the sync, and the matrix counts once)."""
        skip = {id(p) for part in self.model_parts if part.lm_head is not None
                for p in [part.lm_head.weight] if any(p is t for t in self.tied_params)}  # fmt: skip
        for p in self.parameters():
            if id(p) not in skip:
                yield p

    def _sync_tied_grads(self) -> None:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        if self.tied_group is None:
            return
        for p in self.tied_params:
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(g, group=self.tied_group)

    @property
    def has_first_stage(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last_stage(self) -> bool:
        return any(s.is_last for s in self.stages)

    def _run(self, run, input_ids, labels, position_ids, num_tokens_global) -> torch.Tensor:
        if input_ids.shape[0] % self.n_microbatches:
            raise ConfigError(
                f"the pipeline splits each batch of {input_ids.shape[0]} rows into "
                f"{self.n_microbatches} micro-batches; make the per-rank batch a multiple of "
                "the number of micro-batches"
            )
        self.loss_fn.num_tokens_global = float(num_tokens_global)
        args = (input_ids,) if self.has_first_stage else ()
        kwargs = {"labels": labels}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        losses: list[torch.Tensor] = []
        target = labels if self.has_last_stage else None
        run(*args, target=target, losses=losses, **kwargs)
        if not losses:
            return torch.zeros((), dtype=torch.float32, device=labels.device)
        return torch.stack([x.detach().float() for x in losses]).sum()

    def step(self, input_ids, labels, position_ids, num_tokens_global) -> torch.Tensor:
        """Forward and backward over all micro-batches; gradients accumulate in the stages.

        Returns this rank's part of the normalized loss (zero except on the last stage);
        sum it over the pipeline and data-parallel ranks for the step's loss.
        """
        loss = self._run(
            lambda *a, **k: self.schedule.step(*a, return_outputs=False, **k),
            input_ids,
            labels,
            position_ids,
            num_tokens_global,
        )
        self._sync_tied_grads()
        return loss

    def eval_step(self, input_ids, labels, position_ids, num_tokens_global) -> torch.Tensor:
        """Forward only (no gradients); same return value as :meth:`step`."""
        with torch.no_grad():
            return self._run(
                # The last stage returns scalars (loss sum, count): nothing to merge.
                lambda *a, **k: self.schedule.eval(*a, return_outputs=False, **k),
                input_ids,
                labels,
                position_ids,
                num_tokens_global,
            )


def resolve_schedule(name: str | None, virtual_stages: int):
    """The torch schedule class for a config name; its looped (interleaved) counterpart when
    there are several virtual stages per rank."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    if not name:
        name = "Interleaved1F1B" if virtual_stages > 1 else "1F1B"
    canonical = SCHEDULE_ALIASES.get(str(name).replace("-", "").lower(), name)
    try:
        cls = get_schedule_class(canonical)
    except ValueError as e:
        raise ConfigError(
            f"parallel.pp_schedule = {name!r} is not a pipeline schedule; use 1F1B, GPipe, "
            "Interleaved1F1B (with virtual_stages > 1), LoopedBFS or InterleavedZeroBubble"
        ) from e
    single = issubclass(cls, PipelineScheduleSingle)
    if single and virtual_stages > 1:
        # The looped counterpart of a one-stage-per-rank schedule.
        looped = "LoopedBFS" if canonical == "GPipe" else "Interleaved1F1B"
        logger.info(
            "parallel.virtual_stages = %d: running %s instead of %s", virtual_stages, looped, name
        )
        return get_schedule_class(looped)
    if not single and virtual_stages == 1:
        raise ConfigError(
            f"parallel.pp_schedule = {name!r} needs several stages per rank; set "
            "virtual_stages > 1 or use 1F1B / GPipe"
        )
    return cls


def build_pipeline(
    model: nn.Module,
    mesh,
    parallel_cfg: Any,
    n_microbatches: int,
    device: torch.device | str | None = None,
    *,
    precision: str | None = None,
    init_part: Callable[[nn.Module], None] | None = None,
) -> Pipeline:
    """Split ``model`` into this rank's stages, parallelize each over the other mesh axes
    (TP, AC, compile, FSDP as :func:`parallelize` does) and build the schedule.

    ``n_microbatches`` is how many micro-batches each step's per-rank batch is cut into
    (usually the gradient-accumulation count). ``model`` itself is left untouched.

    For a large model pass it on the ``meta`` device together with ``init_part``, which
    materializes one stage in place before it is parallelized, e.g.
    ``lambda part: (part.to_empty(device=dev), load_weights(part, hf_dir, strict=False))``:
    each rank then only ever allocates its own stages.
    """
    from torch.distributed.pipelining import PipelineStage

    from tunelab.parallel.parallelize import parallelize

    pp_mesh = mesh["pp"]
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    virtual = int(cfg_get(parallel_cfg, "virtual_stages", 1))
    schedule_cls = resolve_schedule(cfg_get(parallel_cfg, "pp_schedule", None), virtual)
    counts = stage_layer_counts(
        len(model.model.layers),
        pp_size,
        num_layer_list=cfg_get(parallel_cfg, "num_layer_list", None),
        virtual_stages=virtual,
    )
    if n_microbatches < pp_size:
        logger.warning(
            "%d micro-batches for %d pipeline stages: most of the pipeline stays idle; use at "
            "least as many micro-batches (gradient accumulation steps) as pp",
            n_microbatches,
            pp_size,
        )
    device = torch.device(device or mesh.device_type)
    num_stages = len(counts)
    # Pipeline stages keep parameters gathered between micro-batches unless told otherwise.
    stage_cfg = _with_default(parallel_cfg, "reshard_after_forward", False)
    parts, stages, ids = [], [], stage_ids(pp_rank, pp_size, virtual)
    for stage in ids:
        part = split_stage(model, stage, counts)
        if init_part is not None:
            init_part(part)
        parallelize(part, stage_cfg, mesh, precision=precision)
        parts.append(part)
        stages.append(PipelineStage(part, stage, num_stages, device, group=pp_mesh.get_group()))
    tied_params, tied_group = [], None
    if getattr(model.config, "tie_word_embeddings", False):
        # The first stage's embedding and the last stage's lm_head are copies of one matrix:
        # their gradients are summed after every step so the copies stay equal.
        tied_group = _first_last_group(mesh)
        for part, stage in zip(parts, ids):
            if stage == 0:
                tied_params.append(part.model.embed_tokens.weight)
            if stage == num_stages - 1:
                tied_params.append(part.lm_head.weight)
    loss_fn = TokenNormalizedLoss()
    schedule = schedule_cls(
        stages if virtual > 1 else stages[0],
        n_microbatches=n_microbatches,
        loss_fn=loss_fn,
        scale_grads=False,
    )
    logger.info(
        "pipeline: %d stages (layers %s), rank %d holds stages %s, schedule %s, %d micro-batches",
        num_stages,
        counts,
        pp_rank,
        ids,
        schedule_cls.__name__,
        n_microbatches,
    )
    return Pipeline(schedule, stages, parts, loss_fn, n_microbatches, ids, tied_params, tied_group)


def _first_last_group(mesh):
    """Process group of the first and last pipeline rank that share all other coordinates
    (every rank must create every group; middle ranks get None)."""
    import torch.distributed as dist

    if mesh["pp"].size() == 2:
        return mesh["pp"].get_group()
    ranks = mesh.mesh  # [pp, dp_replicate, dp_shard, tp] global ranks
    mine = None
    for first, last in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()):
        group = dist.new_group([first, last])
        if dist.get_rank() in (first, last):
            mine = group
    return mine


class _Overlay:
    """A read-only view of a config section with some keys defaulted differently."""

    def __init__(self, base: Any, defaults: dict[str, Any]) -> None:
        self._base, self._defaults = base, defaults

    def __getattr__(self, key: str) -> Any:
        value = cfg_get(self._base, key, None)
        return self._defaults.get(key) if value is None else value


def _with_default(cfg: Any, key: str, value: Any) -> Any:
    return _Overlay(cfg, {key: value})
