"""Cross-entropy over the output head that never materializes full-vocabulary fp32 logits.

:func:`linear_cross_entropy` computes ``sum CE(hidden @ weight.T, targets)`` chunk by chunk
over tokens: each chunk's logits ``[chunk, V]`` are formed, reduced to a loss and, when a
gradient is needed, immediately turned into that chunk's gradients w.r.t. hidden and weight.
Peak extra memory is therefore one chunk of logits (plus the gradient buffers, which autograd
would hold anyway), not ``[tokens, V]``. Tokens whose target is ``ignore_index`` are dropped
before any matmul. The result is ``(loss_sum fp32 scalar, num_tokens int64 scalar)`` so callers
can normalize over a global batch.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def shift_labels(
    labels: torch.Tensor, position_ids: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Targets for next-token prediction: ``targets[:, t] = labels[:, t + 1]``.

    The last position has no target; with packed ``position_ids`` a target that belongs to the
    next document (``position_ids[:, t + 1] == 0``) is ignored too.
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        crosses = position_ids[:, 1:] == 0
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, ignore_index)
    return targets


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk of fp32 logits is about 256 MiB."""
    return int(min(8192, max(128, (1 << 26) // max(1, vocab_size))))


class ChunkedCE(torch.autograd.Function):
    """The frame shared by the chunked cross-entropies (this one and the vocabulary-parallel
    one in ``tunelab.parallel.vocab_parallel``).

    ``forward`` drops ignored tokens (``select``), allocates the gradient buffers
    (``buffers``), and for each chunk computes the loss and ``g = dCE/dlogits`` in its own way,
    handing ``g`` to ``accumulate``; ``finish`` saves what ``backward`` needs. ``backward``
    scales the saved gradients by the incoming one and scatters the hidden gradient back to
    every token (zero for ignored ones). Subclasses list their extra forward inputs in
    ``num_extra_inputs`` (everything after hidden and weight).
    """

    num_extra_inputs = 0

    @staticmethod
    def select(hidden, targets, ignore_index):
        keep = torch.nonzero(targets != ignore_index, as_tuple=False).flatten()
        return keep, hidden.index_select(0, keep), targets.index_select(0, keep)

    @staticmethod
    def buffers(ctx, h, weight, compute_grad):
        """(fp32 loss accumulator, hidden gradient or None, fp32 weight gradient or None)."""
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if compute_grad and ctx.needs_input_grad[0] else None
        grad_w = None
        if compute_grad and ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        return loss, grad_h, grad_w

    @staticmethod
    def accumulate(g, hc, weight, grad_h, grad_w, start):
        """Add one chunk's ``g = dCE/dlogits`` (fp32, ``[chunk, V]``) to the gradients."""
        g = g.to(hc.dtype)
        if grad_h is not None:
            grad_h[start : start + g.shape[0]] = g @ weight
        if grad_w is not None:
            grad_w += (g.t() @ hc).float()

    @staticmethod
    def finish(ctx, keep, grad_h, grad_w, hidden, weight, loss):
        ctx.save_for_backward(keep, grad_h, grad_w)
        ctx.hidden_shape = hidden.shape
        ctx.w_dtype = weight.dtype
        num = torch.tensor(keep.shape[0], dtype=torch.int64, device=hidden.device)
        ctx.mark_non_differentiable(num)
        return loss, num

    @classmethod
    def backward(cls, ctx, grad_loss, _grad_num):
        keep, grad_h, grad_w = ctx.saved_tensors
        dh = dw = None
        if ctx.needs_input_grad[0]:
            if grad_h is None:
                raise RuntimeError("chunked cross-entropy: gradient was not computed in forward")
            dh = torch.zeros(ctx.hidden_shape, dtype=grad_h.dtype, device=grad_h.device)
            dh.index_copy_(0, keep, grad_h * grad_loss.to(grad_h.dtype))
        if ctx.needs_input_grad[1]:
            if grad_w is None:
                raise RuntimeError("chunked cross-entropy: gradient was not computed in forward")
            dw = (grad_w * grad_loss).to(ctx.w_dtype)
        return (dh, dw) + (None,) * cls.num_extra_inputs


class _ChunkedLinearCE(ChunkedCE):
    num_extra_inputs = 4  # targets, chunk_size, ignore_index, compute_grad

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, compute_grad):
        keep, h, t = ChunkedCE.select(hidden, targets, ignore_index)
        loss, grad_h, grad_w = ChunkedCE.buffers(ctx, h, weight, compute_grad)
        for s in range(0, h.shape[0], chunk_size):
            hc, tc = h[s : s + chunk_size], t[s : s + chunk_size]
            # Matmul in the model dtype, softmax in fp32: what autograd through
            # ``lm_head(h).float()`` + ``F.cross_entropy`` computes.
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None:
                continue
            # d(sum CE)/d logits = softmax - onehot, reusing the logits buffer.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
            ChunkedCE.accumulate(g, hc, weight, grad_h, grad_w, s)
            del g, logits
        return ChunkedCE.finish(ctx, keep, grad_h, grad_w, hidden, weight, loss)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of ``hidden @ weight.T`` against ``targets`` (already shifted).

    ``hidden`` is ``[..., H]``, ``targets`` the matching ``[...]``. Returns
    ``(loss_sum, num_tokens)``: fp32 scalar with autograd, int64 scalar.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(torch.long)
    if t.shape[0] != h.shape[0]:
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match hidden {tuple(hidden.shape)}"
        )
    chunk = int(chunk_size or default_chunk_size(weight.shape[0]))
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedLinearCE.apply(h, weight, t, chunk, ignore_index, compute_grad)


def reference_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain summed CE over full logits (for tests and small models)."""
    t = targets.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), t, ignore_index=ignore_index, reduction="sum"
    )
    return loss, (t != ignore_index).sum()
