"""BIG-Bench Hard: one ``{task}.json`` per sub-task, ``{"examples": [{"input", "target"}]}``
(the official repository's ``bbh/`` directory; ``--data-dir`` may name it or its parent).

Prompt: K examples "Q: {input}\\nA: {target}\\n\\n" then "Q: {input}\\nA:" (MindSpeed's
"Q: .. A:" form). The K few-shot examples are the first K of the same file and are not scored.
Generation stops at "Q:" or a blank line; the first output line is compared with the target
case-insensitively with parentheses removed (MindSpeed's rule).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import DataError
from tunelab.eval.tasks.base import Doc, Subject, Task, check_fields, require_dir


def _clean(text: str) -> str:
    return text.strip().replace("(", "").replace(")", "").strip().rstrip(".").lower()


class BBH(Task):
    name = "bbh"
    default_scoring = "generate"
    default_shots = 3
    default_max_new_tokens = 32
    stop = ("Q:", "\n\n")

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        data_dir = require_dir(Path(data_dir), "bbh data")
        if (data_dir / "bbh").is_dir():
            data_dir = data_dir / "bbh"
        files = sorted(p for p in data_dir.glob("*.json") if p.is_file())
        if not files:
            raise DataError(f"{data_dir}: no {{task}}.json files (bbh layout)")
        subjects = []
        for path in files:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
                raise DataError(f'{path}: expected {{"examples": [{{"input", "target"}}]}}')
            docs = []
            for i, rec in enumerate(data["examples"]):
                where = f"{path}: examples[{i}]"
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected an object with input and target")
                check_fields(rec, {"input": str, "target": str}, where)
                docs.append(Doc(path.stem, f"{path.name}:examples[{i}]", rec))
            if len(docs) <= shots:
                raise DataError(f"{path}: {len(docs)} examples, need more than --shots {shots}")
            subjects.append(Subject(path.stem, docs[shots:], docs[:shots]))
        return subjects

    def doc_to_text(self, doc: Doc) -> str:
        return f"Q: {doc.fields['input']}\nA:"

    def doc_to_target(self, doc: Doc) -> str:
        return doc.fields["target"]

    def gold_text(self, doc: Doc) -> str:
        return _clean(doc.fields["target"])

    def extract(self, generated: str, doc: Doc) -> str:
        lines = generated.strip().splitlines()
        return _clean(lines[0]) if lines else ""


TASK = BBH()
