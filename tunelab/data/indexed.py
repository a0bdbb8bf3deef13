"""Megatron ``.bin/.idx`` indexed datasets: a memory-mapped reader and an atomic writer.

The byte layout is Megatron-LM's ``MMIDIDX`` format (the one MindSpeed-LLM reads and writes),
so files written here load in ``megatron.core.datasets.indexed_dataset.IndexedDataset`` and
the other way round. Layout of ``{prefix}.idx`` (little-endian, tightly packed)::

    9 B magic b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 N sequences
    | u64 D = documents + 1 | int32[N] lengths | int64[N] byte pointers | int64[D] doc indices

``{prefix}.bin`` is the raw token arrays concatenated, no header. A "document" covers the
sequences ``[document_indices[k], document_indices[k+1])``.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tunelab.errors import DataError

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D: 34 bytes

# Megatron's DType enum: code -> numpy dtype.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_code(dtype) -> int:
    """Megatron's dtype code for ``dtype``; a DataError for a dtype the format cannot store."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        allowed = ", ".join(np.dtype(v).name for v in DTYPE_CODES.values())
        raise DataError(
            f"dtype {np.dtype(dtype).name} cannot be stored in .bin/.idx; use one of {allowed}"
        ) from None


def best_dtype(vocab_size: int | None) -> type[np.number]:
    """The smallest dtype Megatron picks for token ids: uint16 below 65500 ids, else int32.

    Only for files holding token ids alone; labels (-100) need a signed dtype.
    """
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


class IndexedDataset:
    """Memory-mapped reader of ``{prefix}.bin/.idx``.

    ``ds[i]`` is sequence i as a read-only numpy view (an int or a slice of ints gives a list).
    ``get(i, offset, length)`` reads part of one sequence. Pickles by path, so it can be
    handed to DataLoader workers.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise DataError(
                    f"indexed dataset file {p} not found; pass the prefix without .bin/.idx "
                    f"(e.g. {self.prefix!r} for {self.prefix}.bin + {self.prefix}.idx)"
                )
        with open(ipath, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise DataError(f"{ipath}: truncated header ({len(head)} bytes); rebuild the dataset")
        magic, version, code, n, d = _HEADER.unpack(head)
        if magic != MAGIC:
            raise DataError(f"{ipath}: not a Megatron MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise DataError(f"{ipath}: unsupported index version {version} (expected 1)")
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown dtype code {code}")
        self.dtype: np.dtype = np.dtype(DTYPE_CODES[code])
        need = _HEADER.size + 12 * n + 8 * d
        size = os.path.getsize(ipath)
        # A multimodal index carries N extra int8 modes after the document indices.
        if size not in (need, need + n):
            raise DataError(f"{ipath}: size {size} does not match its header (expected {need})")
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self.sizes: np.ndarray = np.frombuffer(self._idx, np.int32, n, off)
        self.pointers: np.ndarray = np.frombuffer(self._idx, np.int64, n, off + 4 * n)
        self.document_indices: np.ndarray = np.frombuffer(self._idx, np.int64, d, off + 12 * n)
        nbytes = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        bsize = os.path.getsize(bpath)
        if bsize != nbytes:
            raise DataError(
                f"{bpath}: {bsize} bytes but {ipath} describes {nbytes}; the pair is from "
                "different runs or was cut short; rebuild it"
            )
        if d == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise DataError(f"{ipath}: document indices do not cover the {n} sequences")
        # np.memmap refuses empty files; an empty dataset needs no data buffer.
        self._bin = np.memmap(bpath, mode="r", dtype=np.uint8) if bsize else np.zeros(0, np.uint8)

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin as one read-only array (memory-mapped, not copied)."""
        return np.frombuffer(self._bin, self.dtype)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements ``[offset, offset + length)`` of sequence ``idx`` (to its end if None)."""
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences")
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset}+{length}) outside sequence of {size}")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def document(self, k: int) -> list[np.ndarray]:
        """The sequences of document ``k``."""
        lo, hi = int(self.document_indices[k]), int(self.document_indices[k + 1])
        return [self.get(i) for i in range(lo, hi)]

    def close(self) -> None:
        # Views into the maps may still be alive in the caller; dropping our references lets
        # the maps close when the last view goes (closing them now would raise BufferError).
        self._bin = self._idx = None  # type: ignore[assignment]
        self.sizes = self.pointers = self.document_indices = None  # type: ignore[assignment]

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def _tmp_for(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_index(path: str, dtype, lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write a ``.idx`` file for sequences of ``lengths`` (not atomic: the caller renames)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(
            _HEADER.pack(MAGIC, VERSION, dtype_code(dtype), len(lengths), len(document_indices))
        )
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(document_indices.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Writes ``.bin`` (here) and ``.idx`` (at ``finalize``) under temporary names.

    Nothing appears under the final names until ``finalize(idx_path)`` succeeds; ``abort()``
    (or leaving a ``with`` block by an exception) removes the temporaries. Values are cast to
    the builder dtype; a value the dtype cannot hold is an error, not a silent wrap-around.
    """

    def __init__(self, bin_path: str | os.PathLike, dtype=np.int32):
        self.bin_path = os.fspath(bin_path)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validate early
        self._tmp_bin = _tmp_for(self.bin_path)
        Path(self.bin_path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._lengths: list[np.ndarray] = []
        self._num_sequences = 0
        self.document_indices: list[int] = [0]
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._done = False

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    @property
    def num_sequences(self) -> int:
        return self._num_sequences

    @property
    def sequence_lengths(self) -> np.ndarray:
        if not self._lengths:
            return np.zeros(0, np.int32)
        return np.concatenate(self._lengths)

    def _cast(self, values) -> np.ndarray:
        arr = np.asarray(values)
        if arr.dtype == self.dtype:
            return np.ascontiguousarray(arr).reshape(-1)
        if self._info is not None and arr.size and arr.dtype.kind in "iu":
            lo, hi = arr.min(), arr.max()
            if lo < self._info.min or hi > self._info.max:
                raise DataError(
                    f"value range [{lo}, {hi}] does not fit {self.dtype.name} in {self.bin_path}; "
                    "use a wider dtype (int32 holds labels with -100 and any vocabulary)"
                )
        return np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1)

    def _write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        self._file.write(memoryview(flat).cast("B"))  # no copy: flat is C-contiguous
        self._lengths.append(lengths.astype(np.int32, copy=False))
        self._num_sequences += len(lengths)

    def add_item(self, values) -> None:
        """Append one sequence (1-D array-like or torch tensor) to the current document."""
        if hasattr(values, "numpy"):
            values = values.detach().cpu().numpy()
        flat = self._cast(values)
        self._write(flat, np.array([flat.size], dtype=np.int32))

    def end_document(self) -> None:
        self.document_indices.append(self._num_sequences)

    def add_document(self, values, lengths: Sequence[int]) -> None:
        """Append several sequences (concatenated in ``values``) and end the document."""
        if hasattr(values, "numpy"):
            values = values.detach().cpu().numpy()
        flat = self._cast(values)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} values given")
        self._write(flat, lengths)
        self.end_document()

    def add_documents(self, values, lengths: Sequence[int]) -> None:
        """Append many one-sequence documents at once (the fast path of preprocess)."""
        flat = self._cast(values)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} values given")
        start = self._num_sequences
        self._write(flat, lengths)
        self.document_indices.extend(range(start + 1, start + len(lengths) + 1))

    def merge_file_(self, prefix: str | os.PathLike) -> None:
        """Append a whole existing dataset: its sequences, documents and bytes, in order."""
        other = IndexedDataset(prefix)
        try:
            if other.dtype != self.dtype:
                raise DataError(
                    f"cannot merge {prefix} ({other.dtype.name}) into a {self.dtype.name} dataset; "
                    "all parts of a merge must have the same dtype"
                )
            start = self._num_sequences
            self._lengths.append(np.array(other.sizes, dtype=np.int32))
            self._num_sequences += len(other)
            self.document_indices.extend((np.asarray(other.document_indices[1:]) + start).tolist())
        finally:
            other.close()
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, length=16 << 20)

    add_index = merge_file_  # Megatron's name for the same operation

    def finalize(self, idx_path: str | os.PathLike) -> None:
        """Write the index and move both files to their final names (``.bin`` first)."""
        idx_path = os.fspath(idx_path)
        if self.document_indices[-1] != self._num_sequences:
            # Sequences added after the last end_document() form one more document.
            self.end_document()
        tmp_idx = _tmp_for(idx_path)
        try:
            self._file.close()
            write_index(tmp_idx, self.dtype, self.sequence_lengths, np.array(self.document_indices))
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, idx_path)
        except BaseException:
            for p in (tmp_idx, self._tmp_bin):
                if os.path.exists(p):
                    os.unlink(p)
            raise
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far; the final names are never touched."""
        if self._done:
            return
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self._tmp_bin):
            os.unlink(self._tmp_bin)
        self._done = True

    def __del__(self) -> None:
        # A builder dropped without finalize (e.g. a killed worker's exception path) cleans up.
        try:
            if not self._done:
                self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
