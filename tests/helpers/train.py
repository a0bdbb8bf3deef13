"""Tiny training data and run configs for the train tests (no preprocess run needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunelab.config import load_config
from tunelab.data.indexed import IndexedDatasetBuilder


def _write(prefix: str, rows: list[np.ndarray]) -> None:
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for r in rows:
        b.add_document(np.asarray(r, dtype=np.int32), [len(r)])
    b.finalize(f"{prefix}.idx")


def write_sft(prefix: str | Path, rows, masks=None) -> str:
    """rows: [(input_ids, labels)] -> {prefix}_packed_{input_ids,labels,attention_mask}."""
    prefix = str(prefix)
    _write(f"{prefix}_packed_input_ids_document", [r[0] for r in rows])
    _write(f"{prefix}_packed_labels_document", [r[1] for r in rows])
    if masks is None:
        masks = [np.ones(len(r[0]), np.int32) for r in rows]
    _write(f"{prefix}_packed_attention_mask_document", masks)
    return prefix


def write_pretrain(prefix: str | Path, docs) -> str:
    _write(f"{prefix}_text_document", docs)
    return str(prefix)


def random_sft_rows(n: int, seed: int = 0, vocab: int = 500, lo: int = 6, hi: int = 30):
    """Rows of random length, each with a random-length prompt (labels -100) then an answer
    that repeats a pattern, so a model can learn it: unequal supervised counts per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(3, vocab, size=length)
        ids[prompt:] = (np.arange(length - prompt) * 7 + ids[0]) % (vocab - 3) + 3
        labels = ids.copy()
        labels[:prompt] = -100
        rows.append((ids, labels))
    return rows


def packed_rows(n: int, seq_length: int, seed: int = 0, vocab: int = 500):
    """Neat-packed rows of exactly seq_length: 2-3 samples each, then padding."""
    rng = np.random.default_rng(seed)
    rows, masks = [], []
    samples = random_sft_rows(4 * n, seed=seed, vocab=vocab, lo=4, hi=seq_length // 3)
    it = iter(samples)
    for _ in range(n):
        ids, labels, mask = [], [], []
        for k in range(1, int(rng.integers(2, 4)) + 1):
            a, b = next(it)
            ids += a.tolist()
            labels += b.tolist()
            mask += [k] * len(a)
        pad = seq_length - len(ids)
        rows.append((np.array(ids + [0] * pad), np.array(labels + [-100] * pad)))
        masks.append(np.array(mask + [0] * pad))
    return rows, masks


def run_config(out_dir, model_dir, data_prefix, *overrides: str, **sections):
    """A small single-process run config (fp32, no progress bar, no plot) plus overrides."""
    base = {
        "model": {"path": str(model_dir)},
        "data": {"mode": "sft", "path": str(data_prefix), "seq_length": 32},
        "train": {
            "output_dir": str(out_dir),
            "steps": 4,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "seed": 3,
            "device": "cpu",
        },
        "optim": {"lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.01},
        "checkpoint": {"resume": "auto"},
        "logging": {"progress": "none", "plot": False, "tensorboard": False},
    }
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return load_config(base=base, overrides=list(overrides))
