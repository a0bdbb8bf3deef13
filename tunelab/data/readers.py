"""Read rows from .parquet / .arrow / .json / .jsonl / .csv / .txt files or a directory of them.

A directory must hold one format (hidden files and other extensions are ignored); mixing
formats is an error that lists them. Rows come out as ``(loc, payload)``: ``loc`` names the
file and row for error messages, and ``payload`` is a dict, or for JSON lines the raw line
(a str), which workers parse (so a malformed line is reported by file and line, in parallel).

Row numbers: ``line N`` (1-based) for .jsonl and .txt, ``row N`` (0-based, as ``datasets``
and pandas index) for the other formats.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.errors import DataError

EXTENSIONS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".txt": "txt",
}


class Loc(NamedTuple):
    """Where a row is; formats as "path line N" / "path row N" only when a message needs it
    (cheap to build and to send to workers: the path string is shared, not copied)."""

    path: str
    n: int
    unit: str  # "line" | "row"

    def __str__(self) -> str:
        return f"{self.path} {self.unit} {self.n}"


def list_input_files(path: str | os.PathLike) -> list[Path]:
    """The data files of ``path`` (a file, or a directory with one format), in sorted order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--input {p} does not exist")
    if p.is_dir():
        files = sorted(
            f
            for f in p.iterdir()
            if not f.name.startswith(".") and f.suffix.lower() in EXTENSIONS and not f.is_dir()
        )
        if not files:
            supported = " ".join(EXTENSIONS)
            raise DataError(f"--input {p} holds no data files (supported: {supported})")
        kinds = Counter(f.suffix.lower() for f in files)
        if len(kinds) > 1:
            listing = ", ".join(f"{n} {ext}" for ext, n in sorted(kinds.items()))
            raise DataError(f"--input {p} mixes formats ({listing}); put one format per directory")
        return files
    if p.suffix.lower() not in EXTENSIONS:
        raise DataError(
            f"--input {p}: unsupported extension {p.suffix!r}; use one of {' '.join(EXTENSIONS)}"
        )
    return [p]


def _arrow_table_batches(path: Path):
    import pyarrow as pa

    # `datasets.save_to_disk` writes the IPC stream format; other tools write the file format.
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _parse_json_file(path: Path) -> list[Any] | None:
    """A whole-file JSON array (None when the file is JSON lines instead)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold an array of rows or JSON lines")
    return data


def iter_file(path: Path) -> Iterator[tuple[Loc, Any]]:
    """(Loc, payload) for every row: a dict, or a raw JSON line (str) for workers to parse."""
    kind = EXTENSIONS[path.suffix.lower()]
    name = str(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(name).iter_batches(batch_size=2048):
            for row in batch.to_pylist():
                yield Loc(name, n, "row"), row
                n += 1
    elif kind == "arrow":
        n = 0
        for batch in _arrow_table_batches(path):
            for row in batch.to_pylist():
                yield Loc(name, n, "row"), row
                n += 1
    elif kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f)):
                yield Loc(name, n, "row"), row
    elif kind == "txt":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield Loc(name, n, "line"), {"text": line.rstrip("\n")}
    else:
        data = _parse_json_file(path) if kind == "json" else None
        if data is not None:
            for n, row in enumerate(data):
                yield Loc(name, n, "row"), row
            return
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield Loc(name, n, "line"), line


def iter_rows(files: list[Path], max_rows: int | None = None) -> Iterator[tuple[Loc, Any]]:
    """All rows of ``files`` in order, at most ``max_rows``."""
    n = 0
    for path in files:
        for item in iter_file(path):
            if max_rows is not None and n >= max_rows:
                return
            yield item
            n += 1


def materialize(payload: Any, where) -> Any:
    """Parse a raw JSON line (in a worker); other payloads are already rows."""
    if isinstance(payload, str):
        try:
            return json.loads(payload)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
    return payload


def count_rows(files: list[Path]) -> int | None:
    """Row count without parsing rows where that is cheap; None when it is not."""
    total = 0
    for path in files:
        kind = EXTENSIONS[path.suffix.lower()]
        if kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(str(path)).metadata.num_rows
        elif kind in ("jsonl", "txt") or (kind == "json" and not _starts_array(path)):
            if not path.is_file():  # a pipe or device: counting would consume it
                return None
            with open(path, "rb") as f:
                if kind == "txt":
                    total += sum(1 for _ in f)
                else:
                    total += sum(1 for line in f if line.strip())
        else:
            return None
    return total


def _starts_array(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.read(4096).lstrip().startswith("[")
