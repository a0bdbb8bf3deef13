"""Four-choice exam tasks stored as one CSV per subject (MMLU, C-Eval, CMMLU).

The official layouts put the scored split and the few-shot split in sibling directories
(``test/`` or ``val/`` next to ``dev/``); ``--data-dir`` may name either the parent or the
scored split directory itself. Few-shot examples are the first K rows of the subject's dev
file, as lm-eval's ``first_n`` sampler and MindSpeed's fixed 5-shot templates take them.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import DataError
from tunelab.eval.tasks.base import Doc, Subject, Task, check_letter, read_csv, require_dir


class CsvChoiceTask(Task):
    default_scoring = "loglikelihood"
    default_shots = 5
    default_max_new_tokens = 1
    stop = ("\n",)
    split = "test"  # directory of the scored split
    # file name = subject + suffix; suffix for the dev (few-shot) files
    suffix = "_test.csv"
    dev_suffix = "_dev.csv"
    header = False
    columns = ["question", "A", "B", "C", "D", "answer"]
    question_key = "question"
    answer_key = "answer"

    def _dirs(self, data_dir: Path) -> tuple[Path, Path]:
        require_dir(data_dir, f"{self.name} data")
        if (data_dir / self.split).is_dir():
            return data_dir / self.split, data_dir / "dev"
        return data_dir, data_dir.parent / "dev"

    def load(self, data_dir: Path, shots: int) -> list[Subject]:
        split_dir, dev_dir = self._dirs(Path(data_dir))
        files = sorted(p for p in split_dir.glob(f"*{self.suffix}") if p.is_file())
        if not files:
            raise DataError(
                f"{split_dir}: no *{self.suffix} files; {self.name} expects the official layout "
                f"({self.split}/{{subject}}{self.suffix} and dev/{{subject}}{self.dev_suffix})"
            )
        subjects = []
        for path in files:
            subject = path.name[: -len(self.suffix)]
            docs = self._read(path, subject)
            shot_docs: list[Doc] = []
            if shots > 0:
                dev = dev_dir / f"{subject}{self.dev_suffix}"
                if not dev.is_file():
                    raise DataError(
                        f"{dev}: few-shot file for subject {subject!r} not found; "
                        "add the dev split or pass --shots 0"
                    )
                shot_docs = self._read(dev, subject)
                if len(shot_docs) < shots:
                    raise DataError(f"{dev}: {len(shot_docs)} rows, fewer than --shots {shots}")
                shot_docs = shot_docs[:shots]
            subjects.append(Subject(subject, docs, shot_docs))
        return subjects

    def _read(self, path: Path, subject: str) -> list[Doc]:
        docs = []
        for source, rec in read_csv(
            path, self.columns, self.header, required=[self.question_key, self.answer_key]
        ):
            rec[self.answer_key] = check_letter(
                rec[self.answer_key], 4, f"{path}:{source.split(':')[-1]}"
            )
            docs.append(Doc(subject, source, rec))
        return docs

    def doc_to_text(self, doc: Doc) -> str:
        f = doc.fields
        return (
            f"{f[self.question_key].strip()}\nA. {f['A']}\nB. {f['B']}\nC. {f['C']}\n"
            f"D. {f['D']}\n{self.answer_prompt}"
        )

    answer_prompt = "Answer:"

    def choices(self, doc: Doc) -> list[str]:
        return ["A", "B", "C", "D"]

    def gold(self, doc: Doc) -> int:
        return "ABCD".index(doc.fields[self.answer_key])
