"""C-Eval: ``val/{subject}_val.csv`` and ``dev/{subject}_dev.csv``, both with a header line
(id,question,A,B,C,D,answer[,explanation]); the official test split has no answers.

Prompt (lm-eval ``ceval-valid``): "以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\\n\\n",
K dev rows, then "{question}\\nA. ..\\nD. ..\\n答案：". The Chinese subject name comes from the
official ``subject_mapping.json`` next to ``val/`` when present, else the file name is used.
Generation mode takes the first capital letter A-D of the output (MindSpeed's prompt-type rule).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import DataError
from tunelab.eval.tasks.base import Doc, Subject, first_letter
from tunelab.eval.tasks.mcq import CsvChoiceTask


class CEval(CsvChoiceTask):
    name = "ceval"
    split = "val"
    suffix = "_val.csv"
    header = True
    answer_prompt = "答案："
    mapping_index = 1  # subject_mapping.json: subject -> [english, chinese, category]

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        subjects = super().load(data_dir, shots)
        split_dir, _ = self._dirs(Path(data_dir))
        for cand in (split_dir / "subject_mapping.json", split_dir.parent / "subject_mapping.json"):
            if cand.is_file():
                try:
                    mapping = json.loads(cand.read_text(encoding="utf-8"))
                    self.names = {k: v[self.mapping_index] for k, v in mapping.items()}
                except (json.JSONDecodeError, TypeError, IndexError, KeyError) as e:
                    raise DataError(
                        f"{cand}: expected {{subject: [english, chinese, category]}} ({e})"
                    ) from None
                break
        return subjects

    def description(self, subject: str) -> str:
        return f"以下是中国关于{self.names.get(subject, subject)}的单项选择题，请选出其中的正确答案。\n\n"

    def extract(self, generated: str, doc: Doc) -> str:
        return first_letter(generated)


TASK = CEval()
