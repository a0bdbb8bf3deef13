"""Benchmark: `tunelab preprocess` against Hugging Face `datasets.map` with a batched fast tokenizer.

Generates 52,000 Alpaca-shaped rows (lengths drawn from log-normal distributions shaped like
tatsu-lab/alpaca: short instructions, 40% with an input, answers with a long tail), trains a
32k-vocab byte-level BPE on them, then times in one run, each with 2 worker processes:

- tunelab preprocess, non-pack and --pack (the CLI as a user runs it);
- `datasets.load_dataset("json") + .map(batched=True, num_proc=2)` rendering the same ChatML
  prompt and tokenizing prompts and answers with one batched fast-tokenizer call per batch,
  building labels, in a script of its own (`hf_datasets_map`, the strongest form);
- the same map as LLaMA-Factory runs it, encoding each template element of each row with its
  own fast-tokenizer ``encode`` call (`hf_datasets_map_lf_style`).

Each is a separate process timed wall-clock from start to exit (imports and tokenizer loading
included on both sides). The three run interleaved ``--repeats`` times and the best time of
each is kept, because a shared machine makes single timings noisy; CPU seconds (the process and
all its children, from getrusage) are reported too, as they suffer less from other load.
Prints one JSON line per measurement and a final line with the ratios.
Usage: python bench/preprocess.py [--rows 52000] [--workers 2] [--repeats 3] [--workdir DIR]
       [--compare-tree OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEM = "You are a helpful assistant."


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    freq = np.array(
        [
            12.7,
            9.1,
            8.2,
            7.5,
            7.0,
            6.7,
            6.3,
            6.1,
            6.0,
            4.3,
            4.0,
            2.8,
            2.8,
            2.4,
            2.2,
            2.4,
            2.0,
            1.9,
            1.0,
            1.5,
            2.0,
            0.8,
            0.1,
            0.2,
            0.2,
            0.1,
        ]
    )
    freq = freq / freq.sum()
    lex_size = 60_000
    word_len = np.clip(rng.poisson(4.5, lex_size) + 1, 1, 14)
    lexicon = ["".join(rng.choice(letters, size=k, p=freq)) for k in word_len]
    zipf = 1.0 / np.arange(1, lex_size + 1) ** 1.05
    zipf /= zipf.sum()

    def text(mean_words: float, sigma: float) -> str:
        k = max(1, int(rng.lognormal(np.log(mean_words), sigma)))
        words = [lexicon[i] for i in rng.choice(lex_size, size=k, p=zipf)]
        for j in range(7, len(words), 9):
            words[j] += "." if j % 2 else ","
        return " ".join(words)

    rows = []
    for _ in range(n):
        rows.append(
            {
                "instruction": text(12, 0.5),
                "input": text(14, 0.8) if rng.random() < 0.4 else "",
                "output": text(38, 0.9),
            }
        )
    return rows


def build_tokenizer(out: Path, rows: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tunelab.demo.tokenizer import build_bpe_tokenizer

    texts = (r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows)
    build_bpe_tokenizer(out, texts, vocab_size=32000)


def _timed(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and all its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def time_tunelab(
    data: Path, tok: Path, prefix: Path, workers: int, pack: bool, tree: str | None = None
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tunelab",
        "preprocess",
        "--input",
        str(data),
        "--tokenizer-name-or-path",
        str(tok),
        "--output-prefix",
        str(prefix),
        "--handler-name",
        "AlpacaStyleInstructionHandler",
        "--prompt-type",
        "qwen",
        "--workers",
        str(workers),
    ]
    if pack:
        cmd += ["--pack", "--seq-length", "1024"]
    env = cwd = None
    if tree is not None:  # another checkout of tunelab, e.g. the commit before a change
        # `python -m` puts the working directory first on sys.path: run from the tree.
        cwd = str(Path(tree).resolve())
        env = {**os.environ, "PYTHONPATH": cwd}
    seconds, cpu = _timed(cmd, env, cwd)
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rows": summary["rows_read"],
        "tokens": summary["tokens"],
        "command": " ".join(cmd[1:]),
    }


def _hf_map_fn(tokenizer):
    def fn(batch):
        prompts, answers = [], []
        for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
            user = ins + ("\n" + inp if inp else "")
            prompts.append(
                f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}"
                "<|im_end|>\n<|im_start|>assistant\n"
            )
            answers.append(out + "<|im_end|>")
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        input_ids = [p + a for p, a in zip(p_ids, a_ids)]
        labels = [[-100] * len(p) + a for p, a in zip(p_ids, a_ids)]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": [[1] * len(x) for x in input_ids],
        }

    return fn


def _lf_map_fn(tokenizer):
    """LLaMA-Factory's way inside the batched map: each template element of each row is
    encoded with its own ``tokenizer.encode`` call (its ``_convert_elements_to_ids``)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    def fn(batch):
        input_ids, labels = [], []
        for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
            user = ins + ("\n" + inp if inp else "")
            src = enc(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n") + enc(
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            )
            tgt = enc(out) + [im_end]
            input_ids.append(src + tgt)
            labels.append([-100] * len(src) + tgt)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": [[1] * len(x) for x in input_ids],
        }

    return fn


def hf_job(data: Path, tok: Path, cache: Path, workers: int, result: Path, style: str) -> None:
    """The baseline script: run in its own process by ``time_hf``."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    out = ds.map(
        (_hf_map_fn if style == "batched" else _lf_map_fn)(tokenizer),
        batched=True,
        batch_size=1000,
        num_proc=workers,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
    )
    import pyarrow.compute as pc

    # Count tokens in Arrow: materializing the column as Python lists would bill the
    # baseline for work the benchmark itself adds.
    tokens = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
    result.write_text(json.dumps({"rows": len(out), "tokens": tokens}))


def time_hf(data: Path, tok: Path, cache: Path, workers: int, style: str) -> dict:
    result = cache / "result.json"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--hf-job",
        str(data),
        str(tok),
        str(cache),
        str(workers),
        str(result),
        style,
    ]
    seconds, cpu = _timed(cmd)
    return {"seconds": seconds, "cpu_seconds": cpu, **json.loads(result.read_text())}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-job":
        d, t, c, w, r, style = sys.argv[2:8]
        hf_job(Path(d), Path(t), Path(c), int(w), Path(r), style)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=52_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--compare-tree",
        default=None,
        help="also time the tunelab of this checkout (e.g. a worktree of the previous commit)",
    )
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, tok = work / "alpaca.jsonl", work / "tokenizer"
    rows = make_rows(args.rows)
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if not (tok / "tokenizer.json").exists():
        build_tokenizer(tok, rows)
    jobs = {
        "hf_datasets_map": lambda: time_hf(data, tok, work / "hf_cache", args.workers, "batched"),
        "hf_datasets_map_lf_style": lambda: time_hf(
            data, tok, work / "hf_cache", args.workers, "per_element"
        ),
        "tunelab_nonpack": lambda: time_tunelab(
            data, tok, work / "out" / "np", args.workers, False
        ),
        "tunelab_pack": lambda: time_tunelab(data, tok, work / "out" / "pk", args.workers, True),
    }
    if args.compare_tree:
        tree = args.compare_tree
        jobs["compare_nonpack"] = lambda: time_tunelab(
            data, tok, work / "out" / "cnp", args.workers, False, tree
        )
        jobs["compare_pack"] = lambda: time_tunelab(
            data, tok, work / "out" / "cpk", args.workers, True, tree
        )
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, fn in jobs.items():
            r = fn()
            best = results.setdefault(name, r)
            best["seconds"] = min(best["seconds"], r["seconds"])
            best["cpu_seconds"] = min(best["cpu_seconds"], r["cpu_seconds"])
    for name, r in results.items():
        r["rows_per_s"] = r["rows"] / r["seconds"]
        r["rows_per_cpu_s"] = r["rows"] / r["cpu_seconds"]
        print(
            json.dumps({"name": name, "workers": args.workers, "best_of": args.repeats, **r}),
            flush=True,
        )
    for base in ("hf_datasets_map", "hf_datasets_map_lf_style"):
        hf = results[base]
        ratio = {"name": f"ratio_vs_{base}"}
        for name in [n for n in results if n.startswith(("tunelab_", "compare_"))]:
            ratio[name] = round(results[name]["rows_per_s"] / hf["rows_per_s"], 2)
            ratio[name + "_cpu"] = round(hf["cpu_seconds"] / results[name]["cpu_seconds"], 2)
        ratio["cpu_count"] = os.cpu_count()
        ratio["load_avg_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(ratio))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
