"""AGIEval: one ``{subject}.jsonl`` per exam (the official ``data/v1/`` directory); rows
{"passage", "question", "options", "label", "answer"}. Multiple-choice rows have ``options``
(strings such as "(A)...") and a letter ``label``; cloze rows (math) have ``answer`` only.

Prompt: "{passage}\\n{question}\\n{options, one per line}\\nAnswer:" (passage line only when
present). K few-shot examples are the first K rows of the same file and are not scored.
Log-likelihood mode scores " A", " B", ...; generation mode takes the first output line with
"$", "(" and ")" removed (MindSpeed's rule) and compares it with the label or answer.
Multi-answer rows (a list label) count as correct only when every letter matches.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ConfigError, DataError
from tunelab.eval.tasks.base import LETTERS, Doc, Subject, Task, read_jsonl, require_dir


def _strip(text: str) -> str:
    return text.replace("$", "").replace("(", "").replace(")", "").strip()


class AGIEval(Task):
    name = "agieval"
    default_scoring = "generate"
    default_shots = 0
    default_max_new_tokens = 16
    stop = ("\n",)

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        data_dir = require_dir(Path(data_dir), "agieval data")
        for sub in ("data/v1", "v1"):
            if (data_dir / sub).is_dir():
                data_dir = data_dir / sub
        files = sorted(p for p in data_dir.glob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{data_dir}: no {{subject}}.jsonl files (agieval layout: data/v1/)")
        subjects = []
        for path in files:
            docs = []
            for source, rec in read_jsonl(path, {"question": str}):
                where = f"{path}:{source.rsplit(':', 1)[1]}"
                options = rec.get("options") or []
                label = rec.get("label")
                if options:
                    if not isinstance(options, list) or not all(
                        isinstance(o, str) for o in options
                    ):
                        raise DataError(f"{where}: 'options' should be a list of strings")
                    letters = LETTERS[: len(options)]
                    labels = label if isinstance(label, list) else [label]
                    if not labels or any(x not in letters for x in labels):
                        raise DataError(f"{where}: label {label!r} is not among {list(letters)}")
                elif rec.get("answer") in (None, ""):
                    raise DataError(f"{where}: a row needs 'options' + 'label' or an 'answer'")
                docs.append(Doc(path.stem, source, rec))
            if len(docs) <= shots:
                raise DataError(f"{path}: {len(docs)} rows, need more than --shots {shots}")
            subjects.append(Subject(path.stem, docs[shots:], docs[:shots]))
        return subjects

    def doc_to_text(self, doc: Doc) -> str:
        f = doc.fields
        lines = [f["passage"]] if f.get("passage") else []
        lines.append(f["question"])
        lines.extend(f.get("options") or [])
        lines.append("Answer:")
        return "\n".join(lines)

    def doc_to_target(self, doc: Doc) -> str:
        return self._gold(doc)

    def _gold(self, doc: Doc) -> str:
        label = doc.fields.get("label")
        if doc.fields.get("options"):
            return "".join(label) if isinstance(label, list) else label
        return str(doc.fields["answer"]).strip()

    def choices(self, doc: Doc) -> list[str]:
        options = doc.fields.get("options") or []
        if not options or isinstance(doc.fields.get("label"), list):
            raise ConfigError(
                f"agieval {doc.source}: log-likelihood scoring needs single-answer multiple "
                "choice rows; use --scoring generate for this subject"
            )
        return list(LETTERS[: len(options)])

    def gold(self, doc: Doc) -> int:
        return LETTERS.index(doc.fields["label"])

    def gold_text(self, doc: Doc) -> str:
        return _strip(self._gold(doc))

    def extract(self, generated: str, doc: Doc) -> str:
        lines = generated.strip().splitlines()
        return _strip(lines[0]) if lines else ""


TASK = AGIEval()
