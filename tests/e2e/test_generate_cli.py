"""`tunelab generate` as a user runs it: prompts on the command line and JSONL files."""

from __future__ import annotations

import json

import pytest

from tests.helpers.infer import lively_model_dir
from tunelab.cli import main
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return lively_model_dir(tmp_path_factory.mktemp("gen"), "qwen2_untied", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, device="cpu")


def _text(engine, prompt: str, n: int) -> str:
    return engine.complete([engine.encode_text(prompt)], GenerationConfig(max_new_tokens=n))[0].text


def test_single_prompt_streams_greedy_text(model_dir, engine, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "Hello world",
               "--max-new-tokens", "9", "--temperature", "0"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out == _text(engine, "Hello world", 9) + "\n"


def test_several_prompts_batched(model_dir, engine, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "The quick", "def add",
               "--max-new-tokens", "6", "--temperature", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert out == (
        f"=== [0] The quick\n{_text(engine, 'The quick', 6)}\n"
        f"=== [1] def add\n{_text(engine, 'def add', 6)}\n"
    )


def test_jsonl_in_jsonl_out(model_dir, engine, tmp_path):
    prompts = ["a much longer prompt: the quick brown fox jumps", "hi", "12 + 30 =", "Über"]
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(model_dir), "--input", str(src), "--output", str(out),
               "--max-new-tokens", "5", "--temperature", "0", "--batch-size", "3"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    for r, p in zip(rows, prompts):
        assert r["completion"] == _text(engine, p, 5)
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 5
        assert r["prompt_tokens"] == len(engine.encode_text(p))


def test_bad_row_names_file_and_line_and_writes_nothing(model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(model_dir), "--input", str(src), "--output", str(out)])
    assert rc == 2
    assert f"{src}:2" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_prompt_too_long_is_a_clear_error(model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "fox " * 400}) + "\n")
    rc = main(["generate", "--model", str(model_dir), "--input", str(src), "--output",
               str(tmp_path / "o.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}:1" in err and "context is 256 tokens" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "either --prompt"),
        (["--prompt", "x", "--chat"], "--chat needs the template"),
        (["--prompt", "x", "--prompt-type", "qwen", "--hf-chat-template"], "mutually exclusive"),
        (["--input", "x.jsonl"], "--output"),
    ],
)
def test_flag_errors(model_dir, capsys, extra, message):
    assert main(["generate", "--model", str(model_dir), *extra]) == 2
    assert message in capsys.readouterr().err


def test_chat_prompts_and_messages_rows_use_the_template(model_dir, tmp_path, capsys):
    eng = Engine.from_pretrained(model_dir, device="cpu", prompt_type="qwen")
    cfg = GenerationConfig(max_new_tokens=6)
    user = [{"role": "user", "content": "12 + 30?"}]
    want = eng.complete([eng.encode_chat(user, system="Be brief.")], cfg)[0].text
    rc = main(["generate", "--model", str(model_dir), "--prompt-type", "qwen", "--chat",
               "--system", "Be brief.", "--prompt", "12 + 30?", "--max-new-tokens", "6",
               "--temperature", "0"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().out == want + "\n"
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "Über café?"}]  # fmt: skip
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n", encoding="utf-8")
    rc = main(["generate", "--model", str(model_dir), "--prompt-type", "qwen", "--input",
               str(src), "--output", str(out), "--max-new-tokens", "6", "--temperature", "0"])  # fmt: skip
    assert rc == 0
    row = json.loads(out.read_text(encoding="utf-8"))
    assert row["completion"] == eng.complete([eng.encode_chat(msgs)], cfg)[0].text
    assert row["messages"] == msgs
