"""The .bin/.idx format, byte by byte, and against Megatron's own reader and writer."""

from __future__ import annotations

import os
import pickle
import struct
import warnings

import numpy as np
import pytest

from tunelab.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    dtype_code,
)
from tunelab.errors import DataError

SEQS = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch  # noqa: F401
        from megatron.core.datasets import indexed_dataset as mg
    return mg


def _build(prefix, seqs, docs_after, dtype=np.int32):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for i, s in enumerate(seqs):
        b.add_item(np.array(s))
        if i in docs_after:
            b.end_document()
    b.finalize(f"{prefix}.idx")


def test_idx_bytes_match_reference_layout(tmp_path):
    prefix = tmp_path / "ds"
    # documents: [seq0, seq1], [seq2, seq3]
    _build(prefix, SEQS, docs_after={1, 3})
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == bytes.fromhex("4D4D4944494458 0000".replace(" ", ""))
    assert struct.unpack("<Q", raw[9:17]) == (1,)
    assert raw[17] == 4  # int32
    assert struct.unpack("<QQ", raw[18:34]) == (4, 3)
    n = 4
    assert np.frombuffer(raw, np.int32, n, 34).tolist() == [3, 1, 2, 4]
    assert np.frombuffer(raw, np.int64, n, 34 + 4 * n).tolist() == [0, 12, 16, 24]
    assert np.frombuffer(raw, np.int64, 3, 34 + 12 * n).tolist() == [0, 2, 4]
    assert len(raw) == 34 + 12 * n + 8 * 3
    data = (tmp_path / "ds.bin").read_bytes()
    assert data == np.arange(1, 11, dtype="<i4").tobytes()


def test_dtype_codes_and_best_dtype():
    codes = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]
    assert [dtype_code(d) for d in codes] == list(range(1, 9))
    assert best_dtype(32000) is np.uint16
    assert best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32
    assert best_dtype(151_936) is np.int32
    with pytest.raises(DataError):
        dtype_code(np.complex64)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 1000, size=rng.integers(1, 50)) for _ in range(30)]
    prefix = tmp_path / "rt"
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for i, s in enumerate(seqs):
        b.add_item(s)
        if i % 3 == 2:
            b.end_document()
    b.finalize(f"{prefix}.idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 30 and ds.dtype == np.dtype(dtype)
    assert ds.num_documents == 10
    assert ds.document_indices.tolist() == list(range(0, 31, 3))
    assert ds.sizes.tolist() == [len(s) for s in seqs]
    for s, got in zip(seqs, ds):
        np.testing.assert_array_equal(got, s)
    np.testing.assert_array_equal(ds.get(4, offset=1, length=1), seqs[4][1:2])
    np.testing.assert_array_equal(ds.get(-1), seqs[-1])
    assert [x.tolist() for x in ds[1:3]] == [seqs[1].tolist(), seqs[2].tolist()]
    assert [x.tolist() for x in ds.document(1)] == [s.tolist() for s in seqs[3:6]]
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[7], seqs[7])
    with pytest.raises(IndexError):
        ds.get(30)
    with pytest.raises(IndexError):
        ds.get(0, offset=1, length=len(seqs[0]))


def test_add_documents_and_merge(tmp_path):
    a, b_, out = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    ba = IndexedDatasetBuilder(f"{a}.bin")
    ba.add_documents(np.array([1, 2, 3, 4, 5]), [2, 3])
    ba.finalize(f"{a}.idx")
    _build(b_, [[6], [7, 8]], docs_after={1})
    m = IndexedDatasetBuilder(f"{out}.bin")
    m.merge_file_(a)
    m.merge_file_(b_)
    m.finalize(f"{out}.idx")
    ds = IndexedDataset(out)
    assert [x.tolist() for x in ds] == [[1, 2], [3, 4, 5], [6], [7, 8]]
    assert ds.document_indices.tolist() == [0, 1, 2, 4]
    wrong = IndexedDatasetBuilder(tmp_path / "w.bin", np.uint16)
    with pytest.raises(DataError, match="same dtype"):
        wrong.merge_file_(a)
    wrong.abort()


def test_nothing_under_final_names_until_finalize(tmp_path):
    prefix = tmp_path / "atomic"
    b = IndexedDatasetBuilder(f"{prefix}.bin")
    b.add_item([1, 2, 3])
    b.end_document()
    assert not (tmp_path / "atomic.bin").exists()
    b.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(f"{prefix}.bin") as b2:
            b2.add_item([1])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_value_out_of_range_is_an_error(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "x.bin", np.uint16)
    with pytest.raises(DataError, match="does not fit uint16"):
        b.add_item([-100, 5])
    b.abort()


def test_corrupt_files_are_reported(tmp_path):
    prefix = tmp_path / "c"
    _build(prefix, SEQS, docs_after={3})
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="cut short"):
        IndexedDataset(prefix)
    (tmp_path / "c.idx").write_bytes(b"TNTIDX\0\0" + b"\0" * 40)
    with pytest.raises(DataError, match="MMIDIDX"):
        IndexedDataset(prefix)
    with pytest.raises(DataError, match="not found"):
        IndexedDataset(tmp_path / "missing")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_our_files(tmp_path, dtype):
    mg = _megatron()
    prefix = tmp_path / "ours"
    seqs = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]]
    _build(prefix, seqs, docs_after={0, 3, 4}, dtype=dtype)
    theirs = mg.IndexedDataset(str(prefix))
    assert len(theirs) == len(seqs)
    assert theirs.index.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(theirs.document_indices, [0, 1, 4, 5])
    np.testing.assert_array_equal(theirs.sequence_lengths, [3, 1, 2, 4, 1])
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(theirs[i], s)
    np.testing.assert_array_equal(theirs.get(3, offset=1, length=2), [8, 9])


def test_we_read_megatron_files(tmp_path):
    import torch

    mg = _megatron()
    prefix = str(tmp_path / "theirs")
    b = mg.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    b.add_item(torch.tensor([5, -100, 7]))
    b.add_item(torch.tensor([8]))
    b.end_document()
    b.add_document(torch.tensor([1, 2, 3]), [1, 2])
    b.finalize(prefix + ".idx")
    # and one built by merging with Megatron's add_index
    b2 = mg.IndexedDatasetBuilder(prefix + "2.bin", dtype=np.int32)
    b2.add_index(prefix)
    b2.add_index(prefix)
    b2.finalize(prefix + "2.idx")
    ours = IndexedDataset(prefix)
    assert [x.tolist() for x in ours] == [[5, -100, 7], [8], [1], [2, 3]]
    assert ours.document_indices.tolist() == [0, 2, 4]
    ours2 = IndexedDataset(prefix + "2")
    assert len(ours2) == 8 and ours2.document_indices.tolist() == [0, 2, 4, 6, 8]
    # the bytes Megatron writes are the bytes we write for the same content
    ob = IndexedDatasetBuilder(str(tmp_path / "same.bin"), np.int32)
    ob.add_item([5, -100, 7])
    ob.add_item([8])
    ob.end_document()
    ob.add_document(np.array([1, 2, 3]), [1, 2])
    ob.finalize(str(tmp_path / "same.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"same.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_tokens_view_is_the_whole_bin(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "t.bin"), dtype=np.uint16)
    b.add_item(np.array([1, 2, 3]))
    b.end_document()
    b.add_item(np.array([4, 5]))
    b.end_document()
    b.finalize(str(tmp_path / "t.idx"))
    ds = IndexedDataset(str(tmp_path / "t"))
    assert ds.tokens.tolist() == [1, 2, 3, 4, 5]
    assert not ds.tokens.flags.writeable
