"""Parity of tunelab's decoder with transformers on every tiny family (issue 3, must-show 1, 2)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.model import packed_position_ids, random_ids
from tests.helpers.tiny_models import FAMILIES, save_tiny_hf_model, tiny_hf_model
from tunelab.model.hf import load_model
from tunelab.model.loss import reference_cross_entropy, shift_labels


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {fam: save_tiny_hf_model(tmp_path_factory.mktemp(fam), fam) for fam in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_loss_match_transformers(family, family_dirs):
    hf = tiny_hf_model(family)
    ours = load_model(family_dirs[family])
    ids = random_ids(2, 48, seed=1)
    labels = ids.clone()
    labels[0, :10] = -100
    with torch.no_grad():
        ref = hf(ids, use_cache=False)
        logits = ours(ids)
        hf_loss = hf(ids, labels=labels, use_cache=False).loss
        loss_sum, n = ours.loss(ids, labels)
    assert (ref.logits - logits).abs().max().item() <= 1e-4
    assert int(n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, hf_loss, rtol=1e-5, atol=1e-5)
    if FAMILIES[family][1].get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_packed_equals_per_document_and_transformers(family, family_dirs):
    ours = load_model(family_dirs[family])
    hf = tiny_hf_model(family)
    lengths = [[7, 20, 13], [40]]
    pos = packed_position_ids(lengths)
    ids = random_ids(2, 40, seed=2)
    with torch.no_grad():
        packed = ours(ids, pos)
        hf_packed = hf(ids, position_ids=pos, use_cache=False).logits
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = ours(ids[r : r + 1, start : start + n])
                assert (alone[0] - packed[r, start : start + n]).abs().max().item() <= 1e-5
                start += n
    assert (hf_packed - packed).abs().max().item() <= 1e-4


def test_packed_loss_ignores_cross_document_targets(family_dirs):
    ours = load_model(family_dirs["qwen2"])
    lengths = [[10, 14, 8]]
    pos = packed_position_ids(lengths)
    ids = random_ids(1, 32, seed=3)
    with torch.no_grad():
        loss_sum, n = ours.loss(ids, ids, pos)
        total, count, start = 0.0, 0, 0
        for m in lengths[0]:
            doc = ids[:, start : start + m]
            logits = ours(doc)
            s, c = reference_cross_entropy(logits, shift_labels(doc))
            total, count, start = total + s, count + int(c), start + m
    assert int(n) == count == 32 - 3
    torch.testing.assert_close(loss_sum, torch.as_tensor(total), rtol=1e-5, atol=1e-4)


SLIDING = {
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
}


@pytest.mark.parametrize("family", list(SLIDING))
def test_sliding_window_matches_transformers(family, tmp_path):
    d = save_tiny_hf_model(tmp_path / family, family, **SLIDING[family])
    hf, ours = tiny_hf_model(family, **SLIDING[family]), load_model(d)
    assert ours.config.sliding_window == 8
    ids = random_ids(2, 40, seed=4)
    pos = packed_position_ids([[12, 28], [40]])
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        ref_packed = hf(ids, position_ids=pos, use_cache=False).logits
        logits, packed = ours(ids), ours(ids, pos)
        windowed = ours.config
        ours.config = windowed.replace(sliding_window=None)
        unwindowed = ours(ids)
        ours.config = windowed
        ours.set_attn_backend("flex")
        flex = ours(ids, pos)
    assert (ref - logits).abs().max().item() <= 1e-4
    assert (ref_packed - packed).abs().max().item() <= 1e-4
    assert (unwindowed - logits).abs().max().item() > 1e-3  # the window really binds
    assert (flex - packed).abs().max().item() <= 1e-5
