"""Packing whole samples into rows of exactly ``seq_length`` tokens (best-fit decreasing).

Samples are taken longest first; each goes into the open row whose free space is smallest but
still fits it, or opens a new row. A sample is never split. Rows are padded to ``seq_length``:
input_ids with the pad id, labels with -100, attention_mask with 1 (plain ``--pack``) or, with
``--neat-pack``, the 1-based index of the sample within the row and 0 on padding.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from tunelab.data.encode import IGNORE_INDEX


def best_fit(lengths: np.ndarray | list[int], capacity: int) -> list[list[int]]:
    """Indices of the samples of each row. Deterministic: ties keep input order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens exceeds the row size {capacity}")
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    # (free space, row id), sorted: bisect finds the tightest row that still fits.
    free: list[tuple[int, int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            space -= n
        else:
            r = len(rows)
            rows.append([i])
            space = capacity - n
        if space > 0:
            bisect.insort(free, (space, r))
    return rows


@dataclass
class PackedRows:
    input_ids: np.ndarray  # [num_rows, seq_length]
    labels: np.ndarray  # [num_rows, seq_length]
    attention_mask: np.ndarray  # [num_rows, seq_length]
    num_tokens: int  # real (non-pad) tokens

    @property
    def fill_ratio(self) -> float:
        return self.num_tokens / self.input_ids.size if self.input_ids.size else 0.0


def pack_samples(
    ids_flat: np.ndarray,
    labels_flat: np.ndarray,
    lengths: np.ndarray,
    seq_length: int,
    pad_id: int,
    neat: bool,
) -> PackedRows:
    """Pack samples given as flat arrays + lengths into padded rows (numpy, no Python loops
    over tokens)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    rows = best_fit(lengths, seq_length)
    n_rows = len(rows)
    # int32 holds any token id and -100, and is what the files store.
    ids = np.full((n_rows, seq_length), pad_id, dtype=np.int32)
    labels = np.full((n_rows, seq_length), IGNORE_INDEX, dtype=np.int32)
    mask = (np.zeros if neat else np.ones)((n_rows, seq_length), dtype=np.int32)
    for r, members in enumerate(rows):
        pos = 0
        for k, i in enumerate(members, 1):
            n, s = int(lengths[i]), int(starts[i])
            ids[r, pos : pos + n] = ids_flat[s : s + n]
            labels[r, pos : pos + n] = labels_flat[s : s + n]
            if neat:
                mask[r, pos : pos + n] = k
            pos += n
    return PackedRows(ids, labels, mask, int(lengths.sum()))
