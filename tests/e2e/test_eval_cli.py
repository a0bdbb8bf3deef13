"""`tunelab eval` as a user runs it: tiny model, small task files in the official layouts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers import eval as data
from tunelab.cli import main


def _run(*argv) -> int:
    return main(["eval", *map(str, argv)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    return {
        "mmlu": data.write_mmlu(root / "mmlu"),
        "boolq": data.write_boolq(root / "boolq"),
        "gsm8k": data.write_gsm8k(root / "gsm8k"),
        "human_eval": data.write_human_eval(root / "human_eval"),
    }


def test_mmlu_table_and_json(tiny_hf_dir, files, tmp_path, capsys):
    out = tmp_path / "res" / "mmlu.json"
    rc = _run(
        "--model",
        tiny_hf_dir,
        "--task",
        "mmlu",
        "--data-dir",
        files["mmlu"],
        "--shots",
        2,
        "--batch-size",
        2,
        "--output",
        out,
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "high_school_physics" in printed and "overall (micro)" in printed
    res = json.loads(out.read_text())
    assert res["config"]["scoring"] == "loglikelihood" and res["config"]["shots"] == 2
    assert res["overall"]["num_questions"] == 9 == len(res["questions"])
    q = res["questions"][0]
    assert q["source"] == "abstract_algebra_test.csv:1"
    assert len(q["choice_logprobs"]) == 4 and q["prediction"] in "ABCD"
    assert res["overall"]["num_correct"] == sum(x["correct"] for x in res["questions"])
    assert not list(out.parent.glob(".*tmp*"))  # written atomically, nothing left behind


def test_limit_and_chat_template(tiny_hf_dir, files, tmp_path):
    out = tmp_path / "chat.json"
    rc = _run(
        "--model",
        tiny_hf_dir,
        "--task",
        "mmlu",
        "--data-dir",
        files["mmlu"],
        "--shots",
        0,
        "--limit",
        1,
        "--hf-chat-template",
        "--output",
        out,
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["config"]["prompt_format"] == "hf-chat-template"
    assert [s["num_questions"] for s in res["subjects"].values()] == [1, 1]


def test_human_eval_refuses_without_flag(tiny_hf_dir, files, capsys):
    rc = _run("--model", tiny_hf_dir, "--task", "human_eval", "--data-dir", files["human_eval"])
    assert rc == 2
    assert "--allow-code-execution" in capsys.readouterr().err


def test_human_eval_runs_with_flag(tiny_hf_dir, files, tmp_path, capsys):
    out = tmp_path / "he.json"
    rc = _run(
        "--model",
        tiny_hf_dir,
        "--task",
        "human_eval",
        "--data-dir",
        files["human_eval"],
        "--allow-code-execution",
        "--max-new-tokens",
        4,
        "--output",
        out,
    )
    assert rc == 0
    assert "code execution enabled" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "separate process" in res["config"]["sandbox"]
    assert all(q["detail"]["status"] in ("passed", "failed", "timeout") for q in res["questions"])


def test_malformed_file_names_file_and_row(tiny_hf_dir, tmp_path, capsys):
    root = data.write_boolq(tmp_path / "boolq")
    with (root / "dev.jsonl").open("a") as f:
        f.write('{"question": "q", "passage": "p"}\n')
    rc = _run("--model", tiny_hf_dir, "--task", "boolq", "--data-dir", root)
    assert rc == 2
    assert "dev.jsonl:6: missing key 'answer'" in capsys.readouterr().err


def test_perplexity(tiny_hf_dir, tmp_path, capsys):
    from tunelab.data.indexed import IndexedDatasetBuilder

    prefix = tmp_path / "held_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for n in (9, 17):
        builder.add_item(np.arange(3, 3 + n, dtype=np.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    out = tmp_path / "ppl.json"
    rc = _run(
        "--model",
        tiny_hf_dir,
        "--task",
        "perplexity",
        "--data-path",
        tmp_path / "held",
        "--output",
        out,
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_tokens"] == 8 + 16 and res["perplexity"] > 1
    assert "ppl" in capsys.readouterr().out


@pytest.fixture(scope="module")
def adapter_and_merged(tmp_path_factory, tiny_hf_dir):
    """A random (nonzero) peft LoRA adapter on the tiny model, and the peft-merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(str(root / "adapter"))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(root / "merged"))
    for f in tiny_hf_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, root / "merged" / f.name)
    return root / "adapter", root / "merged"


@pytest.mark.parametrize("task", ["boolq", "gsm8k"])
def test_base_plus_adapter_equals_merged(tiny_hf_dir, files, adapter_and_merged, tmp_path, task):
    adapter, merged = adapter_and_merged
    extra = ["--shots", 1, "--max-new-tokens", 6]
    a, m, base = tmp_path / "a.json", tmp_path / "m.json", tmp_path / "base.json"
    assert (
        _run(
            "--model",
            tiny_hf_dir,
            "--adapter",
            adapter,
            "--task",
            task,
            "--data-dir",
            files[task],
            "--output",
            a,
            *extra,
        )
        == 0
    )
    assert (
        _run("--model", merged, "--task", task, "--data-dir", files[task], "--output", m, *extra)
        == 0
    )
    assert (
        _run(
            "--model",
            tiny_hf_dir,
            "--task",
            task,
            "--data-dir",
            files[task],
            "--output",
            base,
            *extra,
        )
        == 0
    )
    qa = json.loads(a.read_text())["questions"]
    qm = json.loads(m.read_text())["questions"]
    qb = json.loads(base.read_text())["questions"]
    for x, y in zip(qa, qm):
        assert x["prediction"] == y["prediction"]
        if task == "boolq":
            assert x["choice_logprobs"] == pytest.approx(y["choice_logprobs"], abs=1e-4)
        else:
            assert x["generated"] == y["generated"]
    if task == "boolq":  # the adapter really changes the model
        assert any(
            x["choice_logprobs"] != pytest.approx(z["choice_logprobs"], abs=1e-3)
            for x, z in zip(qa, qb)
        )


@pytest.mark.parametrize("fmt", [["--prompt-type", "qwen"], ["--hf-chat-template"]])
def test_templated_prompts_score_the_reply(tiny_hf_dir, files, tmp_path, fmt):
    """With a template, each choice is scored as the start of the assistant reply after the
    ids `render_generation_prompt` gives for the prompt as one user turn (transformers oracle)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.templates import render_generation_prompt

    out = tmp_path / "t.json"
    assert (
        _run(
            "--model",
            tiny_hf_dir,
            "--task",
            "boolq",
            "--data-dir",
            files["boolq"],
            "--limit",
            2,
            "--output",
            out,
            *fmt,
        )
        == 0
    )
    res = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    kwargs = {"prompt_type": "qwen"} if fmt[0] == "--prompt-type" else {"hf_chat_template": True}
    for q in res["questions"]:
        ctx = render_generation_prompt(tok, [{"role": "user", "content": q["prompt"]}], **kwargs)
        expected = []
        for choice in ("no", "yes"):
            cont = tok.encode(choice, add_special_tokens=False)
            with torch.no_grad():
                logits = hf(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
            lp = torch.log_softmax(logits.float(), -1)
            expected.append(float(lp[torch.arange(len(cont)), cont].sum()))
        assert q["choice_logprobs"] == pytest.approx(expected, abs=1e-4)
