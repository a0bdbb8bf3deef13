"""MMLU: ``test/{subject}_test.csv`` (no header: question,A,B,C,D,answer), shots from ``dev/``.

Prompt (lm-eval ``mmlu`` and MindSpeed's 5-shot text): "The following are multiple choice
questions (with answers) about {subject}.\\n\\n", K dev rows each ending "Answer: X\\n\\n", then
"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:". Choices " A".." D".
``--eval-language zh`` uses MindSpeed's Chinese wording: "以下是中国关于{subject}考试的单项选择题，
请选出其中的正确答案。\\n\\n" and "答案：" in place of "Answer:".
"""

import re

from tunelab.eval.tasks.base import Doc
from tunelab.eval.tasks.mcq import CsvChoiceTask

_MMLU_FIRST = re.compile(r".*([ABCD])\..*")  # no DOTALL: the first line, as MindSpeed
_MMLU_LETTER = re.compile(r"([ABCD])")


class MMLU(CsvChoiceTask):
    name = "mmlu"
    languages = ("en", "zh")

    @property
    def answer_prompt(self) -> str:
        return "答案：" if self.language == "zh" else "Answer:"

    def description(self, subject: str) -> str:
        if self.language == "zh":
            return f"以下是中国关于{subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"
        return (
            "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n"
        )

    def extract(self, generated: str, doc: Doc) -> str:
        # MindSpeed's rule: a letter followed by '.', else a letter at the very start.
        text = generated.lstrip()
        m = _MMLU_FIRST.match(text) or _MMLU_LETTER.match(text)
        return m.group(1) if m else ""


TASK = MMLU()
