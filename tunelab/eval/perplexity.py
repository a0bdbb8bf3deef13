"""Loss and perplexity of a model on a held-out tunelab / Megatron ``.bin/.idx`` dataset.

``--data-path PREFIX`` names what ``tunelab preprocess`` wrote with ``--output-prefix PREFIX``:
- pretraining data, ``{PREFIX}_text_document`` (or PREFIX itself is a ``.bin/.idx`` pair):
  every token after the first of each sequence is predicted;
- fine-tuning data, ``{PREFIX}_packed_input_ids_document`` + ``..._labels_document`` (labels
  not shifted, -100 = not scored): only supervised tokens count. With ``--neat-pack`` data the
  ``..._attention_mask_document`` sample numbers restart the position ids, so packed samples
  do not attend to each other (the same masking training uses).
Sequences longer than the model's context are scored in consecutive non-overlapping windows.
The loss is the mean negative log-likelihood per scored token; perplexity is exp(loss).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tunelab.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class PerplexityResult:
    data_path: str
    kind: str  # "pretrain" | "sft"
    num_sequences: int
    num_tokens: int  # scored (predicted) tokens
    loss: float
    perplexity: float

    def table(self) -> str:
        return (
            f"data      {self.data_path} ({self.kind})\n"
            f"sequences {self.num_sequences}\n"
            f"tokens    {self.num_tokens}\n"
            f"loss      {self.loss:.6f}\n"
            f"ppl       {self.perplexity:.4f}"
        )


def _open(prefix: str):
    from tunelab.data.indexed import IndexedDataset

    if IndexedDataset.exists(f"{prefix}_packed_input_ids_document"):
        ids = IndexedDataset(f"{prefix}_packed_input_ids_document")
        if not IndexedDataset.exists(f"{prefix}_packed_labels_document"):
            raise DataError(
                f"{prefix}_packed_labels_document.bin/.idx not found next to the input ids"
            )
        labels = IndexedDataset(f"{prefix}_packed_labels_document")
        mask = None
        if IndexedDataset.exists(f"{prefix}_packed_attention_mask_document"):
            mask = IndexedDataset(f"{prefix}_packed_attention_mask_document")
        if len(labels) != len(ids):
            raise DataError(
                f"{prefix}: {len(ids)} input_ids rows but {len(labels)} labels rows; re-run preprocess"
            )
        return "sft", ids, labels, mask
    for cand in (f"{prefix}_text_document", prefix):
        if IndexedDataset.exists(cand):
            return "pretrain", IndexedDataset(cand), None, None
    raise DataError(
        f"no dataset at --data-path {prefix}: expected {prefix}_text_document.bin/.idx "
        f"(pretraining) or {prefix}_packed_input_ids_document.bin/.idx (fine-tuning)"
    )


def _positions(mask_row: np.ndarray | None, n: int) -> np.ndarray:
    if mask_row is None or mask_row.max(initial=0) <= 1:
        return np.arange(n)
    # neat packing: a new sample starts wherever the 1-based sample number changes
    starts = np.flatnonzero(np.r_[True, mask_row[1:] != mask_row[:-1]])
    seg = np.zeros(n, dtype=np.int64)
    seg[starts[1:]] = 1
    seg = np.cumsum(seg)
    return np.arange(n) - starts[seg]


def evaluate_perplexity(
    prefix: str,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_length: int,
    batch_size: int = 4,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PerplexityResult:
    from tqdm import tqdm

    kind, ids_ds, labels_ds, mask_ds = _open(prefix)
    num = len(ids_ds) if limit is None else min(limit, len(ids_ds))
    # windows: (input ids, labels, position ids), each at most max_length long
    windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for i in range(num):
        ids = np.asarray(ids_ds[i], dtype=np.int64)
        if labels_ds is not None:
            labels = np.asarray(labels_ds[i], dtype=np.int64)
            if len(labels) != len(ids):
                raise DataError(f"{prefix}: row {i} has {len(ids)} ids but {len(labels)} labels")
        else:
            labels = ids
        pos = _positions(np.asarray(mask_ds[i]) if mask_ds is not None else None, len(ids))
        for s in range(0, len(ids), max_length):
            p = pos[s : s + max_length]
            if mask_ds is None:  # each window is scored as a sequence of its own
                p = p - p[0]
            windows.append((ids[s : s + max_length], labels[s : s + max_length], p))
    nll, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", disable=not progress, unit="seq")
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            width = max(len(w[0]) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            pos = torch.arange(width).repeat(len(chunk), 1)
            for j, (x, y, p) in enumerate(chunk):
                ids[j, : len(x)] = torch.from_numpy(x)
                labels[j, : len(y)] = torch.from_numpy(y)
                pos[j, : len(p)] = torch.from_numpy(p)
                # a target that starts a new packed sample is not predictable from the last one
                labels[j, : len(p)][torch.from_numpy(p) == 0] = IGNORE
            logits = forward(ids.to(device), pos.to(device))  # [B, S, V]
            target = labels[:, 1:].to(logits.device)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            keep = target != IGNORE
            picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
            nll -= float(picked[keep].sum())
            count += int(keep.sum())
            bar.update(len(chunk))
    bar.close()
    if count == 0:
        raise DataError(
            f"{prefix}: no scored tokens (every label is -100 or sequences are 1 token)"
        )
    loss = nll / count
    return PerplexityResult(prefix, kind, num, count, loss, math.exp(loss))
