"""What every evaluation task provides: documents read from disk, prompts, choices, scoring.

Prompts are assembled the way lm-evaluation-harness assembles them, so log-likelihood numbers
are comparable with lm-eval: ``description + (shot_text + target_delimiter + shot_target +
fewshot_delimiter) * K + doc_text``; a choice is scored as ``target_delimiter + choice``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import ConfigError, DataError

LETTERS = "ABCDEFGHIJ"


@dataclass
class Doc:
    """One question. ``source`` is ``file:row`` (1-based row as a user sees it in an editor)."""

    subject: str
    source: str
    fields: dict


@dataclass
class Subject:
    """The documents to score for one subject and the documents its few-shot examples come from."""

    name: str
    docs: list[Doc]
    shots: list[Doc] = field(default_factory=list)


class Task:
    """Base class; subclasses set the class attributes and override the doc_* methods."""

    name: str = ""
    # "loglikelihood" (pick the most likely choice) or "generate" (generate, extract, compare)
    default_scoring: str = "loglikelihood"
    default_shots: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    # generation stops at the first of these strings (the text after it is dropped)
    stop: tuple[str, ...] = ()
    default_max_new_tokens: int = 32
    needs_code_execution: bool = False
    # prompt languages this task can be asked in (--eval-language); the first is the default
    languages: tuple[str, ...] = ("en",)
    language: str = "en"

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        raise NotImplementedError

    def description(self, subject: str) -> str:
        return ""

    def doc_to_text(self, doc: Doc) -> str:
        raise NotImplementedError

    def doc_to_target(self, doc: Doc) -> str:
        """The answer text a few-shot example shows after ``target_delimiter``."""
        choices = self.choices(doc)
        return choices[self.gold(doc)]

    def choices(self, doc: Doc) -> list[str]:
        """Continuations scored in log-likelihood mode (without the target delimiter)."""
        raise ConfigError(
            f"task {self.name} has no answer choices to score by log-likelihood; "
            "use --scoring generate"
        )

    def gold(self, doc: Doc) -> int:
        """Index of the correct choice."""
        raise NotImplementedError

    def gold_text(self, doc: Doc) -> str:
        """The reference answer a generated answer is compared with."""
        return self.choices(doc)[self.gold(doc)]

    def extract(self, generated: str, doc: Doc) -> str:
        """The answer inside generated text (generation mode)."""
        return generated.strip()

    def is_correct(self, prediction: str, doc: Doc) -> bool:
        return prediction == self.gold_text(doc)

    def judge(self, prediction: str, doc: Doc) -> tuple[bool, dict]:
        """Whether an extracted prediction is right, plus details kept in the JSON output."""
        return self.is_correct(prediction, doc), {}

    def prompt(self, doc: Doc, shots: list[Doc]) -> str:
        """The exact prompt text for ``doc`` with ``shots`` as few-shot examples."""
        parts = [self.description(doc.subject)]
        for shot in shots:
            parts.append(
                self.doc_to_text(shot)
                + self.target_delimiter
                + self.doc_to_target(shot)
                + self.fewshot_delimiter
            )
        parts.append(self.doc_to_text(doc))
        return "".join(parts)


# ---- readers: every malformed row is an error that names the file and the row -------------


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what}: directory {path} does not exist; pass --data-dir DIR")
    return path


def read_csv(
    path: Path, columns: list[str], header: bool, required: list[str] | None = None
) -> list[tuple[str, dict]]:
    """Rows of a CSV file as ``(source, {column: value})``.

    ``header=False``: the file has no header line and ``columns`` names its columns in order.
    ``header=True``: the first line is a header that must contain every name in ``columns``.
    """
    required = columns if required is None else required
    rows: list[tuple[str, dict]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            names = columns
            first = 1
            if header:
                try:
                    names = [c.strip() for c in next(reader)]
                except StopIteration:
                    raise DataError(f"{path}: empty file, expected a header line") from None
                missing = [c for c in columns if c not in names]
                if missing:
                    raise DataError(
                        f"{path}:1: header {names} lacks column(s) {missing}; "
                        f"expected a header with {columns}"
                    )
                first = 2
            for line_no, row in enumerate(reader, start=first):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(names):
                    raise DataError(
                        f"{path}:{line_no}: expected {len(names)} columns ({names}), "
                        f"found {len(row)}; quote fields that contain commas"
                    )
                rec = dict(zip(names, row))
                empty = [c for c in required if not rec.get(c, "").strip()]
                if empty:
                    raise DataError(f"{path}:{line_no}: empty value in column(s) {empty}")
                rows.append((f"{path.name}:{line_no}", rec))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    return rows


def read_jsonl(path: Path, required: dict[str, type | tuple]) -> list[tuple[str, dict]]:
    """Rows of a JSON Lines file; ``required`` maps each key that must be present to its type."""
    rows: list[tuple[str, dict]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, found {type(rec).__name__}")
        check_fields(rec, required, f"{path}:{line_no}")
        rows.append((f"{path.name}:{line_no}", rec))
    return rows


def check_fields(rec: dict, required: dict[str, type | tuple], where: str) -> None:
    for key, typ in required.items():
        if key not in rec:
            raise DataError(f"{where}: missing key {key!r} (keys present: {sorted(rec)})")
        if not isinstance(rec[key], typ):
            want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise DataError(
                f"{where}: key {key!r} should be {want}, found {type(rec[key]).__name__}"
            )


def check_letter(value: str, num_choices: int, where: str) -> str:
    value = value.strip()
    if value not in LETTERS[:num_choices]:
        raise DataError(f"{where}: answer {value!r} is not one of {list(LETTERS[:num_choices])}")
    return value


def first_letter(text: str, letters: str = "ABCD") -> str:
    """The first capital letter among ``letters`` in ``text`` ('' if none)."""
    m = re.search(f"[{letters}]", text)
    return m.group(0) if m else ""
