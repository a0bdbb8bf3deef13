"""Training metrics: throughput, MFU, memory; progress display, metrics.jsonl, TensorBoard,
and a loss-curve PNG at the end. Only the main process writes; the others pass enabled=False.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s of common GPUs (without sparsity), matched by substring of the name.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10": 125.0,
    "4090": 165.0,
}


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s per device for MFU: the configured value, else a known GPU's, else None."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class MetricsLogger:
    """One record per step to metrics.jsonl (+ TensorBoard) and a progress line or bar."""

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        interval: int = 1,
        progress: str = "auto",
        tensorboard: bool | None = None,
        plot: bool = True,
        enabled: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.interval = interval
        self.plot = plot
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._bar = None
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "line"
        self.progress = progress
        if progress == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                if tensorboard:
                    logger.warning("logging.tensorboard=true but tensorboard is not installed")

    def _write(self, record: dict[str, Any]) -> None:
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and v is not None:
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def log_step(self, record: dict[str, Any]) -> None:
        """``record`` holds step, loss, lr, grad_norm, tokens, step_time, mfu, memory_gib."""
        if not self.enabled:
            return
        step = record["step"]
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        record = {"kind": "train", **record, "elapsed_s": round(elapsed, 3)}
        self._write(record)
        eta = elapsed / max(1, done) * (self.total_steps - step)
        mfu = record.get("mfu")
        text = (
            f"loss {record['loss']:.4f} | lr {record['lr']:.3g} | gnorm {record['grad_norm']:.3g}"
            f" | {record['tokens_per_s']:.0f} tok/s"
            f" | mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'}"
            f" | mem {record['memory_gib']:.2f} GiB | eta {_fmt_eta(eta)}"
        )
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text, refresh=False)
        elif self.progress == "line" and (step % self.interval == 0 or step == self.total_steps):
            logger.info("step %d/%d | %s", step, self.total_steps, text)

    def log_eval(self, step: int, loss: float, num_tokens: int) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, "loss": loss, "tokens": num_tokens})
        msg = f"eval step {step}: loss {loss:.4f} over {num_tokens} tokens"
        if self._bar is not None:
            self._bar.write(msg)
        else:
            logger.info(msg)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.plot:
            plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a resumed run's repeated steps keep the newest record."""
    out: dict[tuple[str, int], dict] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out[(r.get("kind", "train"), r["step"])] = r
    return sorted(out.values(), key=lambda r: (r["step"], r.get("kind", "")))


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Train (and eval) loss against step as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: no loss-curve PNG")
        return None
    from tunelab.utils import atomic_path

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("train", "-"), ("eval", "o-")):
        pts = [(r["step"], r["loss"]) for r in records if r.get("kind") == kind]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{kind} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(png_path)
