"""Chat prompts are the ids `tunelab preprocess` writes for the same conversation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.infer import lively_model_dir
from tunelab.cli import main
from tunelab.data.indexed import IndexedDataset
from tunelab.infer.chat import ChatSession
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig

SYSTEM = "Be brief."
TURNS = [("Hello there", "Hi! 你好"), ("12 + 30?", "42"), ("Über café?", "naïve 🙂")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return lively_model_dir(tmp_path_factory.mktemp("tpl"), "qwen2_untied", tiny_tokenizer_dir)


def _preprocessed_prompt(tmp_path, model_dir, template_flags: list[str]) -> list[int]:
    """Run preprocess on the conversation; return the ids before the last answer."""
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in TURNS:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    src = tmp_path / "conv.jsonl"
    src.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
    prefix = tmp_path / "out" / "conv"
    rc = main(["preprocess", "--input", str(src), "--handler-name", "openai",
               "--tokenizer-name-or-path", str(model_dir), "--output-prefix", str(prefix),
               *template_flags])  # fmt: skip
    assert rc == 0
    ids = IndexedDataset(f"{prefix}_packed_input_ids_document")[0]
    labels = IndexedDataset(f"{prefix}_packed_labels_document")[0]
    supervised = labels != -100
    # the last answer starts where the final run of supervised labels begins
    starts = np.flatnonzero(supervised[1:] & ~supervised[:-1]) + 1
    return ids[: starts[-1]].tolist()


@pytest.mark.parametrize(
    "flags",
    [
        ["--prompt-type", "qwen"],
        ["--hf-chat-template"],
        ["--prompt-type", "qwen3", "--enable-thinking", "false"],
    ],
    ids=["qwen", "hf", "qwen3-nothink"],
)
def test_chat_prompt_equals_preprocess(flags, model_dir, tmp_path):
    # As users do: the model directory is preprocess's --tokenizer-name-or-path.
    expected = _preprocessed_prompt(tmp_path, model_dir, flags)
    engine = Engine.from_pretrained(
        model_dir, device="cpu", prompt_type=flags[1] if len(flags) > 1 else None,
        hf_chat_template=flags == ["--hf-chat-template"],
        enable_thinking=False if "--enable-thinking" in flags else None,
    )  # fmt: skip
    session = ChatSession(engine, GenerationConfig(max_new_tokens=2), system=SYSTEM)
    for q, a in TURNS[:-1]:
        session.history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    assert session.prompt_ids(TURNS[-1][0]) == expected
    # The server's chat endpoint and `generate --chat`-style rendering use the same ids.
    msgs = [{"role": "system", "content": SYSTEM}, *session.history,
            {"role": "user", "content": TURNS[-1][0]}]  # fmt: skip
    assert engine.encode_chat(msgs) == expected


def test_history_window_with_template(model_dir):
    engine = Engine.from_pretrained(model_dir, device="cpu", prompt_type="qwen")
    session = ChatSession(engine, GenerationConfig(max_new_tokens=3), history_turns=1)
    "".join(session.reply("first"))
    second = "".join(session.reply("second"))
    session._trim()
    window = [{"role": "user", "content": "second"}, {"role": "assistant", "content": second},
              {"role": "user", "content": "third"}]  # fmt: skip
    assert session.prompt_ids("third") == engine.encode_chat(window)
