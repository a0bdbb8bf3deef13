"""Exact few-shot prompt text, answer extraction and data-file errors for every task."""

from __future__ import annotations

import json

import pytest

from tests.helpers import eval as data
from tunelab.errors import DataError
from tunelab.eval.tasks import get_task


def _first_prompt(task_name, root, shots):
    task = get_task(task_name)
    subjects = task.load(root, shots)
    subject = subjects[0]
    return task, subject, task.prompt(subject.docs[0], subject.shots)


def test_mmlu_prompt(tmp_path):
    task, subject, prompt = _first_prompt("mmlu", data.write_mmlu(tmp_path), 2)
    assert subject.name == "abstract_algebra"
    assert prompt == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Dev question one?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
        "Dev question two?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer: D\n\n"
        "The order of the group Z_4 is\nA. 2\nB. 4\nC. 8\nD. 1\nAnswer:"
    )
    doc = subject.docs[0]
    assert [task.target_delimiter + c for c in task.choices(doc)] == [" A", " B", " C", " D"]
    assert task.gold(doc) == 1
    # the scored split directory itself is accepted too (MindSpeed's --task-data-path .../test)
    again = task.load(tmp_path / "test", 2)
    assert task.prompt(again[0].docs[0], again[0].shots) == prompt
    # a quoted field with commas stays one field
    assert subject.docs[3].fields["A"] == "x, y"
    # MindSpeed's extraction in generation mode
    assert task.extract(" C. 8", doc) == "C"
    assert task.extract("B", doc) == "B"
    assert task.extract("the answer", doc) == ""


def test_ceval_prompt(tmp_path):
    task, subject, prompt = _first_prompt("ceval", data.write_ceval(tmp_path), 1)
    assert prompt == (
        "以下是中国关于物理的单项选择题，请选出其中的正确答案。\n\n"
        "Dev question one?\nA. a1\nB. b1\nC. c1\nD. d1\n答案： B\n\n"
        "What is the unit of force?\nA. newton\nB. joule\nC. watt\nD. pascal\n答案："
    )
    assert task.extract("答案是 C", subject.docs[0]) == "C"


def test_cmmlu_prompt(tmp_path):
    task, subject, prompt = _first_prompt("cmmlu", data.write_cmmlu(tmp_path), 1)
    assert prompt == (
        "以下是关于algebra的单项选择题，请直接给出正确答案的选项。\n\n"
        "Dev question one?\nA. a1\nB. b1\nC. c1\nD. d1\n答案： B\n\n"
        "The order of the group Z_4 is\nA. 2\nB. 4\nC. 8\nD. 1\n答案："
    )


def test_boolq_prompt(tmp_path):
    task, subject, prompt = _first_prompt("boolq", data.write_boolq(tmp_path), 1)
    assert prompt == (
        "Water makes things wet.\nQuestion: is water wet?\nAnswer: yes\n\n"
        "The sky looks blue by day.\nQuestion: is the sky blue?\nAnswer:"
    )
    assert task.choices(subject.docs[0]) == ["no", "yes"]
    assert [task.gold(d) for d in subject.docs] == [1, 0, 1, 0, 1]
    assert task.extract(" Yes, it is", subject.docs[0]) == "yes"


def test_gsm8k_prompt_and_extraction(tmp_path):
    task, subject, prompt = _first_prompt("gsm8k", data.write_gsm8k(tmp_path), 2)
    assert prompt == (
        "Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\n"
        "Question: What is 2*3?\nAnswer: 2*3=6\n#### 6\n\n"
        "Question: Tom has 2 apples and buys 3. How many?\nAnswer:"
    )
    doc = subject.docs[1]
    assert task.gold_text(doc) == "1000"
    assert task.extract(" 1200-200 = 1,000.\n#### 1,000", doc) == "1000"
    assert task.extract(" so there are 1,000 pens left.", doc) == "1000"
    assert task.is_correct(task.extract(" it is 999", doc), doc) is False


def test_bbh_prompt(tmp_path):
    task, subject, prompt = _first_prompt("bbh", data.write_bbh(tmp_path), 1)
    assert subject.name == "boolean_expressions"
    assert len(subject.docs) == 2  # the shot is not scored
    assert prompt == (
        "Q: not ( True ) and ( True ) is\nA: False\n\nQ: True and not not ( not False ) is\nA:"
    )
    last = subject.docs[1]
    assert task.is_correct(task.extract(" (b)\nmore text", last), last)


def test_agieval_prompt(tmp_path):
    task, subject, prompt = _first_prompt("agieval", data.write_agieval(tmp_path), 1)
    assert prompt == (
        "2+2=?\n(A)3\n(B)4\n(C)5\n(D)6\nAnswer: B\n\n"
        "A short passage.\nWhich is a color?\n(A)red\n(B)run\n(C)ran\n(D)runs\nAnswer:"
    )
    doc = subject.docs[0]
    assert task.choices(doc) == ["A", "B", "C", "D"] and task.gold(doc) == 0
    assert task.is_correct(task.extract("(A)\n", doc), doc)


def test_human_eval_prompt(tmp_path):
    task, subject, prompt = _first_prompt("human_eval", data.write_human_eval(tmp_path), 0)
    assert prompt == 'def add(a, b):\n    """Return a + b."""\n'
    assert task.program(subject.docs[0], "    return a + b\n") == (
        'def add(a, b):\n    """Return a + b."""\n    return a + b\n\n\n'
        "def check(candidate):\n    assert candidate(1, 2) == 3\n\n\ncheck(add)\n"
    )


# ---- malformed files: the error names the file and the row ------------------------------------


def test_mmlu_bad_row_names_file_and_row(tmp_path):
    root = data.write_mmlu(tmp_path)
    path = root / "test" / "high_school_physics_test.csv"
    path.write_text(path.read_text() + "too,few,columns\n")
    with pytest.raises(DataError, match=r"high_school_physics_test\.csv:6: expected 6 columns"):
        get_task("mmlu").load(root, 0)


def test_mmlu_bad_answer_letter(tmp_path):
    root = data.write_mmlu(tmp_path)
    path = root / "test" / "abstract_algebra_test.csv"
    path.write_text(path.read_text().replace(",B\n", ",E\n", 1))
    with pytest.raises(DataError, match=r"abstract_algebra_test\.csv:1: answer 'E'"):
        get_task("mmlu").load(root, 0)


def test_mmlu_missing_dev_file(tmp_path):
    root = data.write_mmlu(tmp_path)
    (root / "dev" / "abstract_algebra_dev.csv").unlink()
    with pytest.raises(DataError, match=r"abstract_algebra_dev\.csv: few-shot file"):
        get_task("mmlu").load(root, 1)
    get_task("mmlu").load(root, 0)  # zero-shot needs no dev file


def test_ceval_missing_header_column(tmp_path):
    root = data.write_ceval(tmp_path)
    path = root / "val" / "physics_val.csv"
    path.write_text(path.read_text().replace("answer", "solution", 1))
    with pytest.raises(
        DataError, match=r"physics_val\.csv:1: header .* lacks column\(s\) \['answer'\]"
    ):
        get_task("ceval").load(root, 0)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"dev\.jsonl:6: invalid JSON"),
        (json.dumps({"question": "q", "passage": "p"}), r"dev\.jsonl:6: missing key 'answer'"),
        (
            json.dumps({"question": "q", "passage": "p", "answer": "yes"}),
            r"dev\.jsonl:6: key 'answer' should be bool",
        ),
    ],
)
def test_boolq_bad_line(tmp_path, line, message):
    root = data.write_boolq(tmp_path)
    with (root / "dev.jsonl").open("a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=message):
        get_task("boolq").load(root, 0)


def test_gsm8k_answer_without_number(tmp_path):
    root = data.write_gsm8k(tmp_path)
    with (root / "test.jsonl").open("a") as f:
        f.write(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl:3: answer has no '#### <number>'"):
        get_task("gsm8k").load(root, 0)


def test_bbh_and_agieval_bad_rows(tmp_path):
    root = data.write_bbh(tmp_path / "bbh_root")
    (root / "bbh" / "x.json").write_text(json.dumps({"examples": [{"input": "a"}]}))
    with pytest.raises(DataError, match=r"x\.json: examples\[0\]: missing key 'target'"):
        get_task("bbh").load(root, 0)
    root = data.write_agieval(tmp_path / "agi")
    with (root / "data" / "v1" / "sat-math.jsonl").open("a") as f:
        f.write(json.dumps({"question": "q", "options": ["(A)1", "(B)2"], "label": "C"}) + "\n")
    with pytest.raises(DataError, match=r"sat-math\.jsonl:4: label 'C' is not among"):
        get_task("agieval").load(root, 0)


def test_mmlu_chinese_prompt(tmp_path):
    task = get_task("mmlu")
    task.language = "zh"
    subject = task.load(data.write_mmlu(tmp_path), 1)[1]
    assert task.prompt(subject.docs[0], subject.shots) == (
        "以下是中国关于high school physics考试的单项选择题，请选出其中的正确答案。\n\n"
        "Dev question one?\nA. a1\nB. b1\nC. c1\nD. d1\n答案： B\n\n"
        "What is the unit of force?\nA. newton\nB. joule\nC. watt\nD. pascal\n答案："
    )
    assert get_task("mmlu").language == "en"  # get_task gives a fresh instance
