"""Helpers for model tests: packed batches and a tunelab model next to its HF oracle."""

from __future__ import annotations

import torch


def packed_position_ids(doc_lengths: list[list[int]]) -> torch.Tensor:
    """Rows of packed documents -> position_ids restarting at 0 per document."""
    rows = [torch.cat([torch.arange(n) for n in row]) for row in doc_lengths]
    return torch.stack(rows)


def random_ids(batch: int, seq: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
