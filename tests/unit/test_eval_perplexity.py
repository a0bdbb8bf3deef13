"""Held-out loss / perplexity on .bin/.idx data, against transformers' logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tunelab.data.indexed import IndexedDatasetBuilder
from tunelab.errors import DataError
from tunelab.eval.perplexity import evaluate_perplexity


def _write(prefix: str, rows: list[np.ndarray]) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for row in rows:
        builder.add_item(row)
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _nll(hf, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum of -log p(labels[t+1] | ids[:t+1]) over scored targets, from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    total, n = 0.0, 0
    for t, y in enumerate(labels[1:]):
        if y != -100:
            total -= float(logp[t, y])
            n += 1
    return total, n


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.model.hf import load_model

    ours = load_model(tiny_hf_dir, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    return ours, hf


def test_pretrain_text_document(tmp_path, models):
    ours, hf = models
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 512, n).astype(np.int32) for n in (7, 30, 12)]
    prefix = str(tmp_path / "held_text_document")
    _write(prefix, rows)
    max_len = 16  # the 30-token row is scored as windows 16 + 14
    res = evaluate_perplexity(
        str(tmp_path / "held"), lambda i, p: ours(i, p), max_len, batch_size=2, progress=False
    )
    total, n = 0.0, 0
    for row in rows:
        for s in range(0, len(row), max_len):
            w = row[s : s + max_len].tolist()
            a, b = _nll(hf, w, w)
            total, n = total + a, n + b
    assert res.kind == "pretrain" and res.num_sequences == 3 and res.num_tokens == n
    assert res.loss == pytest.approx(total / n, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)


def test_neat_packed_sft_rows_score_each_sample_alone(tmp_path, models):
    ours, hf = models
    a_ids, a_lab = [5, 6, 7, 8, 9], [-100, -100, -100, 8, 9]
    b_ids, b_lab = [10, 11, 12, 13], [10, 11, 12, 13]  # first target lies across the boundary
    pad = 3
    ids = np.array(a_ids + b_ids + [0] * pad, np.int32)
    labels = np.array(a_lab + b_lab + [-100] * pad, np.int32)
    mask = np.array([1] * 5 + [2] * 4 + [0] * pad, np.int32)
    for field, row in (("input_ids", ids), ("labels", labels), ("attention_mask", mask)):
        _write(str(tmp_path / f"sft_packed_{field}_document"), [row])
    res = evaluate_perplexity(str(tmp_path / "sft"), lambda i, p: ours(i, p), 64, progress=False)
    ta, na = _nll(hf, a_ids, a_lab)
    tb, nb = _nll(hf, b_ids, b_lab)
    assert res.kind == "sft" and res.num_tokens == na + nb == 5
    assert res.loss == pytest.approx((ta + tb) / (na + nb), rel=1e-5)


def test_missing_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match="_text_document"):
        evaluate_perplexity(str(tmp_path / "nothing"), lambda i, p: None, 8, progress=False)
