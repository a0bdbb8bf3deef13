"""Vocabulary-parallel output head and loss for tensor parallelism.

``lm_head.weight`` is sharded over the vocabulary (``Shard(0)`` on the tp mesh), so each tp
rank holds ``V / tp`` rows and never the full matrix, its gradient or its optimizer state.
The chunked cross-entropy is computed without gathering logits: per chunk of tokens each rank
forms its ``[chunk, V / tp]`` logits, and the log-sum-exp and the target logit are completed
with all-reduces over the tp group (max, then sum of exponentials and target logit). The
hidden-state gradient is a sum over vocabulary shards, reduced once at the end.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tunelab.model.loss import IGNORE_INDEX, ChunkedCE, default_chunk_size


class _VocabParallelCE(ChunkedCE):
    num_extra_inputs = 5  # targets, vocab_start, chunk_size, group, compute_grad

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, chunk_size, group, compute_grad):
        keep, h, t = ChunkedCE.select(hidden, targets, IGNORE_INDEX)
        local_t = t - vocab_start
        mine = (local_t >= 0) & (local_t < weight.shape[0])
        local_t = local_t.clamp(0, weight.shape[0] - 1)
        loss, grad_h, grad_w = ChunkedCE.buffers(ctx, h, weight, compute_grad)
        for s in range(0, h.shape[0], chunk_size):
            hc, tc, mc = (
                h[s : s + chunk_size],
                local_t[s : s + chunk_size],
                mine[s : s + chunk_size],
            )
            logits = (hc @ weight.t()).float()  # [c, V / tp]
            # The target's raw logit, from the one rank that holds its row.
            target = torch.where(mc, logits.gather(1, tc[:, None]).squeeze(1), 0.0)
            m = logits.max(dim=-1).values
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            exp = logits.sub_(m[:, None]).exp_()  # logits buffer reused
            sums = torch.stack([exp.sum(dim=-1), target])  # [2, c]: one all-reduce for both
            dist.all_reduce(sums, group=group)
            loss += (m + sums[0].log() - sums[1]).sum()  # log-sum-exp - target logit
            if grad_h is None and grad_w is None:
                continue
            g = exp.div_(sums[0][:, None])  # softmax over the whole vocabulary, local columns
            rows = torch.nonzero(mc, as_tuple=False).flatten()
            g[rows, tc[rows]] -= 1.0
            ChunkedCE.accumulate(g, hc, weight, grad_h, grad_w, s)
        if grad_h is not None:
            dist.all_reduce(grad_h, group=group)  # each shard contributes its vocabulary part
        return ChunkedCE.finish(ctx, keep, grad_h, grad_w, hidden, weight, loss)


def _vocab_start(weight, vocab_size: int) -> int:
    """First vocabulary row of this rank's shard (torch.chunk sizes, as Shard(0) uses)."""
    mesh = weight.device_mesh
    dim = mesh.mesh_dim_names.index("tp") if mesh.mesh_dim_names else 0
    rank, size = mesh.get_local_rank(dim), mesh.size(dim)
    return rank * math.ceil(vocab_size / size)


def _head_forward(self, x, targets=None, chunk_size=None):
    """LMHead.forward for a vocabulary-sharded weight (bound to the module)."""
    from torch.distributed.tensor import DTensor

    weight = self.weight
    if not isinstance(weight, DTensor):  # not sharded (e.g. outside the mesh): plain path
        return type(self).forward(self, x, targets, chunk_size)
    if targets is None:
        return F.linear(x, weight.full_tensor())
    tp_mesh = weight.device_mesh
    if tp_mesh.ndim > 1:
        tp_mesh = tp_mesh["tp"]
    local = weight.to_local()
    h = x.reshape(-1, x.shape[-1])
    t = targets.reshape(-1).to(torch.long)
    chunk = int(chunk_size or default_chunk_size(local.shape[0]))
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or local.requires_grad)
    start = _vocab_start(weight, self.out_features)
    return _VocabParallelCE.apply(h, local, t, start, chunk, tp_mesh.get_group(), compute_grad)


def shard_lm_head(lm_head: nn.Module, tp_mesh) -> None:
    """Shard ``lm_head.weight`` over the vocabulary (unless already a DTensor, e.g. the tied
    embedding's) and make its loss vocabulary-parallel."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    w = lm_head.weight
    if not isinstance(w, DTensor):
        lm_head.weight = nn.Parameter(
            distribute_tensor(w, tp_mesh, [Shard(0)]), requires_grad=w.requires_grad
        )
    lm_head.forward = types.MethodType(_head_forward, lm_head)
