"""CMMLU: ``test/{subject}.csv`` and ``dev/{subject}.csv`` with the header ",Question,A,B,C,D,Answer".

Prompt (lm-eval ``cmmlu``): "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\\n\\n",
K dev rows, then "{Question}\\nA. ..\\nD. ..\\n答案：". Generation mode takes the first capital
letter A-D of the output.
"""

from __future__ import annotations

from tunelab.eval.tasks.base import Doc, first_letter
from tunelab.eval.tasks.mcq import CsvChoiceTask


class CMMLU(CsvChoiceTask):
    name = "cmmlu"
    split = "test"
    suffix = ".csv"
    dev_suffix = ".csv"
    header = True
    columns = ["Question", "A", "B", "C", "D", "Answer"]
    question_key = "Question"
    answer_key = "Answer"
    answer_prompt = "答案："

    def description(self, subject: str) -> str:
        return f"以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"

    def extract(self, generated: str, doc: Doc) -> str:
        return first_letter(generated)


TASK = CMMLU()
