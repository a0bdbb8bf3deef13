"""Helpers for the convert tests: Megatron-core's own GPTModel as the oracle.

`python -m tests.helpers.convert JOBS.pt` runs in separate processes (it initializes a process
group and Megatron's parallel state, which must not leak into the pytest process); launch one
process per tensor-parallel rank with RANK / WORLD_SIZE / MASTER_PORT set (see
:func:`run_megatron`). JOBS.pt holds ``{"input_ids": LongTensor[B, S], "jobs": [(mg_dir,
out_path), ...]}`` and optionally ``"device": "cuda"``. For each job every rank builds, per
pipeline stage, a ``GPTModel`` (local spec, ``pre_process`` on the first stage,
``post_process`` on the last) from the checkpoint's ``args``, loads its own file
``mp_rank_{tp}[_{pp}]`` with ``load_state_dict(strict=True)``, runs the stages in sequence
(``set_input_tensor``) and saves its vocab shard of the logits to ``{out_path}.tp{rank}``.
Files are found by the layout rules, independently of tunelab's reader.

On CPU, Megatron-core assumes CUDA in two places that do not matter for a forward; they are
patched here, and only on CPU: the rotary ``inv_freq`` is moved to ``torch.cuda.current_device()``
(we answer "cpu") and attention dropout forks the CUDA RNG tracker (a no-op context in eval).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch


def _stage_files(mg_dir: Path, tp_rank: int) -> list[Path]:
    """This TP rank's files, one per pipeline stage, by the layout rules."""
    iteration = (mg_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    it = mg_dir / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    single = it / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"
    if single.is_file():
        return [single]
    files = sorted(it.glob(f"mp_rank_{tp_rank:02d}_[0-9][0-9][0-9]/model_optim_rng.pt"))
    assert files, f"no files for TP rank {tp_rank} in {it}"
    return files


def _read(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def run_megatron(jobs_path: Path, world_size: int = 1, timeout: int = 600) -> None:
    """Run :func:`main` in ``world_size`` processes (one per TP rank); raise on failure."""
    import socket
    import subprocess

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "PYTHONPATH": str(root), "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.convert", str(jobs_path)],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise RuntimeError(f"megatron rank {rank} failed ({p.returncode}):\n{out[-4000:]}")


def gpt_model(
    args,
    use_cpu_initialization=True,
    pre_process=True,
    post_process=True,
    num_layers=None,
    init_method_std=0.02,
):
    """Megatron-core GPTModel (local spec) for a checkpoint's ``args``; ``num_layers`` overrides
    for one pipeline stage built in a single process."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers or args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        params_dtype=args.params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        bf16=args.params_dtype == torch.bfloat16,
        fp16=args.params_dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        init_method_std=init_method_std,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(args.rotary_base),
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
    )


def main(jobs_path: str) -> int:
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    spec = torch.load(jobs_path, weights_only=True)
    device = spec.get("device", "cpu")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    if device == "cpu":
        torch.cuda.current_device = lambda: "cpu"
        mrandom.CudaRNGStatesTracker.fork = lambda self, name="": contextlib.nullcontext()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    backend = "gloo" if device == "cpu" else "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world, 1)
    if device != "cpu":
        torch.cuda.set_device(rank)
        mrandom.model_parallel_cuda_manual_seed(0)
    ids = spec["input_ids"].to(device)
    b, s = ids.shape
    position_ids = torch.arange(s, device=device).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
    for template, out_dir, out_path in spec.get("produce", []):
        _produce(Path(template), Path(out_dir), out_path, rank, ids, position_ids, causal)
    for mg_dir, out_path in spec.get("jobs", []):
        files = _stage_files(Path(mg_dir), rank)
        hidden = None
        for p, path in enumerate(files):
            obj = _read(path)
            assert "model" in obj, f"{path}: no 'model' (virtual stages are not run here)"
            num_layers = len(
                {k.split(".")[2] for k in obj["model"] if k.startswith("decoder.layers.")}
            )
            model = gpt_model(obj["args"], use_cpu_initialization=device == "cpu",
                              pre_process=p == 0, post_process=p == len(files) - 1,
                              num_layers=num_layers)  # fmt: skip
            model.load_state_dict(obj["model"], strict=True)
            model.to(device).eval()
            with torch.no_grad():
                if p > 0:
                    model.set_input_tensor(hidden)
                hidden = model(ids if p == 0 else None, position_ids, attention_mask=causal)
        torch.save(hidden.float().cpu(), f"{out_path}.tp{rank}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _produce(template: Path, out_dir: Path, out_path, rank, ids, position_ids, causal) -> None:
    """Megatron writes a checkpoint itself: a randomly initialized GPTModel (TP = world size,
    PP 1) with ``template``'s args, saved in the torch layout, plus its logits."""
    (path,) = _stage_files(template, rank)
    args = _read(path)["args"]
    torch.manual_seed(1234)  # CPU init builds the full weight on every rank, then slices it
    model = gpt_model(args, init_method_std=0.3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # Megatron inits norms to 1, biases to 0
            if name.endswith("layernorm.weight") or name.endswith(".bias"):
                p.copy_(
                    torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5
                )
        logits = model(ids, position_ids, attention_mask=causal)
    torch.save(logits.float().cpu(), f"{out_path}.tp{rank}")
    state = model.state_dict_for_save_checkpoint()
    target = out_dir / "iter_0000001" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": state}, target)
    (out_dir / "latest_checkpointed_iteration.txt").write_text("1")


def megatron_logits(out_path: str | Path, tp: int) -> torch.Tensor:
    """Full logits from the per-rank vocab shards :func:`main` saved."""
    parts = [torch.load(f"{out_path}.tp{r}", weights_only=True) for r in range(tp)]
    return torch.cat(parts, dim=-1)


if __name__ == "__main__":
    main(sys.argv[1])
