"""Initialization from scratch (pretraining, the demo): seedable scaled-normal init.

Every linear and embedding weight is drawn from N(0, std); the projections that write into
the residual stream (``o_proj``, ``down_proj``) use ``std / sqrt(2 * num_layers)`` (GPT-2 /
Megatron's scaled init) so the residual variance does not grow with depth. Biases are zero,
norm weights one. Values are drawn on the CPU from a seeded generator in a fixed parameter
order, so the same seed gives the same model on any device, with any dtype and under any
sharding (DTensor parameters receive their local part of the same full tensor).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.model.transformer import RMSNorm, Transformer

_RESIDUAL_OUT = ("o_proj", "down_proj")


@torch.no_grad()
def init_weights(model: Transformer, seed: int = 0, std: float | None = None) -> Transformer:
    """Initialize ``model`` in place (also a model materialized from ``meta`` by
    ``to_empty``); returns it. ``std`` defaults to ``config.initializer_range``."""
    cfg = model.config
    std = cfg.initializer_range if std is None else float(std)
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def normal_(p: torch.Tensor, s: float) -> None:
        full = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, s, generator=gen)
        if hasattr(p, "device_mesh"):  # a DTensor (FSDP / TP sharded): keep this rank's part
            from torch.distributed.tensor import distribute_tensor

            mesh = p.device_mesh
            full = full.to(device=mesh.device_type, dtype=p.dtype)
            # Every rank drew the same values from the same seed: no communication needed.
            p.copy_(distribute_tensor(full, mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(full)

    done: set[int] = set()  # a tied weight is initialized once (as the embedding)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.Linear):
            if id(module.weight) not in done:
                leaf = name.rsplit(".", 1)[-1]
                normal_(module.weight, out_std if leaf in _RESIDUAL_OUT else std)
                done.add(id(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    return model


def build_from_scratch(cfg, seed: int = 0, dtype=torch.float32, device="cpu", attn_backend="sdpa"):
    """A freshly initialized :class:`Transformer` for ``cfg`` (built on meta, no double
    allocation)."""
    with torch.device("meta"):
        model = Transformer(cfg, attn_backend=attn_backend).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    return init_weights(model, seed)
