"""Small evaluation data sets written in the official on-disk layouts, for tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

MMLU_ROWS = {
    "high_school_physics": [
        ["What is the unit of force?", "newton", "joule", "watt", "pascal", "A"],
        ["Light travels fastest in", "glass", "water", "vacuum", "diamond", "C"],
        ["Which is a vector?", "mass", "speed", "time", "velocity", "D"],
        ["Sound cannot travel through", "air", "vacuum", "water", "steel", "B"],
        ["The SI unit of energy is", "joule", "newton", "volt", "ohm", "A"],
    ],
    "abstract_algebra": [
        ["The order of the group Z_4 is", "2", "4", "8", "1", "B"],
        ["Is Z_5 a field?", "yes", "no", "only under addition", "undefined", "A"],
        ["The identity of (Z, +) is", "1", "-1", "0", "none", "C"],
        ["A, group with, commas", "x, y", "z", "w", "v", "A"],
    ],
}
MMLU_DEV = [
    ["Dev question one?", "a1", "b1", "c1", "d1", "B"],
    ["Dev question two?", "a2", "b2", "c2", "d2", "D"],
    ["Dev question three?", "a3", "b3", "c3", "d3", "A"],
]

BOOLQ_DEV = [
    {
        "question": "is the sky blue",
        "passage": "The sky looks blue by day.",
        "answer": True,
        "title": "Sky",
    },
    {
        "question": "do fish fly",
        "passage": "Most fish swim; few glide.",
        "answer": False,
        "title": "Fish",
    },
    {"question": "is ice cold", "passage": "Ice is frozen water.", "answer": True, "title": "Ice"},
    {
        "question": "is the sun a planet",
        "passage": "The Sun is a star.",
        "answer": False,
        "title": "Sun",
    },
    {
        "question": "can birds sing",
        "passage": "Many birds sing at dawn.",
        "answer": True,
        "title": "Birds",
    },
]
BOOLQ_TRAIN = [
    {
        "question": "is water wet",
        "passage": "Water makes things wet.",
        "answer": True,
        "title": "Water",
    },
    {"question": "is stone soft", "passage": "Stone is hard.", "answer": False, "title": "Stone"},
]


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def write_mmlu(root: Path) -> Path:
    """``root/{test,dev}/{subject}_{split}.csv``, header-less (the official MMLU tarball)."""
    for subject, rows in MMLU_ROWS.items():
        _write_csv(root / "test" / f"{subject}_test.csv", rows)
        _write_csv(root / "dev" / f"{subject}_dev.csv", MMLU_DEV)
    return root


def write_ceval(root: Path) -> Path:
    """``root/{val,dev}/{subject}_{split}.csv`` with headers, plus subject_mapping.json."""
    head = ["id", "question", "A", "B", "C", "D", "answer"]
    rows = [[str(i), *r] for i, r in enumerate(MMLU_ROWS["high_school_physics"])]
    _write_csv(root / "val" / "physics_val.csv", rows, head)
    dev = [[str(i), *r, "because"] for i, r in enumerate(MMLU_DEV)]
    _write_csv(root / "dev" / "physics_dev.csv", dev, [*head, "explanation"])
    mapping = {"physics": ["Physics", "物理", "STEM"]}
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), "utf-8")
    return root


def write_cmmlu(root: Path) -> Path:
    """``root/{test,dev}/{subject}.csv`` with the header ',Question,A,B,C,D,Answer'."""
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    rows = [[str(i), *r] for i, r in enumerate(MMLU_ROWS["abstract_algebra"])]
    _write_csv(root / "test" / "algebra.csv", rows, head)
    _write_csv(root / "dev" / "algebra.csv", [[str(i), *r] for i, r in enumerate(MMLU_DEV)], head)
    return root


def write_boolq(root: Path) -> Path:
    _write_jsonl(root / "dev.jsonl", BOOLQ_DEV)
    _write_jsonl(root / "train.jsonl", BOOLQ_TRAIN)
    return root


def write_gsm8k(root: Path) -> Path:
    _write_jsonl(
        root / "test.jsonl",
        [
            {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=5\n#### 5"},
            {"question": "A box has 1,200 pens; 200 are sold. Left?", "answer": "#### 1,000"},
        ],
    )
    _write_jsonl(
        root / "train.jsonl",
        [
            {"question": "What is 1+1?", "answer": "1+1=2\n#### 2"},
            {"question": "What is 2*3?", "answer": "2*3=6\n#### 6"},
        ],
    )
    return root


def write_bbh(root: Path) -> Path:
    examples = [
        {"input": "not ( True ) and ( True ) is", "target": "False"},
        {"input": "True and not not ( not False ) is", "target": "True"},
        {"input": "Which is bigger?\nOptions:\n(A) 1\n(B) 2", "target": "(B)"},
    ]
    (root / "bbh").mkdir(parents=True, exist_ok=True)
    (root / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": examples}))
    return root


def write_agieval(root: Path) -> Path:
    rows = [
        {
            "passage": None,
            "question": "2+2=?",
            "options": ["(A)3", "(B)4", "(C)5", "(D)6"],
            "label": "B",
            "answer": None,
        },
        {
            "passage": "A short passage.",
            "question": "Which is a color?",
            "options": ["(A)red", "(B)run", "(C)ran", "(D)runs"],
            "label": "A",
            "answer": None,
        },
        {
            "passage": None,
            "question": "Pick the even number.",
            "options": ["(A)1", "(B)3", "(C)8", "(D)5"],
            "label": "C",
            "answer": None,
        },
    ]
    _write_jsonl(root / "data" / "v1" / "sat-math.jsonl", rows)
    return root


HUMAN_EVAL_ROWS = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def neg(x):\n    """Return -x."""\n',
        "canonical_solution": "    return -x\n",
        "test": "def check(candidate):\n    assert candidate(4) == -4\n",
        "entry_point": "neg",
    },
]


def write_human_eval(root: Path) -> Path:
    _write_jsonl(root / "HumanEval.jsonl", HUMAN_EVAL_ROWS)
    return root
