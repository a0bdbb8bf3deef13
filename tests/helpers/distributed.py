"""Helpers for parallel tests: a tiny tunelab model, packed batches, torchrun launches.

Worker scripts (run under torchrun) and the pytest side share these, so the single-process
reference and the distributed run build the very same model, data and optimizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# Tiny but with every feature the parallel plans touch: GQA (4 heads, 2 KV heads), 4 layers
# (2 per pipeline stage, or 1 per virtual stage), qkv bias (qwen2), untied lm_head.
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(family: str = "qwen2_untied", **overrides):
    from tests.helpers.tiny_models import tiny_hf_config
    from tunelab.model.config import ModelConfig

    hf = tiny_hf_config(family, **{**TINY, **overrides})
    return ModelConfig.from_hf(hf.to_dict())


def tiny_model(family: str = "qwen2_untied", seed: int = 0, lora: bool = False, **overrides):
    """A fp32 tunelab Transformer with deterministic random weights (norms and biases too).

    ``lora``: LoRA (r 4) on all linear layers, with lora_B random rather than zero so the
    first step already trains both adapter matrices.
    """
    from tunelab.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(tiny_config(family, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if lora:
        from tunelab.model.lora import LoraSpec, apply_lora

        apply_lora(model, LoraSpec(r=4, alpha=8.0, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def packed_batch(
    batch: int = 4, seq: int = 16, vocab: int = 128, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Rows packed with 2-3 documents each; prompt tokens and one gap are -100 in labels.

    Documents of different lengths per row give different supervised-token counts per row,
    so a wrong normalization (per rank or per micro-batch mean) cannot go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = input_ids.clone()
    position_ids = torch.empty(batch, seq, dtype=torch.long)
    for row in range(batch):
        cuts = sorted(torch.randperm(seq - 4, generator=g)[: 1 + row % 2].add(2).tolist())
        starts = [0, *cuts]
        ends = [*cuts, seq]
        for doc, (s, e) in enumerate(zip(starts, ends)):
            position_ids[row, s:e] = torch.arange(e - s)
            prompt = 1 + (row + doc) % 3  # unsupervised prompt span of varying length
            labels[row, s : min(e, s + prompt)] = -100
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def batches(num_steps: int, **kwargs) -> list[dict[str, torch.Tensor]]:
    return [packed_batch(seed=100 + step, **kwargs) for step in range(num_steps)]


def torchrun(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    timeout: float = 240,
    extra_env: dict[str, str] | None = None,
    torchrun_args: tuple[str, ...] = ("--standalone",),
) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun on CPU/gloo; raises with both outputs on failure."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_args,
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]
    # On a timeout torchrun gets SIGTERM, on which it stops its workers (they run in their
    # own sessions, out of reach of a process-group kill); no orphan keeps spinning.
    popen = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = popen.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = "(no output: killed)", ""
        raise AssertionError(
            f"torchrun timed out after {timeout}s: {' '.join(cmd)}\n"
            f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-12000:]}"
        ) from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"
        )
    return proc


def read_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def clean_name(name: str) -> str:
    """Parameter name without wrapper prefixes (activation checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def global_num_tokens(batch: dict[str, torch.Tensor]) -> int:
    from tunelab.model.loss import IGNORE_INDEX, shift_labels

    targets = shift_labels(batch["labels"], batch["position_ids"])
    return int((targets != IGNORE_INDEX).sum())


def train_losses(
    model_parts: list[torch.nn.Module],
    steps: int,
    *,
    mesh=None,
    pipeline=None,
    num_micro: int = 1,
    batch_size: int = 4,
    lr: float = 2.0,
    max_grad_norm: float = 0.5,
    grad_norms: list[float] | None = None,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    first_step: int = 0,
) -> list[float]:
    """SGD steps on the shared packed batches, loss = sum / global supervised tokens.

    Each data-parallel rank takes its contiguous slice of rows and cuts it into ``num_micro``
    micro-batches (the pipeline's count under PP); the step goes through the library's
    ``forward_backward`` / ``global_count`` / ``global_loss`` / ``clip_grad_norm_``, as the
    trainer's does. ``optimizer`` replaces the SGD default; ``first_step`` skips that many
    batches (resume). Returns the global loss of every step.
    """
    from tunelab.parallel.dims import dp_rank, dp_size
    from tunelab.parallel.grad import clip_grad_norm_
    from tunelab.parallel.step import forward_backward, global_count, global_loss

    params = [p for m in model_parts for p in m.parameters() if p.requires_grad]
    # Plain SGD: the update is proportional to the gradient, so a wrong gradient scale (say
    # FSDP averaging instead of summing) changes the losses; Adam would hide it.
    opts = (
        optimizer if isinstance(optimizer, list) else [optimizer or torch.optim.SGD(params, lr=lr)]
    )
    pp_group = mesh["pp"].get_group() if mesh is not None and mesh["pp"].size() > 1 else None
    if pipeline is not None:
        num_micro = pipeline.n_microbatches
    rank, size = dp_rank(mesh), dp_size(mesh)
    losses = []
    for batch in batches(first_step + steps, batch=batch_size)[first_step:]:
        rows = batch_size // size
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
        per = rows // num_micro
        micro = [
            {k: v[i * per : (i + 1) * per] for k, v in local.items()} for i in range(num_micro)
        ]
        count = global_count(global_num_tokens(local), mesh)
        part = forward_backward(pipeline or model_parts[0], micro, count)
        norm = clip_grad_norm_(
            params,
            max_grad_norm,
            pp_group=pp_group,
            norm_parameters=None if pipeline is None else list(pipeline.norm_parameters()),
        )
        if grad_norms is not None:
            grad_norms.append(norm.item())
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(global_loss(part, mesh).item())
    return losses


def full_params(model_parts: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Unsharded copies of all parameters (a collective for DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for part in model_parts:
        for name, p in part.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[clean_name(name)] = t.detach().clone()
    return out


def adamw(model_parts: list[torch.nn.Module]) -> torch.optim.AdamW:
    """AdamW with state worth resharding (moments, step) for checkpoint tests."""
    params = [p for m in model_parts for p in m.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, foreach=False)


def held_out_loss(target, mesh=None, num_micro: int = 1, batch_size: int = 4) -> float:
    """Forward-only loss on a batch no training step saw (``target``: model or Pipeline)."""
    from tunelab.parallel.dims import dp_rank, dp_size
    from tunelab.parallel.step import evaluate, global_count, global_loss

    batch = packed_batch(batch=batch_size, seed=999)
    rank, size = dp_rank(mesh), dp_size(mesh)
    rows = batch_size // size
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    per = rows // num_micro
    micro = [{k: v[i * per : (i + 1) * per] for k, v in local.items()} for i in range(num_micro)]
    n = global_count(global_num_tokens(local), mesh)
    return global_loss(evaluate(target, micro, n), mesh).item()
