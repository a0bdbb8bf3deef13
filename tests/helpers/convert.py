"""Helpers for the convert tests: Megatron-core's own GPTModel as the oracle.

`python -m tests.helpers.convert JOBS.pt` runs in a separate process (it initializes a gloo
process group and Megatron's parallel state, which must not leak into the pytest process).
JOBS.pt holds ``{"input_ids": LongTensor[B, S], "jobs": [(mg_dir, out_path), ...]}`` and
optionally ``"device": "cuda"``; for each
job it builds ``GPTModel`` with the local layer spec from the checkpoint's ``args``, loads the
TP1 PP1 file with ``load_state_dict(strict=True)`` and saves the logits.

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


def _read_megatron_file(mg_dir: Path) -> dict:
    """Read the single TP1 PP1 file by the layout rules (independent of tunelab's reader)."""
    iteration = (mg_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    sub = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    path = mg_dir / sub / "mp_rank_00" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _gpt_model(args, use_cpu_initialization: bool = True):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers,
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
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=True,
        post_process=True,
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
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    if device != "cpu":
        mrandom.model_parallel_cuda_manual_seed(0)
    ids = spec["input_ids"].to(device)
    b, s = ids.shape
    position_ids = torch.arange(s, device=device).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
    code = 0
    for mg_dir, out_path in spec["jobs"]:
        obj = _read_megatron_file(Path(mg_dir))
        model = _gpt_model(obj["args"], use_cpu_initialization=device == "cpu")
        model.load_state_dict(obj["model"], strict=True)
        model.to(device)
        model.eval()
        with torch.no_grad():
            logits = model(ids, position_ids, attention_mask=causal)
        torch.save(logits.float().cpu(), out_path)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1])
