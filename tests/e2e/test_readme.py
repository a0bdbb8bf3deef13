"""The README's quick start, run as a new user would: every command of its ```bash blocks, in
order, in a fresh directory holding only a copy of the repository's configs/.

The blocks are run with the real commands and the real flags. What a CPU test machine cannot
do is replaced, explicitly and only this way (SUBSTITUTIONS below lists each with its reason):

- `hf download REPO --local-dir DIR`: no network; DIR gets a tiny random Qwen2 model with the
  tiny BPE tokenizer (same special tokens and chat template family as Qwen2.5).
- `wget -O FILE URL` / `wget URL`: no network; FILE gets a tiny Alpaca parquet, or (for the
  MMLU `data.tar`) a tar of tiny MMLU files in the official layout. The `tar` after it runs.
- `torchrun --nproc_per_node=8 -m tunelab ARGS`: no GPUs; `tunelab ARGS` runs in one CPU
  process with the same config.
- `tunelab train` gets CPU-size overrides appended (a few steps, fp32, SDPA attention, 256
  tokens); `--seq-length 4096` becomes 256 and `--workers 8` becomes 1 (tiny model, tiny data).
- `tunelab chat` reads two lines from stdin instead of a terminal.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers.eval import MMLU_DEV, write_mmlu
from tests.helpers.tiny_models import save_tiny_hf_model
from tunelab.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Quick start with a real model"

TRAIN_OVERRIDES = [
    "--train.steps=2",
    "--train.device=cpu",
    "--train.precision=fp32",
    "--train.global_batch_size=2",
    "--model.attn_backend=sdpa",
    "--data.seq_length=256",
    "--checkpoint.interval=0",
    "--logging.plot=false",
    "--logging.tensorboard=false",
]
# (pattern, replacement, reason): applied to the text of every command
SUBSTITUTIONS = [
    (r"--seq-length 4096", "--seq-length 256", "the tiny model has a 256-token context"),
    (r"--workers 8", "--workers 1", "tiny data; 8 processes would only cost start-up time"),
]


def quickstart_commands(readme: str) -> list[str]:
    """The command lines of the quick start's bash blocks (continuations joined, comments and
    `&&` chains split)."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end != -1 else None]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            commands += [c.strip() for c in line.split("&&")]
    return commands


ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat well, exercise and sleep enough."},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
] * 6  # fmt: skip


def fake_download(argv: list[str], cwd: Path, tokenizer_dir: Path) -> str:
    """Stand-ins for the network commands (see the module docstring)."""
    if argv[:2] == ["hf", "download"]:
        out = cwd / argv[argv.index("--local-dir") + 1]
        save_tiny_hf_model(out, "qwen2", tokenizer_dir=tokenizer_dir)
        return f"tiny qwen2 model -> {out}"
    assert argv[0] == "wget", argv
    url = argv[-1]
    target = cwd / (argv[argv.index("-O") + 1] if "-O" in argv else url.rsplit("/", 1)[-1])
    target.parent.mkdir(parents=True, exist_ok=True)
    if url.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ALPACA), target)
        return f"tiny alpaca parquet -> {target}"
    if url.endswith("data.tar"):
        staging = cwd / ".mmlu-staging"
        write_mmlu(staging / "data")
        for dev in (staging / "data" / "dev").glob("*.csv"):  # 5 rows, as in the real tarball
            with dev.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows((MMLU_DEV * 5)[:5])
        with tarfile.open(target, "w") as tar:
            tar.add(staging / "data", arcname="data")
        shutil.rmtree(staging)
        return f"tiny MMLU tarball -> {target}"
    raise AssertionError(f"the test has no stand-in for {url}")


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path, tiny_tokenizer_dir, monkeypatch):
    commands = quickstart_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    work = tmp_path / "checkout"
    shutil.copytree(ROOT / "configs", work / "configs")  # a new user's clone, configs only
    monkeypatch.chdir(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran: list[str] = []
    for line in commands:
        for pattern, repl, _ in SUBSTITUTIONS:
            line = re.sub(pattern, repl, line)
        argv = shlex.split(line)
        if argv[0] in ("hf", "wget"):
            print(fake_download(argv, work, tiny_tokenizer_dir))
            ran.append(argv[0])
            continue
        if argv[0] == "torchrun":  # GPU launch -> the same tunelab command in one process
            argv = argv[argv.index("-m") + 1 :]
        if argv[0] != "tunelab":  # mkdir, tar: run them for real
            subprocess.run(line, shell=True, cwd=work, check=True, env=env)
            ran.append(argv[0])
            continue
        verb = argv[1]
        if verb == "train":
            argv += TRAIN_OVERRIDES
        if verb == "chat":
            proc = subprocess.run(
                [sys.executable, "-m", "tunelab", *argv[1:], "--max-new-tokens", "8"],
                input="Give three tips for staying healthy.\n/exit\n",
                capture_output=True, text=True, cwd=work, env=env, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "Assistant >> " in proc.stdout
        else:
            if verb in ("generate", "eval"):
                argv += ["--max-new-tokens", "8"]
            assert cli(argv[1:]) == 0, line
        ran.append(f"tunelab {verb}")

    # every step of the quick start ran, and left what the README says it leaves
    assert ran.count("tunelab train") == 2 and "tunelab preprocess" in ran, ran
    for verb in ("merge-lora", "chat", "generate", "eval"):
        assert f"tunelab {verb}" in ran, ran
    prefix = work / "finetune_dataset" / "qwen2.5-7b" / "alpaca"
    for field in ("input_ids", "labels", "attention_mask"):
        assert Path(f"{prefix}_packed_{field}_document.bin").is_file()
    full = work / "runs" / "qwen2.5-7b-full-pack"
    assert (full / "hf" / "config.json").is_file()
    assert (full / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert (work / "runs" / "qwen2.5-7b-lora" / "adapter" / "adapter_config.json").is_file()
    assert (work / "model_from_hf" / "qwen2.5-7b-lora" / "model.safetensors").is_file()
    assert (work / "mmlu.json").is_file()
