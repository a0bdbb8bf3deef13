"""`tunelab convert`: HF <-> Megatron mcore checkpoints, with MindSpeed's flag names."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

# MindSpeed flags accepted so existing scripts run unchanged; they change nothing here.
_NO_OP_FLAGS = {
    "model_type": "--model-type (only GPT models exist here)",
    "use_mcore_models": "--use-mcore-models (output is always mcore)",
    "tokenizer_model": "--tokenizer-model (the tokenizer is copied from the HF directory)",
    "add_qkv_bias": "--add-qkv-bias (read from config.json: Qwen2 always has it)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to convert")
    g.add_argument(
        "--load-model-type",
        choices=("hf", "mg"),
        required=True,
        help="source format: hf (Hugging Face dir) or mg (Megatron mcore checkpoint)",
    )
    g.add_argument(
        "--save-model-type", choices=("hf", "mg"), required=True, help="target format: mg or hf"
    )
    g.add_argument(
        "--load-dir",
        type=Path,
        required=True,
        help="HF model dir, or Megatron dir holding latest_checkpointed_iteration.txt "
        "(an iter_XXXXXXX dir also works)",
    )
    g.add_argument(
        "--save-dir",
        type=Path,
        help="mg: output Megatron dir; hf: writes {save-dir}/mg2hf/ and reads "
        "config.json / tokenizer from save-dir if present (the seeds pass the "
        "original HF model dir)",
    )
    g.add_argument(
        "--save-hf-dir", type=Path, help="hf output: write exactly here instead of {save-dir}/mg2hf"
    )
    g.add_argument(
        "--hf-config-dir",
        type=Path,
        help="HF dir whose config.json (and tokenizer) describe an mg source; "
        "default: --save-dir, then the checkpoint's own args",
    )
    g.add_argument(
        "--model-type-hf",
        help="MindSpeed family name (llama2, qwen25, qwen3, mistral, ...): only used "
        "when an mg source has no HF config",
    )
    g = p.add_argument_group("target layout (mg output)")
    g.add_argument("--target-tensor-parallel-size", type=int, default=1)
    g.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    g.add_argument(
        "--num-layer-list", help="layers per pipeline stage, e.g. 4,4,6,6 (sum = num_layers)"
    )
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        help="layers per virtual pipeline chunk (interleaved schedule)",
    )
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        help="pad the vocab to a multiple of this x TP, as Megatron does (padding rows repeat "
        "the last row; HF export cuts them off). Default: no padding",
    )
    g.add_argument(
        "--transformer-impl",
        choices=("local", "transformer_engine"),
        default="local",
        help="mcore key names: local spec (MindSpeed) or TE",
    )
    g.add_argument(
        "--params-dtype",
        choices=("fp16", "bf16", "fp32"),
        help="cast weights on output (default: keep the source dtype)",
    )
    g = p.add_argument_group("LoRA merge")
    g.add_argument(
        "--lora-load",
        type=Path,
        help="PEFT adapter dir, or a MindSpeed LoRA checkpoint (Megatron layout, "
        "mg source only) to merge while converting",
    )
    g.add_argument(
        "--lora-r", type=int, help="MindSpeed LoRA rank (default: from its args, else 16)"
    )
    g.add_argument(
        "--lora-alpha", type=float, help="MindSpeed LoRA alpha (default: from its args, else 32)"
    )
    g.add_argument(
        "--lora-target-modules",
        nargs="+",
        help="linear_qkv linear_proj linear_fc1 linear_fc2 (legacy names accepted)",
    )
    g = p.add_argument_group("safety and compatibility")
    g.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load Megatron files that torch.load(weights_only=True) refuses "
        "(runs pickle code: only for files you trust)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--model-type", help=argparse.SUPPRESS)
    g.add_argument("--use-mcore-models", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--tokenizer-model", help=argparse.SUPPRESS)
    g.add_argument("--add-qkv-bias", action="store_true", help=argparse.SUPPRESS)  # fmt: skip


def _layer_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"--num-layer-list {text!r}: expected integers like 4,4,6,6") from None


def main(args: argparse.Namespace) -> int:
    from tunelab.convert.megatron import ConvertOptions, convert

    for attr, text in _NO_OP_FLAGS.items():
        if getattr(args, attr, None):
            log.warning("%s has no effect in tunelab convert", text)
    opts = ConvertOptions(
        load_model_type=args.load_model_type,
        save_model_type=args.save_model_type,
        load_dir=args.load_dir,
        save_dir=args.save_dir,
        tp=args.target_tensor_parallel_size,
        pp=args.target_pipeline_parallel_size,
        num_layer_list=_layer_list(args.num_layer_list),
        layers_per_vpp_stage=args.num_layers_per_virtual_pipeline_stage,
        params_dtype=args.params_dtype,
        model_type_hf=args.model_type_hf,
        transformer_impl=args.transformer_impl,
        hf_config_dir=args.hf_config_dir,
        save_hf_dir=args.save_hf_dir,
        lora_load=args.lora_load,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_target_modules=args.lora_target_modules,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        progress=not args.no_progress,
    )
    if args.save_model_type == "hf" and (
        args.target_tensor_parallel_size != 1 or args.target_pipeline_parallel_size != 1
    ):
        log.warning("--target-*-parallel-size only applies to mg output; ignored for hf")
    out = convert(opts)
    print(f"tunelab convert: wrote {out}")
    return 0
