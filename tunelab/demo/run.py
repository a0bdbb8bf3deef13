"""`tunelab demo`: the whole path on a built-in tiny model and data set, on CPU, in minutes.

The demo is a script of real `tunelab` commands run in-process through `tunelab.cli.main`
(each printed as the command line a user would type, from inside the demo directory):
synthetic task data -> BPE tokenizer -> a Qwen2-architecture model initialized from scratch
-> `preprocess` (packed) -> `train` (pretraining, full SFT, LoRA SFT) -> `generate` on held-out
questions (exact-match accuracy before and after) -> `merge-lora` -> `chat`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.demo import tasks as T
from tunelab.demo.settings import (
    ALL_TASKS,
    LORA_TASKS,
    PROMPT_TYPE,
    SEQ_LENGTH,
    SFT_TASKS,
    SIZES,
    DemoSize,
    model_config,
    train_configs,
)
from tunelab.errors import TunelabError

MARKER = ".tunelab-demo"
MAX_NEW_TOKENS = 24


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="tunelab-demo",
                   help="where every artifact goes (default ./tunelab-demo); an existing demo "
                        "directory is replaced, any other non-empty directory is refused")  # fmt: skip
    p.add_argument("--size", choices=sorted(SIZES), default="full",
                   help="full (default, about 3 minutes on 2 CPU cores) or quick (CI, 1-2 minutes)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="same as --size quick")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for PyTorch (default 1: the demo's matrices are too small "
                        "to gain from more, and extra threads spin when the CPU is shared)")  # fmt: skip


def prepare_dir(out: Path) -> Path:
    """Create ``out`` (or empty a previous demo's); refuse anything else that holds files."""
    out = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise TunelabError(f"--output-dir {out} exists and is not a directory")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise TunelabError(
                    f"--output-dir {out} is not empty and was not written by `tunelab demo` "
                    f"(no {MARKER} file); give another --output-dir or remove it yourself"
                )
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `tunelab demo`; rerunning the demo replaces it\n")
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


class Demo:
    """One demo run inside ``out``; every path it passes to a command is relative to ``out``."""

    def __init__(self, out: Path, size: DemoSize, size_name: str, seed: int) -> None:
        self.out = out
        self.size = size
        self.size_name = size_name
        self.seed = seed
        self.commands: list[dict[str, Any]] = []
        self.accuracy: dict[str, dict[str, float]] = {}

    # ---- running commands ---------------------------------------------------------------
    def tunelab(
        self, stage: str, argv: list[str], stdin: str | None = None, capture: bool = False
    ) -> str:
        """Run ``tunelab ARGV`` in-process (printed first). With ``stdin`` (chat) or
        ``capture``, its stdout is returned instead of printed. A failing command stops the
        demo (after showing what it printed)."""
        line = "tunelab " + shlex.join(argv)
        print(f"$ {line}", flush=True)
        from tunelab.cli import main as cli_main

        t0 = time.perf_counter()
        captured = io.StringIO()
        old_stdin = sys.stdin
        try:
            if stdin is not None or capture:
                sys.stdin = io.StringIO(stdin or "")
                with contextlib.redirect_stdout(captured):
                    rc = cli_main(argv)
            else:
                rc = cli_main(argv)
        finally:
            sys.stdin = old_stdin
        seconds = time.perf_counter() - t0
        self.commands.append({"stage": stage, "command": line, "seconds": round(seconds, 2)})
        if rc != 0:
            print(captured.getvalue())
            raise TunelabError(f"demo stage {stage!r} failed (exit {rc}): {line}")
        return captured.getvalue()

    # ---- stages -------------------------------------------------------------------------
    def make_data(self) -> None:
        _banner("1. data: synthetic tasks with checkable answers")
        s = self.size
        train, heldout = T.make_split(ALL_TASKS, s.num_train, s.num_heldout, self.seed)
        self.train_examples, self.heldout = train, heldout
        sft = [T.to_alpaca(e) for e in train if e.task in SFT_TASKS]
        # The LoRA rows replay a quarter as many SFT-task rows: trained on the new task alone,
        # the adapter would answer every question the new way.
        new = [e for e in train if e.task in LORA_TASKS]
        replay = [e for e in train if e.task in SFT_TASKS][: len(new) // 4]
        lora = [T.to_sharegpt(e) for e in new + replay]
        pretrain = [T.to_pretrain_text(e) for e in train if e.task in SFT_TASKS]
        held = [{"task": e.task, "prompt": e.prompt, "answer": e.output} for e in heldout]
        _write_jsonl(Path("data/sft_alpaca.jsonl"), sft)
        _write_jsonl(Path("data/lora_sharegpt.jsonl"), lora)
        _write_jsonl(Path("data/pretrain.jsonl"), pretrain)
        _write_jsonl(Path("data/heldout.jsonl"), held)
        print(f"tasks: {', '.join(ALL_TASKS)} ({s.num_train} training rows each)")
        print(f"data/sft_alpaca.jsonl     {len(sft)} Alpaca rows ({', '.join(SFT_TASKS)})")
        print(f"data/lora_sharegpt.jsonl  {len(lora)} ShareGPT rows ({', '.join(LORA_TASKS)}, "
              f"plus {len(replay)} replayed SFT rows)")  # fmt: skip
        print(f"data/pretrain.jsonl       {len(pretrain)} chat transcripts as plain text "
              f"({', '.join(SFT_TASKS)})")  # fmt: skip
        print(f"data/heldout.jsonl        {len(held)} held-out questions, never trained on")
        for name in ALL_TASKS:
            ex = next(e for e in heldout if e.task == name)
            print(f"  e.g. {name:8s} {ex.prompt!r} -> {ex.output!r}")

    def make_tokenizer(self) -> None:
        _banner("2. tokenizer: byte-level BPE with a ChatML chat template")
        from tunelab.demo.tokenizer import build_bpe_tokenizer

        texts = [f"{e.prompt}\n{e.output}" for e in self.train_examples]
        texts += ["system\nuser\nassistant\n"] * 50  # the template's role words: one token each
        print(f"# python: tunelab.demo.tokenizer.build_bpe_tokenizer('tokenizer', <task texts>, "
              f"vocab_size={self.size.vocab_size}, split_digits=True)")  # fmt: skip
        tok = build_bpe_tokenizer("tokenizer", texts, self.size.vocab_size, split_digits=True)
        self.eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
        print(f"tokenizer/  vocab {len(tok)}, eos <|im_end|> = {self.eos_id}")

    def make_model(self) -> None:
        _banner("3. model: Qwen2 architecture, initialized from scratch")
        from tunelab.model.config import ModelConfig
        from tunelab.model.hf import save_hf
        from tunelab.model.init import build_from_scratch

        cfg = ModelConfig.from_hf(model_config(self.size, self.eos_id, self.pad_id))
        print("# python: cfg = ModelConfig.from_hf(<qwen2 config dict>); "
              f"model = build_from_scratch(cfg, seed={self.seed}); "
              "save_hf(model, cfg, 'models/init', tokenizer_dir='tokenizer')")  # fmt: skip
        model = build_from_scratch(cfg, seed=self.seed)
        save_hf(model, cfg, "models/init", tokenizer_dir="tokenizer")
        self.num_params = cfg.num_params()
        print(
            f"models/init/  {self.num_params / 1e6:.2f}M parameters: {cfg.num_hidden_layers} "
            f"layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
            f"({cfg.num_key_value_heads} KV), tied embeddings"
        )

    def preprocess(self) -> None:
        _banner("4. preprocess: tokenize and pack into Megatron .bin/.idx")
        common = ["--tokenizer-name-or-path", "tokenizer", "--workers", "1"]
        runs = [("pretrain", ["--input", "data/pretrain.jsonl", "--json-keys", "text",
                              "--append-eod"])]  # fmt: skip
        for name, src, handler in (
            ("sft", "data/sft_alpaca.jsonl", "alpaca"),
            ("lora", "data/lora_sharegpt.jsonl", "sharegpt"),
        ):
            runs.append((name, ["--input", src, "--handler-name", handler, "--prompt-type",
                                PROMPT_TYPE, "--pack", "--neat-pack", "--seq-length",
                                str(SEQ_LENGTH)]))  # fmt: skip
        for name, argv in runs:
            prefix = f"datasets/{name}"
            self.tunelab("preprocess", ["preprocess", *argv, *common, "--output-prefix", prefix],
                         capture=True)  # fmt: skip
            info = json.loads(Path(f"{prefix}_summary.json").read_text(encoding="utf-8"))
            rows = f", {info['pack_rows']} packed rows" if info.get("packed") else ""
            print(f"  -> {prefix}_*: {info['rows_written']} samples, {info['tokens']} tokens{rows}")

    def write_configs(self) -> dict[str, str]:
        paths = {}
        for stage, cfg in train_configs(self.size).items():
            p = Path("configs") / f"{stage}.yaml"
            p.parent.mkdir(exist_ok=True)
            p.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            paths[stage] = str(p)
        return paths

    def train(self, configs: dict[str, str]) -> None:
        titles = {
            "pretrain": "5. pretrain: next-token prediction on chat transcripts of the SFT tasks",
            "sft": f"6. full SFT on {', '.join(SFT_TASKS)} (packed Alpaca data)",
            "lora": f"7. LoRA SFT on {', '.join(LORA_TASKS)} (ShareGPT data), base frozen",
        }
        for stage in ("pretrain", "sft", "lora"):
            _banner(titles[stage])
            if stage == "pretrain":
                self.evaluate("initial", "models/init")
            self.tunelab(stage, ["train", configs[stage]])
            if stage == "pretrain":
                self.evaluate("pretrained", "runs/pretrain/hf")
            if stage == "sft":
                self.evaluate("sft", "runs/sft/hf")

    def evaluate(self, label: str, model: str, adapter: str | None = None) -> None:
        """Greedy answers to the held-out questions with the training template; exact match."""
        argv = ["generate", "--model", model]
        if adapter:
            argv += ["--adapter", adapter]
        argv += ["--input", "data/heldout.jsonl", "--output", f"preds/{label}.jsonl", "--chat",
                 "--prompt-type", PROMPT_TYPE, "--temperature", "0", "--max-new-tokens",
                 str(MAX_NEW_TOKENS), "--batch-size", "64", "--device", "cpu"]  # fmt: skip
        Path("preds").mkdir(exist_ok=True)
        self.tunelab(f"eval-{label}", argv, capture=True)
        acc = score(Path(f"preds/{label}.jsonl"))
        self.accuracy[label] = acc
        print(f"held-out exact match ({label}): " + ", ".join(f"{t} {acc[t]:.0%}" for t in acc))

    def merge(self) -> None:
        _banner("8. merge the LoRA adapter into the SFT model")
        self.tunelab("merge-lora", ["merge-lora", "--base", "runs/sft/hf", "--adapter",
                     "runs/lora/adapter", "--out", "models/merged"])  # fmt: skip

    def chat(self) -> list[tuple[str, str]]:
        _banner("9. chat with the tuned model (SFT + LoRA adapter)")
        questions = [next(e.prompt for e in self.heldout if e.task == t) for t in ALL_TASKS]
        argv = ["chat", "--model", "runs/sft/hf", "--adapter", "runs/lora/adapter",
                "--prompt-type", PROMPT_TYPE, "--temperature", "0", "--max-new-tokens",
                str(MAX_NEW_TOKENS), "--history-turns", "0", "--device", "cpu"]  # fmt: skip
        lines = questions  # one line each (tasks.py), as chat reads one line per message
        text = self.tunelab("chat", argv, stdin="\n".join(lines) + "\n/exit\n")
        replies = [r.strip() for r in text.split("Assistant >> ")[1:]]
        replies = [r.split("\nYou >> ")[0].removesuffix("You >>").strip() for r in replies]
        exchanges = list(zip(lines, replies))
        for q, a in exchanges:
            print(f"You >> {q}\nAssistant >> {a}")
        return exchanges

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.make_data()
        self.make_tokenizer()
        self.make_model()
        self.preprocess()
        configs = self.write_configs()
        self.train(configs)
        self.evaluate("sft+lora", "runs/sft/hf", adapter="runs/lora/adapter")
        self.merge()
        exchanges = self.chat()
        summary = {
            "size": self.size_name,
            "seed": self.seed,
            "num_params": self.num_params,
            "tasks": {"sft": SFT_TASKS, "lora": LORA_TASKS},
            "accuracy": self.accuracy,
            "final_loss": {s: _final_loss(Path(f"runs/{s}/metrics.jsonl")) for s in configs},
            "chat": [{"user": q, "assistant": a} for q, a in exchanges],
            "commands": self.commands,
            "artifacts": ARTIFACTS,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        Path("summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary


# What the demo leaves behind, relative to its directory.
ARTIFACTS: dict[str, str] = {
    "raw data (Alpaca, ShareGPT, text, held-out)": "data/",
    "tokenizer (BPE + chat template)": "tokenizer/",
    "initial model (HF, random init)": "models/init/",
    "datasets (.bin/.idx; SFT ones packed)": "datasets/",
    "run configs": "configs/",
    "pretraining: HF export": "runs/pretrain/hf/",
    "SFT: checkpoints (DCP)": "runs/sft/checkpoints/",
    "SFT: HF export": "runs/sft/hf/",
    "LoRA: adapter (PEFT)": "runs/lora/adapter/",
    "LoRA merged into the SFT model (HF)": "models/merged/",
    "metrics per step (JSONL)": "runs/{pretrain,sft,lora}/metrics.jsonl",
    "loss plots": "runs/{pretrain,sft,lora}/loss.png",
    "held-out predictions": "preds/",
    "summary": "summary.json",
}


def score(preds: Path) -> dict[str, float]:
    """Per-task exact match of ``completion`` against ``answer`` (whitespace-stripped)."""
    hits: dict[str, list[int]] = {}
    for line in preds.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        ok = row["completion"].strip() == row["answer"].strip()
        hits.setdefault(row["task"], []).append(int(ok))
    return {t: sum(v) / len(v) for t, v in hits.items()}


def _final_loss(metrics: Path) -> float | None:
    losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines())
              if r.get("kind") == "train"]  # fmt: skip
    return round(sum(losses[-5:]) / len(losses[-5:]), 4) if losses else None


def _print_report(out: Path, summary: dict[str, Any]) -> None:
    _banner("results")
    acc = summary["accuracy"]
    heads = {"initial": "initial", "pretrained": "pretrained", "sft": "+ full SFT",
             "sft+lora": "+ LoRA"}  # fmt: skip
    print("held-out exact match per task (greedy, chat template):")
    print(f"  {'task':18s}" + "".join(f"{heads.get(lab, lab):>13s}" for lab in acc))
    for t in ALL_TASKS:
        name = f"{t} ({'SFT' if t in SFT_TASKS else 'LoRA'} task)"
        print(f"  {name:18s}" + "".join(f"{acc[lab].get(t, 0.0):>13.0%}" for lab in acc))
    print(f"\nartifacts (under {out}):")
    for what, rel in ARTIFACTS.items():
        print(f"  {what:45s} {out / rel}")
    print(f"\ndemo finished in {summary['wall_seconds']:.0f} s. Every stage above is a command "
          f"you can rerun from {out}; see README.md for a real model.")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    size_name = "quick" if args.quick else args.size
    if args.threads < 1:
        raise TunelabError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    out = prepare_dir(Path(args.output_dir))
    print(f"tunelab demo ({size_name}): every command below runs inside {out}", flush=True)
    cwd = os.getcwd()
    os.chdir(out)
    try:
        summary = Demo(out, SIZES[size_name], size_name, args.seed).run()
    finally:
        os.chdir(cwd)
    _print_report(out, summary)
    return 0
