"""HumanEval: a JSON Lines file (``HumanEval.jsonl``, or any ``*.jsonl`` in ``--data-dir``)
with rows {"task_id", "prompt", "test", "entry_point"}.

The prompt is the function signature and docstring as given (the form base models are
evaluated with); the model's completion is cut at the first top-level ``def``, ``class``,
``if``, ``print`` or comment line, and ``prompt + completion + test + check(entry_point)`` runs
in `tunelab.eval.sandbox` (only with ``--allow-code-execution``). pass@1 with greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import DataError
from tunelab.eval.sandbox import Sandbox
from tunelab.eval.tasks.base import Doc, Subject, Task, read_jsonl

_FIELDS = {"task_id": str, "prompt": str, "test": str, "entry_point": str}


class HumanEval(Task):
    name = "human_eval"
    default_scoring = "generate"
    default_shots = 0
    default_max_new_tokens = 512
    stop = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")
    needs_code_execution = True

    def __init__(self) -> None:
        self.sandbox = Sandbox()

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        data_dir = Path(data_dir)
        if shots:
            raise DataError("human_eval is zero-shot; pass --shots 0")
        if data_dir.is_file():
            path = data_dir
        else:
            files = sorted(data_dir.glob("*.jsonl")) if data_dir.is_dir() else []
            if not files:
                raise DataError(f"{data_dir}: no HumanEval *.jsonl file found")
            path = (
                data_dir / "HumanEval.jsonl"
                if (data_dir / "HumanEval.jsonl").is_file()
                else files[0]
            )
        docs = [Doc("human_eval", s, r) for s, r in read_jsonl(path, _FIELDS)]
        return [Subject("human_eval", docs, [])]

    def doc_to_text(self, doc: Doc) -> str:
        return doc.fields["prompt"]

    def gold_text(self, doc: Doc) -> str:
        return "passed"

    def program(self, doc: Doc, completion: str) -> str:
        f = doc.fields
        return f"{f['prompt']}{completion}\n\n{f['test']}\n\ncheck({f['entry_point']})\n"

    def extract(self, generated: str, doc: Doc) -> str:
        return generated

    def judge(self, prediction: str, doc: Doc) -> tuple[bool, dict]:
        result = self.sandbox.run(self.program(doc, prediction))
        detail = {"status": result.status, "stderr": result.stderr[-500:]}
        return result.status == "passed", detail


TASK = HumanEval()
