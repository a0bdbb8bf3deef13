"""`tunelab train configs/tiny_pretrain.yaml` from scratch on a blend of two corpora."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.data import write_jsonl
from tunelab.cli import main as cli
from tunelab.demo.tokenizer import DEFAULT_CORPUS

ROOT = Path(__file__).resolve().parents[2]


def test_pretrain_blend_from_config_file(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(ROOT)  # the config names configs/tiny_model.json relative to the repo
    prefixes = []
    for name, texts in (("a", DEFAULT_CORPUS[:3]), ("b", DEFAULT_CORPUS[3:])):
        inp = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t * 3} for t in texts * 8])
        prefix = tmp_path / "data" / name
        argv = ["preprocess", "--input", str(inp), "--tokenizer-name-or-path"]
        argv += [str(tiny_tokenizer_dir), "--output-prefix", str(prefix), "--append-eod"]
        assert cli(argv) == 0
        prefixes.append(str(prefix))
    out = tmp_path / "run"
    overrides = [
        f"--data.path=0.25 {prefixes[0]} 0.75 {prefixes[1]}",
        f"--data.tokenizer={tiny_tokenizer_dir}",
        "--data.seq_length=32",
        f"--save={out}",  # Megatron's name for the output directory
        "--train_iters=4",
        "--micro-batch-size=2",
        "--global-batch-size=4",
        "--train.eval_interval=2",
        "--logging.progress=none",
        "--logging.plot=false",
    ]
    assert cli(["train", "configs/tiny_pretrain.yaml", *overrides]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(r["num_supervised_tokens"] == 4 * 31 for r in records if r["kind"] == "train")
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert model.config.vocab_size == 512
    assert (out / "hf" / "tokenizer.json").is_file()
