"""Command-line options shared by `generate`, `chat` and `serve`, and the engine they build."""

from __future__ import annotations

import argparse

from tunelab.errors import ConfigError
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig
from tunelab.utils import bool_or_none


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="HF model directory, or a training checkpoint dir "
                        "(OUTPUT_DIR/checkpoints/step-N)")  # fmt: skip
    g.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply")
    g.add_argument("--dtype", default=None,
                   help="bf16 | fp16 | fp32 (default: the checkpoint's; fp32 on CPU)")  # fmt: skip
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    g.add_argument("--prompt-type", default=None,
                   help="prompt template by name, the one used in preprocess (e.g. qwen, llama3)")  # fmt: skip
    g.add_argument("--hf-chat-template", action="store_true",
                   help="use the tokenizer's own chat_template (exclusive with --prompt-type)")  # fmt: skip
    g.add_argument("--enable-thinking", type=bool_or_none, nargs="?", const=True, default=None,
                   help="true/false/none for qwen3-style reasoning templates; use the value "
                        "given to preprocess (default none)")  # fmt: skip
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (worth it on GPU; slow to start on CPU)")  # fmt: skip


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling (unset values come from the model's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate per prompt (default {max_new_tokens})")  # fmt: skip
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, (0, 1]")
    g.add_argument(
        "--top-k", type=int, default=None, help="sample from the k best tokens (0 = off)"
    )
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")  # fmt: skip


def check_template_flags(args: argparse.Namespace) -> None:
    if getattr(args, "prompt_type", None) and getattr(args, "hf_chat_template", False):
        raise ConfigError(
            "--prompt-type and --hf-chat-template are mutually exclusive: pass the one the "
            "model was trained with"
        )


def engine_from_args(args: argparse.Namespace, max_batch_size: int = 16) -> Engine:
    check_template_flags(args)
    return Engine.from_pretrained(
        args.model,
        adapter=args.adapter,
        dtype=args.dtype,
        device=args.device,
        prompt_type=args.prompt_type,
        hf_chat_template=args.hf_chat_template,
        enable_thinking=args.enable_thinking,
        compile=args.compile,
        max_batch_size=max_batch_size,
    )


def generation_config_from_args(args: argparse.Namespace, defaults: GenerationConfig):
    """Flags override the model's defaults; an explicit ``--temperature 0`` means greedy."""
    changes = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=tuple(args.stop))
    for flag in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = getattr(args, flag)
        if value is not None:
            changes[flag] = value
    return defaults.replace(**changes)
