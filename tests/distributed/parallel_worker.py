"""torchrun worker: train the tiny model under several parallel layouts, write losses/params.

    torchrun --standalone --nproc_per_node=2 tests/distributed/parallel_worker.py \
        --out DIR --checks fsdp,tp,pp_1f1b

For each check every rank writes ``DIR/{check}.rank{r}.pt`` = {"losses": [...], "params":
{name: full tensor}}; the pytest side compares them with a single-process run.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers.distributed import full_params, tiny_model, train_losses
from tunelab.parallel.dims import ParallelDims, dp_group, dp_rank, dp_size
from tunelab.parallel.parallelize import parallelize
from tunelab.parallel.pipeline import build_pipeline

FP32 = {"param_dtype": "float32", "reduce_dtype": "float32"}

# check -> (model family, parallel config); the world size fills dp_shard.
CHECKS: dict[str, tuple[str, dict]] = {
    "fsdp": ("qwen2_untied", {}),
    "fsdp_ac": ("qwen2_untied", {"activation_checkpointing": True}),
    "fsdp_tied": ("qwen2", {}),
    "tp": ("qwen2_untied", {"tp": 2}),
    "tp_nosp": ("qwen2_untied", {"tp": 2, "sequence_parallel": False}),
    "tp_tied_qknorm": ("qwen3", {"tp": 2}),
    "pp_1f1b": ("qwen2_untied", {"pp": 2}),
    "pp_gpipe": ("qwen2_untied", {"pp": 2, "pp_schedule": "GPipe"}),
    "pp_uneven": ("qwen2_untied", {"pp": 2, "num_layer_list": [1, 3]}),
    "pp_interleaved": ("qwen2_untied", {"pp": 2, "pp_virtual_stages": 2}),
    # 4 ranks
    "fsdp_tp": ("qwen2_untied", {"tp": 2}),
    "fsdp_tp_qknorm": ("qwen3", {"tp": 2}),
    "hsdp": ("qwen2_untied", {"dp_replicate": 2}),
    "pp_fsdp": ("qwen2_untied", {"pp": 2}),
    "pp_tp": ("qwen2_untied", {"pp": 2, "tp": 2}),
}


def run_check(name: str, steps: int, out: Path) -> None:
    family, layout = CHECKS[name]
    cfg = {**FP32, **layout}
    dims = ParallelDims.from_config(cfg, dist.get_world_size())
    model = tiny_model(family)
    dims.check_model(model.config, cfg)
    mesh = dims.build_mesh("cpu")
    pp_group = mesh["pp"].get_group() if dims.pp_enabled else None
    common = dict(dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), dp_group=dp_group(mesh))
    if dims.pp_enabled:
        n_micro = 2 * int(cfg.get("pp_virtual_stages", 1))
        pipe = build_pipeline(model, mesh, cfg, n_microbatches=n_micro)
        parts = pipe.model_parts
        losses = train_losses(parts, steps, pipeline=pipe, pp_group=pp_group, **common)
    else:
        parts = [parallelize(model, cfg, mesh)]
        losses = train_losses(parts, steps, **common)
    params = full_params(parts)
    torch.save({"losses": losses, "params": params}, out / f"{name}.rank{dist.get_rank()}.pt")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checks", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.use_deterministic_algorithms(True)
    code = 1
    try:
        for name in args.checks.split(","):
            run_check(name, args.steps, args.out)
        code = 0
    except Exception:
        traceback.print_exc()
    finally:
        # gloo may abort in interpreter shutdown (pytorch#190489): skip finalization.
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
