"""GSM8K: ``test.jsonl`` (scored) and ``train.jsonl`` (few-shot) from the official
grade-school-math repository; rows {"question", "answer"} where the answer ends "#### N".

Prompt (lm-eval ``gsm8k``): K train rows "Question: {q}\\nAnswer: {a}\\n\\n", then
"Question: {q}\\nAnswer:". Generation stops at "Question:" or a blank line. The prediction is the
number after "####" if the model wrote one, else the last number in the output (lm-eval's
strict and flexible extraction in one); commas and a trailing '.' are removed before comparing.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.errors import DataError
from tunelab.eval.tasks.base import Doc, Subject, Task, read_jsonl, require_dir

_FIELDS = {"question": str, "answer": str}
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def normalize_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").strip().rstrip(".")


class GSM8K(Task):
    name = "gsm8k"
    default_scoring = "generate"
    default_shots = 5
    default_max_new_tokens = 256
    stop = ("Question:", "\n\n")

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        data_dir = require_dir(Path(data_dir), "gsm8k data")
        test = data_dir / "test.jsonl"
        if not test.is_file():
            raise DataError(f"{test}: not found (gsm8k layout: test.jsonl and train.jsonl)")
        docs = []
        for source, rec in read_jsonl(test, _FIELDS):
            if not _STRICT.search(rec["answer"]):
                raise DataError(
                    f"{data_dir / source.split(':')[0]}:{source.split(':')[1]}: "
                    "answer has no '#### <number>' line"
                )
            docs.append(Doc("gsm8k", source, rec))
        shot_docs: list[Doc] = []
        if shots > 0:
            train = data_dir / "train.jsonl"
            if not train.is_file():
                raise DataError(f"{train}: not found; --shots {shots} takes examples from it")
            shot_docs = [Doc("gsm8k", s, r) for s, r in read_jsonl(train, _FIELDS)][:shots]
            if len(shot_docs) < shots:
                raise DataError(f"{train}: {len(shot_docs)} rows, fewer than --shots {shots}")
        return [Subject("gsm8k", docs, shot_docs)]

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc.fields['question']}\nAnswer:"

    def doc_to_target(self, doc: Doc) -> str:
        return doc.fields["answer"]

    def gold_text(self, doc: Doc) -> str:
        return normalize_number(_STRICT.search(doc.fields["answer"]).group(1))

    def extract(self, generated: str, doc: Doc) -> str:
        m = _STRICT.search(generated)
        if m:
            return normalize_number(m.group(1))
        numbers = _NUMBER.findall(generated)
        return normalize_number(numbers[-1]) if numbers else ""


TASK = GSM8K()
