"""Training speed: tunelab vs Hugging Face ``transformers`` (+ ``peft``), same run, same data.

For every workload (model shape, full or LoRA, micro-batch, activation checkpointing,
compile) and data regime, both tools train a freshly built random model for ``--warmup``
untimed and ``--steps`` timed steps and print one JSON line each::

    {"tool", "model", "mode", "regime", "seq", "micro_batch", "tokens_per_s",
     "real_tokens_per_s", "supervised_tokens_per_s", "mfu", "peak_mem_gib", "device", ...}

then a ratio table (tunelab / HF) and a loss-agreement check (HF weights copied into
tunelab, same batches, first ``--loss-steps`` step losses of both).

tunelab side: ``tunelab.model`` Transformer (random init by ``tunelab.model.init``),
``tunelab.parallel.parallelize`` for checkpointing / compile, ``tunelab.train.optim``'s AdamW,
the chunked ``Transformer.loss`` divided by the step's supervised tokens, tunelab's gradient
clipping; LoRA via ``tunelab.model.lora``. Baseline: ``AutoModelForCausalLM.from_config``
(SDPA), ``torch.optim.AdamW`` (fused on CUDA), HF's own loss (full logits), optional
``torch.compile`` of the whole model (as the HF Trainer does), ``peft`` LoRA for LoRA
workloads, ``gradient_checkpointing_enable`` for checkpointing. Both clip at 1.0.

Precision: on CUDA ``bf16-mixed`` (fp32 weights, bf16 autocast, what the HF Trainer's
``bf16=True`` does), with the LoRA base in bf16 and adapters in fp32 (LLaMA-Factory's
setup); on CPU fp32 (so the losses agree to fp32 rounding).

Regimes: ``fixed``, every row ``seq`` tokens, all supervised; ``sft``, instruction-like
documents whose lengths follow a clipped lognormal (Alpaca-like: median ~200 tokens at
seq 2048, long tail) with the prompt part unsupervised. tunelab packs them best-fit into
rows of ``seq`` with ``position_ids`` restarting per document (document masking); the
baseline pads each micro-batch of documents to its longest row (rounded up to 8) as
LLaMA-Factory does. ``tokens_per_s`` counts every row position (pads included),
``real_tokens_per_s`` only document tokens, ``supervised_tokens_per_s`` only trained targets.

MFU = tokens/s x flops per token / peak, flops per token = ``ModelConfig.flops_per_token``
(6 x matmul params + 6 x L x hidden x seq; LoRA counts 2/3). In the sft regime it uses real
tokens/s and the mean document length for the attention term (useful work only). The peak
is ``--peak-tflops`` or the known GPU's bf16 peak (989 TFLOP/s on H100); null on CPU.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the rise of the process RSS
over the measurement (sampled), labelled ``peak_mem_kind: cpu_rss_delta``.

    python bench/train_speed.py               # CUDA: real Qwen2.5 shapes, seq 2048
    python bench/train_speed.py --tiny        # tiny shapes (default on CPU), < 1 min
    python bench/train_speed.py --workloads 0.5b-full,7b-lora --regimes fixed

Nothing is downloaded: models are random, built from their configs.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
            max_position_embeddings=32768, attention_dropout=0.0, use_sliding_window=False,
            initializer_range=0.02, bos_token_id=None, eos_token_id=2, pad_token_id=0)  # fmt: skip
SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}  # fmt: skip
# Tiny stand-ins keep each model's head layout (GQA ratio, tied or not), shrunk for a CPU.
TINY = {
    "qwen2.5-0.5b": dict(vocab_size=512, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=512, hidden_size=96, intermediate_size=224,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=640, hidden_size=128, intermediate_size=320,
                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                       tie_word_embeddings=False),
}  # fmt: skip


@dataclass
class Workload:
    name: str
    model: str
    mode: str  # full | lora
    micro_batch: int
    compile: bool = False
    ac: bool = False


WORKLOADS = [
    Workload("0.5b-full", "qwen2.5-0.5b", "full", 8),
    Workload("0.5b-full-compile", "qwen2.5-0.5b", "full", 8, compile=True),
    Workload("1.5b-full", "qwen2.5-1.5b", "full", 4),
    Workload("7b-lora", "qwen2.5-7b", "lora", 2, ac=True),
    Workload("0.5b-lora", "qwen2.5-0.5b", "lora", 8),
]
LORA_R, LORA_ALPHA = 16, 32.0
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0


# ------------------------------------------------------------------------------ data
def sft_documents(n: int, seq: int, vocab: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """``n`` documents ``(tokens, prompt_len)`` with Alpaca-like lengths scaled to ``seq``."""
    rng = np.random.default_rng(seed)
    scale = seq / 2048
    # lognormal around a median of ~200 tokens (at seq 2048), sigma 0.8: a long right tail
    lengths = np.exp(rng.normal(math.log(200 * scale), 0.8, n))
    lengths = np.clip(np.round(lengths), max(8, int(16 * scale)), seq).astype(np.int64)
    docs = []
    for length in lengths.tolist():
        prompt = int(length * rng.uniform(0.2, 0.6))
        docs.append((rng.integers(3, vocab, length, dtype=np.int64), prompt))
    return docs


def tunelab_sft_batches(docs, seq: int, mb: int, pad_id: int = 0) -> list[dict]:
    """Best-fit packed rows (tunelab.data.pack) grouped into micro-batches."""
    from tunelab.data.pack import best_fit

    rows = best_fit([len(d[0]) for d in docs], seq)
    ids = np.full((len(rows), seq), pad_id, np.int64)
    labels = np.full((len(rows), seq), -100, np.int64)
    pos = np.zeros((len(rows), seq), np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            tok, prompt = docs[i]
            n = len(tok)
            ids[r, at : at + n] = tok
            labels[r, at + prompt : at + n] = tok[prompt:]
            pos[r, at : at + n] = np.arange(n)
            at += n
        pos[r, at:] = np.arange(seq - at)  # padding: its own "document", never supervised
    out = []
    for s in range(0, len(rows) - mb + 1, mb):
        out.append(_batch(ids[s : s + mb], labels[s : s + mb], pos[s : s + mb], pad_id))
    return out


def hf_sft_batches(docs, mb: int, pad_id: int = 0) -> list[dict]:
    """Micro-batches of ``mb`` documents, right-padded to the longest (multiple of 8)."""
    out = []
    for s in range(0, len(docs) - mb + 1, mb):
        group = docs[s : s + mb]
        width = -(-max(len(d[0]) for d in group) // 8) * 8
        ids = np.full((mb, width), pad_id, np.int64)
        labels = np.full((mb, width), -100, np.int64)
        mask = np.zeros((mb, width), np.int64)
        for r, (tok, prompt) in enumerate(group):
            ids[r, : len(tok)] = tok
            labels[r, prompt : len(tok)] = tok[prompt:]
            mask[r, : len(tok)] = 1
        b = _batch(ids, labels, None, pad_id)
        b["attention_mask"] = torch.from_numpy(mask)
        b["real"] = int(mask.sum())
        out.append(b)
    return out


def fixed_batches(n: int, mb: int, seq: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (mb, seq), generator=g)
        # position_ids as the trainer's collator gives them for unpacked rows
        pos = torch.arange(seq).expand(mb, seq).clone()
        out.append(_batch(ids.numpy(), ids.numpy(), pos.numpy(), 0))
    return out


def _batch(ids, labels, pos, pad_id) -> dict:
    ids_t, labels_t = torch.as_tensor(ids), torch.as_tensor(labels)
    pos_t = None if pos is None else torch.as_tensor(pos)
    # supervised targets after the shift (labels[t + 1] of the same document)
    from tunelab.model.loss import shift_labels

    sup = int((shift_labels(labels_t, pos_t) != -100).sum())
    real = int((ids_t != pad_id).sum()) if pos is not None else ids_t.numel()
    return {"input_ids": ids_t, "labels": labels_t, "position_ids": pos_t, "sup": sup,
            "real": real, "tokens": ids_t.numel()}  # fmt: skip


# ------------------------------------------------------------------------------ models
def hf_config(shape: dict):
    from transformers import AutoConfig

    kw = {**QWEN, **shape}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def build_tunelab(shape: dict, w: Workload, device, seed: int, hf_state=None):
    from tunelab.config import OptimSection
    from tunelab.model.config import ModelConfig
    from tunelab.model.init import build_from_scratch
    from tunelab.model.lora import LoraSpec, apply_lora
    from tunelab.parallel.parallelize import parallelize
    from tunelab.train.optim import build_optimizer

    cfg = ModelConfig.from_hf({**QWEN, **shape})
    lora_base = torch.bfloat16 if (w.mode == "lora" and device.type == "cuda") else None
    # a LoRA base is built in bf16 directly (no transient fp32 copy of a 7B model)
    model = build_from_scratch(cfg, seed, lora_base or torch.float32, device)
    if hf_state is not None:  # same names as HF: the loss-agreement check
        missing, unexpected = model.load_state_dict(hf_state, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"state dict mismatch: {missing} {unexpected}")
        model.tie_weights()
    if w.mode == "lora":
        apply_lora(model, LoraSpec(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear"),
                   base_dtype=lora_base)  # fmt: skip
    model.train()
    parallelize(model, {"activation_checkpointing": w.ac, "compile": w.compile})
    opt = build_optimizer(model, OptimSection(lr=LR, weight_decay=WEIGHT_DECAY))
    return cfg, model, opt


def build_hf(shape: dict, w: Workload, device, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # LoRA on CUDA: a bf16 base, as LLaMA-Factory loads it; built on the device directly
    # (a 7B model's random init on the CPU takes minutes).
    dtype = torch.bfloat16 if (w.mode == "lora" and device.type == "cuda") else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            hf_config(shape), attn_implementation="sdpa", dtype=dtype
        )
    model.config.use_cache = False
    if w.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lcfg)  # adapters come out fp32 (autocast_adapter_dtype)
    model.to(device)
    if w.ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # the HF Trainer's decay rule: no decay on biases and norm weights
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n]
    keep = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": keep, "weight_decay": 0}]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=LR, fused=fused,
                            foreach=None if fused else True)  # fmt: skip
    runner = torch.compile(model) if w.compile else model
    return model, runner, opt


# ------------------------------------------------------------------------------ steps
def autocast(device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def tunelab_step(model, opt, batch, *, device, precision) -> torch.Tensor:
    from tunelab.parallel.grad import clip_grad_norm_

    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    pos = batch["position_ids"]
    pos = None if pos is None else pos.to(device, non_blocking=True)
    with autocast(device, precision):
        loss_sum, _ = model.loss(ids, labels, pos)
    loss = loss_sum / max(batch["sup"], 1)  # global supervised-token normalization
    loss.backward()
    clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def hf_step(runner, model, opt, batch, *, device, precision) -> torch.Tensor:
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    kw = {}
    if "attention_mask" in batch:
        kw["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    with autocast(device, precision):
        loss = runner(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                   MAX_GRAD_NORM)  # fmt: skip
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ------------------------------------------------------------------------------ memory
class RssSampler:
    """Peak RSS rise over a measurement (CPU), sampled every few milliseconds."""

    def __init__(self) -> None:
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return self.peak - self.base


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------ measure
def measure(tool: str, w: Workload, shape: dict, regime: str, batches: list[dict], args,
            device, precision: str) -> dict:  # fmt: skip
    from tunelab.model.config import ModelConfig

    free(device)
    sampler = RssSampler() if device.type != "cuda" else None
    mem_base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    est = None
    if tool == "tunelab":
        cfg, model, opt = build_tunelab(shape, w, device, args.seed)
        est = tunelab_estimate(cfg, model, w, batches[0], precision, device)
        step = functools.partial(tunelab_step, model, opt, device=device, precision=precision)
    else:
        model, runner, opt = build_hf(shape, w, device, args.seed)
        step = functools.partial(hf_step, runner, model, opt, device=device, precision=precision)
    del model, opt

    if device.type == "cuda":  # the peak of training, not of building (resident model kept)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    need = args.warmup + args.steps
    if len(batches) < need:
        raise SystemExit(f"{regime}: only {len(batches)} batches for {need} steps")
    for b in batches[: args.warmup]:
        step(b)
    sync(device)
    timed = batches[args.warmup : need]
    t0 = time.perf_counter()
    for b in timed:
        last = step(b)
    float(last)  # waits for the device like a logged loss would
    sync(device)
    secs = time.perf_counter() - t0
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) - mem_base, "cuda_max_allocated"
    else:
        peak, kind = sampler.stop(), "cpu_rss_delta"
    del step
    free(device)
    tokens = sum(b["tokens"] for b in timed)
    real = sum(b["real"] for b in timed)
    sup = sum(b["sup"] for b in timed)
    width = timed[0]["input_ids"].shape[1] if regime == "fixed" else args.seq
    if regime == "fixed":
        flops_tps, attn_len = tokens / secs, width
    else:
        flops_tps, attn_len = real / secs, args.mean_doc_len
    flops = ModelConfig.from_hf({**QWEN, **shape}).flops_per_token(int(round(attn_len))) * (
        2 / 3 if w.mode == "lora" else 1
    )
    peak_flops = peak_flops_of(device, args.peak_tflops)
    return {
        "tool": tool, "workload": w.name, "model": w.model + ("-tiny" if args.tiny else ""),
        "mode": w.mode + (f"-r{LORA_R}" if w.mode == "lora" else ""),
        "compile": w.compile, "activation_checkpointing": w.ac, "regime": regime,
        "seq": args.seq, "micro_batch": w.micro_batch, "precision": precision,
        "steps": len(timed), "seconds": round(secs, 4),
        "tokens_per_s": round(tokens / secs, 1), "real_tokens_per_s": round(real / secs, 1),
        "supervised_tokens_per_s": round(sup / secs, 1),
        "mfu": None if peak_flops is None else round(flops_tps * flops / peak_flops, 4),
        "peak_mem_gib": round(peak / 2**30, 4), "peak_mem_kind": kind, "device": device_name(device),
        # tunelab.train.memory's estimate (what the trainer logs); compare on CUDA only
        "estimated_mem_gib": None if est is None else round(est / 2**30, 4),
    }  # fmt: skip


def tunelab_estimate(cfg, model, w: Workload, batch: dict, precision: str, device) -> int:
    from tunelab.train.memory import estimate_memory

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate_memory(
        cfg,
        micro_batch_size=batch["input_ids"].shape[0],
        seq_length=batch["input_ids"].shape[1],
        precision=precision,
        activation_checkpointing=w.ac,
        lora_params=trainable if w.mode == "lora" else None,
        lora_rank=LORA_R,
        lora_base_dtype="bfloat16" if (w.mode == "lora" and device.type == "cuda") else None,
        packed=batch["position_ids"] is not None,
        device_type=device.type,
    )
    return est["total"]


def peak_flops_of(device, tflops: float | None) -> float | None:
    from tunelab.train.metrics import peak_flops

    return peak_flops(device, tflops)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------ loss check
def loss_agreement(args, device, precision: str) -> dict:
    """Same init (HF weights into tunelab) and batches: the first step losses of both."""
    w = Workload("loss-check", "qwen2.5-0.5b", "full", 2)
    shape = (TINY if args.tiny else SHAPES)[w.model]
    seq = args.seq if args.tiny else min(args.seq, 512)
    hf_model, runner, hf_opt = build_hf(shape, w, device, args.seed)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    _, tl_model, tl_opt = build_tunelab(shape, w, device, args.seed, hf_state=state)
    del state
    batches = fixed_batches(args.loss_steps, w.micro_batch, seq, shape["vocab_size"], args.seed)
    hf_losses, tl_losses = [], []
    for b in batches:
        hf_losses.append(
            float(hf_step(runner, hf_model, hf_opt, b, device=device, precision=precision))
        )
        tl_losses.append(
            float(tunelab_step(tl_model, tl_opt, b, device=device, precision=precision))
        )
    diff = max(abs(a - c) for a, c in zip(hf_losses, tl_losses, strict=True))
    tol = 1e-4 if precision == "fp32" else 2e-2  # fp32 rounding vs bf16 noise
    del hf_model, tl_model, hf_opt, tl_opt
    free(device)
    return {"check": "loss_agreement", "steps": len(batches), "precision": precision,
            "hf": [round(x, 6) for x in hf_losses], "tunelab": [round(x, 6) for x in tl_losses],
            "max_abs_diff": diff, "tolerance": tol, "passed": bool(diff <= tol)}  # fmt: skip


# ------------------------------------------------------------------------------ main
def ratio_table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["workload"], r["regime"]), {})[r["tool"]] = r
    head = (f"{'workload':<20} {'regime':<6} {'tok/s tl/hf':>12} {'real tok/s tl/hf':>17} "
            f"{'mem tl/hf':>10}")  # fmt: skip
    lines = ["ratio table (tunelab / HF)", head]
    for (wl, regime), t in by.items():
        if "tunelab" not in t or "hf" not in t:
            continue
        a, b = t["tunelab"], t["hf"]

        def ratio(key, a=a, b=b):
            if key == "peak_mem_gib" and a["peak_mem_kind"] != "cuda_max_allocated":
                return "-"  # an RSS rise of a tiny model says nothing about its footprint
            return f"{a[key] / b[key]:.2f}x" if b[key] else "n/a"

        lines.append(f"{wl:<20} {regime:<6} {ratio('tokens_per_s'):>12} "
                     f"{ratio('real_tokens_per_s'):>17} {ratio('peak_mem_gib'):>10}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--tiny",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tiny shapes (default on CPU)",
    )
    p.add_argument(
        "--workloads",
        default=None,
        help=f"comma list of {', '.join(w.name for w in WORKLOADS)} (default: all; "
        "with --tiny all but the compiled one)",
    )
    p.add_argument("--regimes", default="fixed,sft")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (tiny: 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20, tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5, tiny 1)")
    p.add_argument(
        "--loss-steps",
        type=int,
        default=None,
        help="steps of the loss-agreement check (default 50, tiny 5; 0: skip)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU on unknown devices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (tiny CPU default: 1)"
    )
    args = p.parse_args(argv)  # fmt: skip

    import logging

    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.tiny is None:
        args.tiny = not cuda
    if args.threads is None and args.tiny and not cuda:
        # Tiny matmuls gain nothing from threads, and on a shared CPU OpenMP workers stall
        # for up to a second per step whenever another process holds a core.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seq = args.seq or (128 if args.tiny else 2048)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if args.loss_steps is None:
        args.loss_steps = 5 if args.tiny else 50
    precision = "bf16-mixed" if cuda else "fp32"
    names = [w.name for w in WORKLOADS]
    if args.workloads:
        chosen = args.workloads.split(",")
        bad = [c for c in chosen if c not in names]
        if bad:
            p.error(f"unknown workload(s) {bad}; choose from {names}")
    else:  # inductor codegen on a small CPU takes minutes: compile is opt-in there
        chosen = [w.name for w in WORKLOADS if not (args.tiny and not cuda and w.compile)]
    workloads = [w for w in WORKLOADS if w.name in chosen]
    regimes = args.regimes.split(",")
    shapes = TINY if args.tiny else SHAPES
    torch.manual_seed(args.seed)

    rows = []
    for w in workloads:
        shape = shapes[w.model]
        vocab, need = shape["vocab_size"], args.warmup + args.steps
        for regime in regimes:
            if regime == "fixed":
                data = {t: fixed_batches(need, w.micro_batch, args.seq, vocab, args.seed)
                        for t in ("tunelab", "hf")}  # fmt: skip
            elif regime == "sft":
                # enough documents for the packed side; the baseline's first batches use the
                # same documents in the same order
                docs = sft_documents(need * w.micro_batch * 16, args.seq, vocab, args.seed)
                args.mean_doc_len = float(np.mean([len(d[0]) for d in docs]))
                data = {"tunelab": tunelab_sft_batches(docs, args.seq, w.micro_batch),
                        "hf": hf_sft_batches(docs, w.micro_batch)}  # fmt: skip
            else:
                p.error(f"unknown regime {regime!r}; use fixed and/or sft")
            for tool in ("tunelab", "hf"):
                row = measure(tool, w, shape, regime, data[tool], args, device, precision)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(ratio_table(rows), flush=True)
    ok = True
    if args.loss_steps > 0:
        check = loss_agreement(args, device, precision)
        ok = check["passed"]
        print(json.dumps(check), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
