"""Helpers for data tests: tokenizers with family-specific special tokens, small input files."""

from __future__ import annotations

import json
from pathlib import Path

FAMILY_TOKENS = {
    # family: (bos, eos, extra special tokens)
    "llama2": ("<s>", "</s>", []),
    "mistral": ("<s>", "</s>", []),
    "llama3": (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
}


def family_tokenizer(base_dir: str | Path, out_dir: str | Path, family: str):
    """The tiny test tokenizer plus the special tokens of ``family``, saved to ``out_dir``."""
    from transformers import AutoTokenizer

    bos, eos, extra = FAMILY_TOKENS[family]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_special_tokens(
        {"bos_token": bos, "eos_token": eos, "additional_special_tokens": [bos, eos, *extra]}
    )
    tok.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def ids(tok, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens: how every template piece is tokenized."""
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: str | Path, rows: list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


ALPACA_ROWS = [
    {"instruction": "add 2 and 3", "input": "", "output": "5"},
    {"instruction": "say hi", "input": "to bob", "output": "hi bob", "system": "be nice"},
    {
        "instruction": "and then?",
        "input": "",
        "output": "done",
        "history": [["first q", "first a"], ["second q", "second a"]],
    },
]
