"""Training-time datasets: split, blend, shuffle, positions, collate, dp shares."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.train import packed_rows, random_sft_rows, write_pretrain, write_sft
from tunelab.data import dataset as ds


def test_split_range_covers_all_documents():
    split = (0.969, 0.03, 0.001)
    parts = [ds.split_range(1000, split, i) for i in range(3)]
    assert parts == [(0, 969), (969, 999), (999, 1000)]
    assert ds.split_range(10, (0.9, 0.1, 0.0), 1) == (9, 10)


def test_pretrain_rows_cross_documents(tmp_path):
    docs = [np.arange(10, 10 + n) for n in (5, 7, 9)]  # 21 tokens -> 2 rows of 8
    prefix = write_pretrain(tmp_path / "p", docs)
    src = ds.PretrainSource(prefix, 8)
    assert len(src) == 2
    stream = np.concatenate(docs)
    row = src[1]
    assert row.input_ids.tolist() == stream[8:16].tolist()
    assert np.array_equal(row.labels, row.input_ids)
    assert row.position_ids.tolist() == list(range(8))
    reset = ds.PretrainSource(f"{prefix}_text_document", 8, reset_position_ids=True)
    # row 0 = doc0 (5 tokens) + 3 of doc1: positions restart where doc1 starts
    assert reset[0].position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_sft_packed_positions_from_neat_mask_and_eos(tmp_path):
    rows, masks = packed_rows(3, 32, seed=4)
    src = ds.SFTSource(write_sft(tmp_path / "n", rows, masks))
    assert src.packed and src.row_length == 32
    m = masks[0]
    pos = src[0].position_ids
    starts = [0] + [i for i in range(1, 32) if m[i] != m[i - 1]]
    assert all(pos[i] == 0 for i in starts) and (pos == 0).sum() == len(starts)
    # plain packing (mask all ones) records no sample starts: one sequence per row by default,
    # restarted after each EOS with reset_at_eos (data.reset_position_ids)
    ids = np.array([5, 6, 2, 7, 8, 9, 2, 0])
    plain = write_sft(tmp_path / "e", [(ids, ids.copy())] * 2)
    assert ds.SFTSource(plain, eos_id=2)[0].position_ids.tolist() == list(range(8))
    reset = ds.SFTSource(plain, eos_id=2, reset_at_eos=True)
    assert reset[0].position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_collate_padding_variable_and_fixed():
    rows = [ds.Row(np.arange(5), np.arange(5), np.arange(5)) for _ in range(2)]
    rows.append(ds.Row(np.arange(11), np.full(11, -100), np.arange(11)))
    var = ds.Collator(16, pad_token_id=9, pad_to_multiple_of=8)(rows)
    assert var["input_ids"].shape == (3, 16)
    fixed = ds.Collator(32, pad_token_id=9)(rows[:2])
    assert fixed["input_ids"].shape == (2, 32)
    assert fixed["input_ids"][0, 5:].eq(9).all() and fixed["labels"][0, 5:].eq(-100).all()
    # padding starts its own document
    assert fixed["position_ids"][0, 5].item() == 0
    short = ds.Collator(32, pad_to_multiple_of=8)(rows[:2])
    assert short["input_ids"].shape == (2, 8)
    # rows longer than seq_length are cut
    assert ds.Collator(8, pad_to_multiple_of=8)(rows)["input_ids"].shape == (3, 8)


def test_blend_follows_weights_and_reshuffles_each_epoch(tmp_path):
    a = ds.SFTSource(write_sft(tmp_path / "a", random_sft_rows(10, seed=1)))
    b = ds.SFTSource(write_sft(tmp_path / "b", random_sft_rows(30, seed=2)))
    s = ds.BlendedSampler([a, b], [0.25, 0.75], seed=0, shuffle=True)
    s._extend(400)
    assert (s._choice[:400] == 0).sum() == 100
    first = [s._perm(0, 0).tolist(), s._perm(0, 1).tolist()]
    assert sorted(first[0]) == list(range(10)) and first[0] != first[1]
    again = ds.BlendedSampler([a, b], [0.25, 0.75], seed=0, shuffle=True)
    assert all(np.array_equal(s[g].input_ids, again[g].input_ids) for g in range(60))


def test_dp_shares_make_up_the_global_batch(tmp_path):
    src = ds.SFTSource(write_sft(tmp_path / "a", random_sft_rows(16, seed=3)))
    coll = ds.Collator(32)

    def loader(rank, size):
        samp = ds.BlendedSampler([src], [1.0], seed=1, shuffle=True)
        return ds.TrainLoader(samp, coll, 8, 2, rank, size)

    full = loader(0, 1).next_batch()
    shares = loader(0, 2).next_batch() + loader(1, 2).next_batch()
    assert len(full) == len(shares) == 4
    for x, y in zip(full, shares):
        assert x["input_ids"].equal(y["input_ids"])
    # resuming at consumed_samples=8 gives the second batch of an uninterrupted loader
    straight = loader(0, 1)
    straight.next_batch()
    resumed = loader(0, 1)
    resumed.load_state_dict(straight.state_dict())
    assert resumed.next_batch()[0]["input_ids"].equal(straight.next_batch()[0]["input_ids"])


def test_empty_split_is_an_error(tmp_path):
    src = ds.SFTSource(write_sft(tmp_path / "a", random_sft_rows(3)), doc_range=(3, 3))
    with pytest.raises(ds.DataError, match="no rows in this split"):
        ds.BlendedSampler([src], [1.0], 0, True)


def test_render_sample_marks_supervised_span(tiny_tokenizer):
    ids = tiny_tokenizer("Hello world! The quick brown fox")["input_ids"]
    labels = list(ids)
    labels[:3] = [-100] * 3
    row = ds.Row(np.array(ids), np.array(labels), np.arange(len(ids)))
    text = ds.render_sample(row, tiny_tokenizer)
    assert text.startswith(tiny_tokenizer.decode(ids[:3])) and "[[" in text and text.endswith("]]")
