"""Decoding speed: tunelab's engine vs `transformers` generate, same model, same run.

Greedy generation of ``--new-tokens`` tokens after random ``--prompt-len``-token prompts, at
batch 1 and batch 16 (eos ignored, so every row generates the full length). Prints one JSON
line per measurement (median of ``--repeats`` timed runs after one warm-up) and whether both
implementations produced the same tokens.

    python bench/generate.py                      # CPU: a small random Qwen2-shaped model
    python bench/generate.py --model qwen2.5-0.5b # CUDA: Qwen2.5-0.5B shapes, random, bf16

Nothing is downloaded: the model is random and built here with `transformers`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    # Small enough for a 2-core CPU, large enough that matmuls (not Python) dominate.
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


def build_model_dir(out: Path, name: str, dtype: torch.dtype) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.demo.tokenizer import build_bpe_tokenizer

    cfg = AutoConfig.for_model("qwen2", rms_norm_eps=1e-6, rope_theta=1e6, **MODELS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(str(out))
    build_bpe_tokenizer(out, vocab_size=512)  # only decodes text; unknown ids decode to ''
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, device: torch.device, repeats: int) -> dict[str, tuple[float, object]]:
    """Median seconds per implementation; runs are interleaved so a busy machine hurts all
    implementations alike."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up (and compile, if any)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="default: qwen2.5-0.5b on CUDA, small on CPU")  # fmt: skip
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 CUDA, 64 CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the compiled decode path")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from tunelab.infer.engine import Engine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    name = args.model or ("qwen2.5-0.5b" if cuda else "small")
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    )
    new_tokens = args.new_tokens or (256 if cuda else 64)
    common = dict(
        model=name, device=str(device), dtype=str(dtype).removeprefix("torch."),
        prompt_len=args.prompt_len, new_tokens=new_tokens, threads=torch.get_num_threads(),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), name, dtype)
        engines = {"tunelab": Engine.from_pretrained(model_dir, dtype=dtype, device=device)}
        if args.compile:
            engines["tunelab-compiled"] = Engine.from_pretrained(
                model_dir, dtype=dtype, device=device, compile=True
            )
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        vocab = MODELS[name]["vocab_size"]
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(10, vocab, (batch, args.prompt_len), generator=g)
            results = bench_batch(engines, hf, prompts, new_tokens, device, args.repeats)
            ref_secs, ref = results["transformers"]
            for impl, (secs, out) in results.items():
                line = dict(bench="generate", impl=impl, batch=batch, **common, seconds=round(secs, 4),
                            tokens_per_s=round(batch * new_tokens / secs, 1))  # fmt: skip
                if impl != "transformers":
                    line["tokens_equal_transformers"] = out == ref
                    line["speedup_vs_transformers"] = round(ref_secs / secs, 2)
                print(json.dumps(line), flush=True)


def bench_batch(engines: dict, hf, prompts: torch.Tensor, new_tokens: int, device, repeats: int):
    from tunelab.infer.sampling import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=[])
    rows = prompts.tolist()
    fns = {}
    for impl, engine in engines.items():
        engine.max_batch_size = len(rows)
        fns[impl] = lambda e=engine: e.generate(rows, cfg)

    def hf_run():
        with torch.inference_mode():
            return hf.generate(
                prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                eos_token_id=None, pad_token_id=0,
            )[:, prompts.shape[1] :].tolist()  # fmt: skip

    fns["transformers"] = hf_run
    return timed(fns, device, repeats)


if __name__ == "__main__":
    main()
