"""`tunelab chat`: the REPL with history window, /clear and /exit (raw-text mode here)."""

from __future__ import annotations

import io

import pytest

from tests.helpers.infer import lively_model_dir
from tunelab.cli import main
from tunelab.infer.chat import ChatSession
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return lively_model_dir(tmp_path_factory.mktemp("chat"), "qwen2_untied", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, device="cpu")


def _reply(engine, text: str, n: int) -> str:
    return engine.complete([engine.encode_text(text)], GenerationConfig(max_new_tokens=n))[0].text


def test_history_window_raw_text(engine):
    s = ChatSession(engine, GenerationConfig(max_new_tokens=4), history_turns=2)
    said = []
    for msg in ["one", "two", "three", "four"]:
        expected_prompt = "".join(said[-4:]) + msg  # at most 2 previous exchanges
        s._trim()
        assert s.prompt_ids(msg) == engine.encode_text(expected_prompt)
        reply = "".join(s.reply(msg))
        assert reply == _reply(engine, expected_prompt, 4)
        said += [msg, reply]
    assert len(s.history) == 6  # trimmed to 2 exchanges before the 4th, then appended
    s.clear()
    assert s.prompt_ids("x") == engine.encode_text("x")


def test_zero_history_turns(engine):
    s = ChatSession(engine, GenerationConfig(max_new_tokens=3), history_turns=0)
    "".join(s.reply("one"))
    s._trim()
    assert s.prompt_ids("two") == engine.encode_text("two")


def test_repl_end_to_end(model_dir, engine, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/clear\nHello\n\n/exit\nnot read\n"))
    rc = main(["chat", "--model", str(model_dir), "--max-new-tokens", "5", "--temperature", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    first = _reply(engine, "Hello", 5)
    # The same answer twice: /clear dropped the first exchange from the second prompt.
    assert out.count(f"Assistant >> {first}\n") == 2
    assert "(history cleared)" in out and "not read" not in out


def test_negative_history_is_an_error(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--history-turns", "-1"]) == 2
    assert "--history-turns" in capsys.readouterr().err
