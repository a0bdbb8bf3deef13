"""torchrun worker: train the tiny model under several parallel layouts, write losses/params.

    torchrun --standalone --nproc_per_node=2 tests/distributed/parallel_worker.py \
        --out DIR --checks fsdp,tp,pp_1f1b

For each check every rank writes ``DIR/{check}.rank{r}.pt`` = {"losses": [...], "params":
{name: full tensor}}; the pytest side compares them with a single-process run.
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers.distributed import (
    adamw,
    full_params,
    held_out_loss,
    tiny_model,
    train_losses,
)
from tunelab.parallel.dims import ParallelDims
from tunelab.parallel.launch import exit_process, init_distributed
from tunelab.parallel.parallelize import parallelize
from tunelab.parallel.pipeline import build_pipeline

FP32 = {"param_dtype": "float32", "reduce_dtype": "float32"}

# check -> (model family, parallel config); the world size fills dp_shard.
CHECKS: dict[str, tuple[str, dict]] = {
    "fsdp": ("qwen2_untied", {}),
    "fsdp_ac": ("qwen2_untied", {"activation_checkpointing": True}),
    "fsdp_tied": ("qwen2", {}),
    # bf16 all-gather and compute, fp32 master weights and reduction (train.precision bf16-mixed)
    "fsdp_bf16": ("qwen2_untied", {"param_dtype": "bfloat16"}),
    "tp": ("qwen2_untied", {"tp": 2}),
    "tp_nosp": ("qwen2_untied", {"tp": 2, "sequence_parallel": False}),
    "tp_ac": ("qwen2_untied", {"tp": 2, "activation_checkpointing": True}),
    "tp_tied_qknorm": ("qwen3", {"tp": 2}),
    "pp_1f1b": ("qwen2_untied", {"pp": 2}),
    "pp_gpipe": ("qwen2_untied", {"pp": 2, "pp_schedule": "GPipe"}),
    "pp_uneven": ("qwen2_untied", {"pp": 2, "num_layer_list": [1, 3]}),
    "pp_interleaved": ("qwen2_untied", {"pp": 2, "virtual_stages": 2}),
    "pp_tied": ("qwen2", {"pp": 2}),
    # 4 ranks
    "fsdp_tp": ("qwen2_untied", {"tp": 2}),
    "fsdp_tp_qknorm": ("qwen3", {"tp": 2, "activation_checkpointing": True}),
    "hsdp": ("qwen2_untied", {"dp_replicate": 2}),
    "pp_fsdp": ("qwen2_untied", {"pp": 2}),
    "pp_fsdp_tied": ("qwen2", {"pp": 2}),
    "pp_tp": ("qwen2_untied", {"pp": 2, "tp": 2}),
    # LoRA (all linear layers; base frozen)
    "lora_fsdp": ("lora:qwen2_untied", {}),
    "lora_tp": ("lora:qwen2_untied", {"tp": 2}),
    "lora_fsdp_tp": ("lora:qwen3", {"tp": 2}),
}


def build_model(family: str):
    """``lora:<family>`` means the family's tiny model with LoRA on all linear layers."""
    lora, _, fam = family.rpartition(":")
    return tiny_model(fam, lora=bool(lora))


def check_lora_layout(model, dims: ParallelDims) -> None:
    """Only adapters train; under TP their shards follow the base layer's (issue 6)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
    if not dims.tp_enabled:
        return
    attn = model.model.layers["0"].self_attn
    mlp = model.model.layers["0"].mlp

    def tp_placement(p):
        assert isinstance(p, DTensor)
        return p.placements[p.device_mesh.mesh_dim_names.index("tp")]

    for col in (attn.q_proj, attn.v_proj, mlp.up_proj):
        assert tp_placement(col.weight) == Shard(0)
        assert tp_placement(col.lora_A.weight) == Replicate()
        assert tp_placement(col.lora_B.weight) == Shard(0)
    for row in (attn.o_proj, mlp.down_proj):
        assert tp_placement(row.weight) == Shard(1)
        assert tp_placement(row.lora_A.weight) == Shard(1)
        assert tp_placement(row.lora_B.weight) == Replicate()


def check_vocab_parallel(model) -> None:
    """Embedding and lm_head hold V / tp rows each (tied: still one parameter); every
    parameter is a DTensor (foreach / fused optimizers refuse a mix with plain tensors)."""
    from torch.distributed.tensor import DTensor, Shard

    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    assert not plain, plain
    for w in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert isinstance(w, DTensor)
        assert w.placements[w.device_mesh.mesh_dim_names.index("tp")] == Shard(0)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def run_check(name: str, steps: int, out: Path) -> None:
    family, layout = CHECKS[name]
    cfg = {**FP32, **layout}
    dims = ParallelDims.from_config(cfg, dist.get_world_size())
    model = build_model(family)
    dims.check_model(model.config, cfg)
    mesh = dims.build_mesh("cpu")
    norms: list[float] = []
    if dims.pp_enabled:
        n_micro = 2 * int(cfg.get("virtual_stages", 1))
        init_part = None
        if name == "pp_uneven":
            # The large-model path: split a meta-device model, materialize each stage alone.
            full = model.state_dict()
            with torch.device("meta"):
                model = build_model(family)

            def init_part(part):
                part.to_empty(device="cpu")
                part.load_state_dict({k: full[k] for k in part.state_dict()})

        pipe = build_pipeline(model, mesh, cfg, n_microbatches=n_micro, init_part=init_part)
        parts = pipe.model_parts
        losses = train_losses(parts, steps, mesh=mesh, pipeline=pipe, grad_norms=norms)
    else:
        parts = [parallelize(model, cfg, mesh)]
        if family.startswith("lora:"):
            check_lora_layout(parts[0], dims)
        if dims.tp_enabled:
            check_vocab_parallel(parts[0])
        # Two micro-batches per rank: accumulation with unequal token counts per micro-batch.
        micro = 2 if dims.dp_size <= 2 else 1
        losses = train_losses(parts, steps, mesh=mesh, num_micro=micro, grad_norms=norms)
    target = pipe if dims.pp_enabled else parts[0]
    num_micro = pipe.n_microbatches if dims.pp_enabled else 1
    eval_loss = held_out_loss(target, mesh, num_micro)
    params = full_params(parts)
    torch.save(
        {"losses": losses, "grad_norms": norms, "params": params, "eval_loss": eval_loss},
        out / f"{name}.rank{dist.get_rank()}.pt",
    )


# name -> the layouts of the saving and the resuming run (same world size)
RESHARDS = {
    "reshard_fsdp_to_tp": ({}, {"tp": 2}),
    "reshard_pp_to_fsdp": ({"pp": 2}, {}),
}


def run_reshard(name: str, steps: int, out: Path) -> None:
    """Train under one layout, save with DCP, resume under another in a fresh model.

    Model and AdamW state go through tunelab.parallel.state (keys = HF names). The
    checkpoint is left in ``out/{name}_ckpt`` for the pytest side to resume in one process.
    """
    import torch.distributed.checkpoint as dcp

    from tunelab.parallel import state as st

    ckpt = out / f"{name}_ckpt"
    losses: list[float] = []
    for phase, layout in enumerate(RESHARDS[name]):
        cfg = {**FP32, **layout}
        dims = ParallelDims.from_config(cfg, dist.get_world_size())
        mesh = dims.build_mesh("cpu")
        # A different seed for the resumed model: only the checkpoint can make it match.
        model = tiny_model(seed=phase * 7)
        pipe = None
        if dims.pp_enabled:
            pipe = build_pipeline(model, mesh, cfg, n_microbatches=2)
            parts = pipe.model_parts
        else:
            parts = [parallelize(model, cfg, mesh)]
        opts = [adamw([part]) for part in parts]
        if phase == 1:
            state = {
                "model": st.model_state_dict(parts),
                "optim": st.optimizer_state_dict(parts, opts),
            }
            dcp.load(state, checkpoint_id=str(ckpt))
            st.load_model_state_dict(parts, state["model"])
            st.load_optimizer_state_dict(parts, opts, state["optim"])
        losses += train_losses(
            parts, steps, optimizer=opts, first_step=phase * steps, mesh=mesh, pipeline=pipe
        )
        if phase == 0:
            state = {
                "model": st.model_state_dict(parts),
                "optim": st.optimizer_state_dict(parts, opts),
            }
            dcp.save(state, checkpoint_id=str(ckpt))
    torch.save({"losses": losses}, out / f"{name}.rank{dist.get_rank()}.pt")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checks", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    env = init_distributed("cpu", timeout_s=120)
    assert env.backend == "gloo" and env.world_size == dist.get_world_size()
    torch.use_deterministic_algorithms(True)
    code = 1
    try:
        for name in args.checks.split(","):
            if name in RESHARDS:
                run_reshard(name, args.steps, args.out)
            else:
                run_check(name, args.steps, args.out)
        code = 0
    except Exception:
        traceback.print_exc()
    finally:
        # destroy_process_group + flush + os._exit: gloo may abort in interpreter shutdown.
        exit_process(code)


if __name__ == "__main__":
    main()
