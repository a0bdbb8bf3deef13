"""MMLU: ``test/{subject}_test.csv`` (no header: question,A,B,C,D,answer), shots from ``dev/``.

Prompt (lm-eval ``mmlu`` and MindSpeed's 5-shot text): "The following are multiple choice
questions (with answers) about {subject}.\\n\\n", K dev rows each ending "Answer: X\\n\\n", then
"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:". Choices " A".." D".
"""

import re

from tunelab.eval.tasks.base import Doc
from tunelab.eval.tasks.mcq import CsvChoiceTask

_MMLU_FIRST = re.compile(r".*([ABCD])\..*", re.S)
_MMLU_LETTER = re.compile(r"([ABCD])")


class MMLU(CsvChoiceTask):
    name = "mmlu"

    def description(self, subject: str) -> str:
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
