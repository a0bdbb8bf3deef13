"""BoolQ: a directory with a JSON Lines file whose name contains ``dev`` (scored) and, for
few-shot prompts, one whose name contains ``train``. Rows: {"question", "passage", "answer":
bool, "title"}.

Prompt (lm-eval ``boolq``): "{passage}\\nQuestion: {question}?\\nAnswer:"; choices " no" and
" yes"; few-shot examples are the first K rows of the train file. MindSpeed scores the same
prompt by comparing the log-probabilities of Yes and No, which is what log-likelihood mode does.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.errors import DataError
from tunelab.eval.tasks.base import Doc, Subject, Task, read_jsonl, require_dir

_FIELDS = {"question": str, "passage": str, "answer": bool}


def _find(data_dir: Path, word: str) -> Path | None:
    found = sorted(p for p in data_dir.glob("*.jsonl") if word in p.name)
    return found[0] if found else None


class BoolQ(Task):
    name = "boolq"
    default_scoring = "loglikelihood"
    default_shots = 0
    default_max_new_tokens = 3
    stop = ("\n",)

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        data_dir = Path(data_dir)
        if data_dir.is_file():
            dev, data_dir = data_dir, data_dir.parent
        else:
            require_dir(data_dir, "boolq data")
            dev = _find(data_dir, "dev")
            if dev is None:
                raise DataError(
                    f"{data_dir}: no *.jsonl file with 'dev' in its name (boolq layout)"
                )
        docs = [Doc("boolq", s, r) for s, r in read_jsonl(dev, _FIELDS)]
        shot_docs: list[Doc] = []
        if shots > 0:
            train = _find(data_dir, "train")
            if train is None:
                raise DataError(
                    f"{data_dir}: --shots {shots} needs a *.jsonl file with 'train' in its name"
                )
            shot_docs = [Doc("boolq", s, r) for s, r in read_jsonl(train, _FIELDS)][:shots]
            if len(shot_docs) < shots:
                raise DataError(f"{train}: {len(shot_docs)} rows, fewer than --shots {shots}")
        return [Subject("boolq", docs, shot_docs)]

    def doc_to_text(self, doc: Doc) -> str:
        return f"{doc.fields['passage']}\nQuestion: {doc.fields['question']}?\nAnswer:"

    def choices(self, doc: Doc) -> list[str]:
        return ["no", "yes"]

    def gold(self, doc: Doc) -> int:
        return int(doc.fields["answer"])

    def extract(self, generated: str, doc: Doc) -> str:
        m = re.match(r"\s*(yes|no)\b", generated, re.I)
        return m.group(1).lower() if m else ""


TASK = BoolQ()
