"""Training-time datasets over Megatron ``.bin/.idx`` files: blend, shuffle, collate, resume.

- Pretraining (``{prefix}_text_document``): the documents of a split are one token stream
  cut into rows of ``seq_length`` tokens; labels equal input_ids (the model shifts).
- SFT (``{prefix}_packed_{input_ids,labels,attention_mask}_document``): one row per sequence.
  Packed rows (all exactly ``seq_length`` long) restart ``position_ids`` at every sample: from
  the neat-pack ``attention_mask`` (1..k per sample, 0 on padding). Plain ``--pack`` rows do not
  record where samples start: they train as one causal sequence (MindSpeed's default), or,
  with ``data.reset_position_ids`` (``--reset-attention-mask``), restart after every EOS as
  MindSpeed does. Cutting at EOS also cuts at every end of turn when the template's
  end-of-turn token is the EOS (ChatML: ``<|im_end|>``), so neat-pack is the right choice.
  Non-packed rows are padded per batch to a multiple of ``pad_to_multiple_of``.

The order of samples is a pure function of (seed, global sample index), so the loader state is
one number, ``consumed_samples``, the same on every data-parallel rank; resuming under another
layout reads the same samples. A global batch is split into ``dp_size`` contiguous shares and
each share into micro-batches.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tunelab.data.indexed import IndexedDataset
from tunelab.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SFT_FIELDS = ("input_ids", "labels", "attention_mask")


@dataclass
class Row:
    input_ids: np.ndarray  # [S] int64
    labels: np.ndarray  # [S] int64, IGNORE_INDEX where not supervised
    position_ids: np.ndarray  # [S] int64, restarting at 0 for each document


def split_range(num_docs: int, split: Sequence[float], part: int) -> tuple[int, int]:
    """Documents ``[lo, hi)`` of split ``part`` (0 train, 1 valid, 2 test)."""
    bounds = [0]
    acc = 0.0
    for f in split:
        acc += f
        bounds.append(int(round(acc * num_docs)))
    bounds[-1] = num_docs
    return bounds[part], bounds[part + 1]


def positions_from_starts(starts: np.ndarray, length: int) -> np.ndarray:
    """position ids that restart at 0 at each index in ``starts`` (which includes 0)."""
    pos = np.arange(length, dtype=np.int64)
    seg_start = np.zeros(length, dtype=np.int64)
    seg_start[starts] = starts
    np.maximum.accumulate(seg_start, out=seg_start)
    return pos - seg_start


def _eos_starts(ids: np.ndarray, eos_id: int | None) -> np.ndarray:
    starts = [0]
    if eos_id is not None:
        starts += (np.nonzero(ids[:-1] == eos_id)[0] + 1).tolist()
    return np.unique(np.asarray(starts, dtype=np.int64))


def pretrain_prefix(prefix: str) -> str:
    """Accept ``x`` or ``x_text_document`` for the pretraining files of ``x``."""
    if IndexedDataset.exists(prefix):
        return prefix
    cand = f"{prefix}_text_document"
    if IndexedDataset.exists(cand):
        return cand
    raise DataError(
        f"pretraining data {prefix!r} not found: expected {cand}.bin/.idx (or {prefix}.bin/.idx)"
        "; run `tunelab preprocess` or fix data.path"
    )


def sft_field_prefixes(prefix: str) -> dict[str, str]:
    """``field -> file prefix`` for the ``{prefix}_packed_{field}_document`` files."""
    found: dict[str, str] = {}
    pat = re.compile(re.escape(os.path.basename(prefix)) + r"_packed_(.*)_document$")
    for p in sorted(glob.glob(f"{glob.escape(prefix)}_packed_*_document.idx")):
        m = pat.match(os.path.basename(p)[: -len(".idx")])
        if m:
            found[m.group(1)] = p[: -len(".idx")]
    missing = [f for f in ("input_ids", "labels") if f not in found]
    if missing:
        names = ", ".join(f"{prefix}_packed_{f}_document.bin/.idx" for f in missing)
        hint = ""
        if IndexedDataset.exists(f"{prefix}_text_document"):
            hint = " (this prefix holds pretraining data: set data.mode=pretrain)"
        raise DataError(
            f"SFT data {prefix!r}: missing {names}{hint}; give data.path as the preprocess "
            "--output-prefix without the _packed_* part"
        )
    return found


class PretrainSource:
    """Rows of ``seq_length`` tokens cut from the token stream of a document range."""

    def __init__(
        self,
        prefix: str,
        seq_length: int,
        doc_range: tuple[int, int] | None = None,
        reset_position_ids: bool = False,
        eos_id: int | None = None,
    ):
        self.prefix = pretrain_prefix(prefix)
        self.ds = IndexedDataset(self.prefix)
        self.seq_length = seq_length
        self.reset_position_ids = reset_position_ids
        self.eos_id = eos_id
        lo, hi = doc_range if doc_range is not None else (0, self.ds.num_documents)
        di = self.ds.document_indices
        self.seq_lo, self.seq_hi = int(di[lo]), int(di[hi])
        sizes = self.ds.sizes[self.seq_lo : self.seq_hi].astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # stream offset of each seq
        self.num_tokens = int(self.offsets[-1])
        self.packed = True

    def __len__(self) -> int:
        return self.num_tokens // self.seq_length

    def __getitem__(self, i: int) -> Row:
        s = self.seq_length
        start, end = i * s, (i + 1) * s
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts, starts, pos = [], [0], start
        while pos < end:
            off = pos - int(self.offsets[k])
            take = min(end - pos, int(self.offsets[k + 1]) - pos)
            parts.append(self.ds.get(self.seq_lo + k, off, take))
            pos += take
            k += 1
            if pos < end:
                starts.append(pos - start)
        ids = np.concatenate(parts).astype(np.int64)
        if self.reset_position_ids:
            st = np.unique(np.concatenate([np.asarray(starts), _eos_starts(ids, self.eos_id)]))
            position_ids = positions_from_starts(st, s)
        else:
            position_ids = np.arange(s, dtype=np.int64)
        return Row(ids, ids.copy(), position_ids)


class SFTSource:
    """Rows of the ``_packed_*`` instruction files (packed or not) of a document range."""

    def __init__(
        self,
        prefix: str,
        doc_range: tuple[int, int] | None = None,
        eos_id: int | None = None,
        packed: str = "auto",
        reset_at_eos: bool = False,
    ):
        self.prefix = prefix
        self.reset_at_eos = reset_at_eos
        self._warned_plain = False
        files = sft_field_prefixes(prefix)
        self.fields = {f: IndexedDataset(p) for f, p in files.items() if f in SFT_FIELDS}
        n = {f: len(d) for f, d in self.fields.items()}
        if len(set(n.values())) != 1:
            raise DataError(
                f"SFT data {prefix!r}: the field files have different row counts {n}; they "
                "come from different preprocess runs; rebuild them"
            )
        ids = self.fields["input_ids"]
        if not np.array_equal(ids.sizes, self.fields["labels"].sizes):
            raise DataError(f"SFT data {prefix!r}: input_ids and labels rows differ in length")
        lo, hi = doc_range if doc_range is not None else (0, ids.num_documents)
        di = ids.document_indices
        self.rows = np.arange(int(di[lo]), int(di[hi]), dtype=np.int64)
        self.eos_id = eos_id
        lengths = ids.sizes
        same = len(lengths) > 0 and bool((lengths == lengths[0]).all())
        self.packed = same if packed == "auto" else packed == "true"
        self.row_length = int(lengths[0]) if same else None
        if self.packed and not same:
            raise DataError(
                f"data.packed=true but the rows of {prefix!r} have lengths "
                f"{int(lengths.min())}..{int(lengths.max())}; packed rows all have one length. "
                "Use data.packed=auto (or false) for non-packed data, or preprocess with --pack"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        r = int(self.rows[i])
        ids = self.fields["input_ids"].get(r).astype(np.int64)
        labels = self.fields["labels"].get(r).astype(np.int64)
        n = len(ids)
        if not self.packed:
            return Row(ids, labels, np.arange(n, dtype=np.int64))
        mask = self.fields.get("attention_mask")
        m = mask.get(r) if mask is not None else None
        if m is not None and (m.max(initial=0) > 1 or (m == 0).any()):
            # neat-pack: sample index 1..k, 0 on padding; every change starts a document
            starts = np.concatenate([[0], np.nonzero(m[1:] != m[:-1])[0] + 1])
        elif self.reset_at_eos:
            starts = _eos_starts(ids, self.eos_id)
        else:
            if not self._warned_plain:
                self._warned_plain = True
                logger.warning(
                    "%s: plain packed rows (no --neat-pack) train as one sequence each, so "
                    "attention crosses sample boundaries; preprocess with --neat-pack to keep "
                    "samples apart",
                    self.prefix,
                )
            starts = np.zeros(1, dtype=np.int64)
        return Row(ids, labels, positions_from_starts(starts, n))


class BlendedSampler:
    """Global sample index -> (source, row), blending sources by weight, shuffled per epoch.

    Which source serves index ``g`` is chosen greedily so every prefix of the sequence
    matches the weights as closely as possible (Megatron's blending rule); within a source,
    each epoch is a fresh permutation seeded by (seed, source, epoch).
    """

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int, shuffle: bool):
        for src in sources:
            if len(src) == 0:
                raise DataError(
                    f"dataset {src.prefix!r} has no rows in this split (too little data for "
                    "data.seq_length, or data.split gives it no documents)"
                )
        self.sources = list(sources)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = seed
        self.shuffle = shuffle
        self._choice = np.zeros(0, dtype=np.int64)
        self._within = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(len(self.sources), dtype=np.int64)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _extend(self, n: int) -> None:
        start = len(self._choice)
        if n <= start:
            return
        n = max(n, 2 * start, 1024)
        if len(self.sources) == 1:  # nothing to blend
            self._choice = np.zeros(n, dtype=np.int64)
            self._within = np.arange(n, dtype=np.int64)
            return
        weights = self.weights.tolist()
        counts = self._counts.tolist()
        choice, within = [], []
        ks = range(len(weights))
        for g in range(start, n):
            # the dataset furthest behind its share of the first g + 1 samples (first on ties)
            k = max(ks, key=lambda i: weights[i] * (g + 1) - counts[i])
            choice.append(k)
            within.append(counts[k])
            counts[k] += 1
        self._counts = np.asarray(counts, dtype=np.int64)
        self._choice = np.concatenate([self._choice, np.asarray(choice, dtype=np.int64)])
        self._within = np.concatenate([self._within, np.asarray(within, dtype=np.int64)])

    def _perm(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            n = len(self.sources[k])
            rng = np.random.default_rng([self.seed, k, epoch])
            self._perms[key] = rng.permutation(n) if self.shuffle else np.arange(n)
            while len(self._perms) > 2 * len(self.sources):
                self._perms.popitem(last=False)
        return self._perms[key]

    def __getitem__(self, g: int) -> Row:
        self._extend(g + 1)
        k, j = int(self._choice[g]), int(self._within[g])
        n = len(self.sources[k])
        return self.sources[k][int(self._perm(k, j // n)[j % n])]


@dataclass
class Collator:
    """Rows -> ``{input_ids, labels, position_ids}`` int64 tensors [B, L]."""

    seq_length: int
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None  # None: always seq_length

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        s = self.seq_length
        longest = max(min(len(r.input_ids), s) for r in rows)
        m = self.pad_to_multiple_of
        length = s if m is None else max(longest, min(s, -(-longest // m) * m))
        ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros((len(rows), length), dtype=np.int64)
        for b, r in enumerate(rows):
            n = min(len(r.input_ids), length)
            ids[b, :n] = r.input_ids[:n]
            labels[b, :n] = r.labels[:n]
            pos[b, :n] = r.position_ids[:n]
            # padding is its own document: it neither sees nor is seen by the row's tokens
            pos[b, n:] = np.arange(length - n)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
        }


class TrainLoader:
    """Global batches of a sampler, this data-parallel rank's share, as micro-batches."""

    def __init__(
        self,
        sampler: BlendedSampler,
        collate: Collator,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        assert global_batch_size % (micro_batch_size * dp_size) == 0
        self.sampler = sampler
        self.collate = collate
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = 0

    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        share = self.global_batch_size // self.dp_size
        base = self.consumed_samples + self.dp_rank * share
        out = []
        for m in range(0, share, self.micro_batch_size):
            rows = [self.sampler[base + m + i] for i in range(self.micro_batch_size)]
            out.append(self.collate(rows))
        self.consumed_samples += self.global_batch_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def eval_batches(
    sources: Sequence,
    collate: Collator,
    micro_batch_size: int,
    max_micro_batches: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The eval split in order, as rounds of micro-batches: round i holds this rank's
    micro-batch i (every rank gets the same number of rounds; a short last round is
    dropped so shapes stay equal across ranks)."""
    index = [(k, i) for k, src in enumerate(sources) for i in range(len(src))]
    per_round = micro_batch_size * dp_size
    num_rounds = len(index) // per_round
    if max_micro_batches:
        num_rounds = min(num_rounds, max_micro_batches)
    for r in range(num_rounds):  # lazily: an eval split may be large
        lo = r * per_round + dp_rank * micro_batch_size
        yield [collate([sources[k][i] for k, i in index[lo : lo + micro_batch_size]])]


# ---- pre-flight checks ---------------------------------------------------------------------


FULL_SCAN_ELEMENTS = 1 << 28  # larger token files are checked on evenly spread samples
_CHUNK = 1 << 22


def _max_min(ds: IndexedDataset, rows: np.ndarray | None = None) -> tuple[int, int]:
    """Largest and smallest token id (all of a file up to FULL_SCAN_ELEMENTS, else 64
    evenly spread chunks: a wrong tokenizer shows up everywhere, and a full pass over a
    100-GB corpus at every start would cost minutes)."""
    data = ds.tokens if len(ds) else np.zeros(0, ds.dtype)
    if rows is not None and len(rows) < len(ds):
        if len(rows) == 0:
            return 0, 0
        lo = int(ds.pointers[rows[0]]) // ds.dtype.itemsize
        hi = int(ds.pointers[rows[-1]]) // ds.dtype.itemsize + int(ds.sizes[rows[-1]])
        data = data[lo:hi]
    if data.size == 0:
        return 0, 0
    if data.size <= FULL_SCAN_ELEMENTS:
        starts = range(0, data.size, _CHUNK)
    else:
        logger.info("%s.bin: checking token ids on 64 samples of the file", ds.prefix)
        starts = np.linspace(0, data.size - _CHUNK, 64).astype(np.int64).tolist()
    mx, mn = -(2**62), 2**62
    for c in starts:  # chunked: never a full int64 copy of the file
        part = data[c : c + _CHUNK]
        mx, mn = max(mx, int(part.max())), min(mn, int(part.min()))
    return mx, mn


def check_sources(sources: Sequence, vocab_size: int, seq_length: int) -> None:
    """Errors a user can fix before training starts: row length, token ids out of range."""
    for src in sources:
        if isinstance(src, SFTSource):
            if src.packed and src.row_length != seq_length:
                raise DataError(
                    f"packed SFT data {src.prefix!r} has rows of {src.row_length} tokens but "
                    f"data.seq_length is {seq_length}; set --data.seq_length={src.row_length} "
                    f"or re-run `tunelab preprocess --pack --seq-length {seq_length}`"
                )
            ids, labels = src.fields["input_ids"], src.fields["labels"]
            long = int((ids.sizes[src.rows] > seq_length).sum()) if len(src.rows) else 0
            if long and not src.packed:
                logger.warning(
                    "%s: %d of %d rows are longer than data.seq_length=%d and are cut at it "
                    "(raise seq_length or filter them in preprocess with --seq-length)",
                    src.prefix,
                    long,
                    len(src.rows),
                    seq_length,
                )
            mx, mn = _max_min(ids)
            lmx, lmn = _max_min(labels)
            where = f"{ids.prefix}.bin"
            if lmx >= vocab_size or (lmn < 0 and lmn != IGNORE_INDEX):
                raise DataError(
                    f"{labels.prefix}.bin: label ids span [{lmn}, {lmx}] but the model's "
                    f"vocabulary has {vocab_size} ids (and -100 = ignore); was the data "
                    "tokenized with another tokenizer?"
                )
        else:
            mx, mn = _max_min(src.ds)
            where = f"{src.prefix}.bin"
        if mx >= vocab_size or mn < 0:
            raise DataError(
                f"{where}: token ids span [{mn}, {mx}] but the model's vocabulary has "
                f"{vocab_size} ids; the data was tokenized with a different tokenizer than "
                "this model's: re-run `tunelab preprocess` with the model's tokenizer"
            )


def render_sample(row: Row, tokenizer, mark: tuple[str, str] = ("[[", "]]")) -> str:
    """Decode one row with the supervised spans (labels != -100) wrapped in ``mark``."""
    ids = row.input_ids.tolist()
    sup = (row.labels != IGNORE_INDEX).tolist()
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and sup[j] == sup[i]:
            j += 1
        text = tokenizer.decode(ids[i:j], skip_special_tokens=False)
        out.append(f"{mark[0]}{text}{mark[1]}" if sup[i] else text)
        i = j
    return "".join(out)
