"""`tunelab <verb>`: every subcommand is registered in COMMANDS below, and nowhere else.

Each entry names a module that defines ``add_arguments(parser)`` and ``main(args) -> int``.
Modules are imported only when their verb runs, so `tunelab preprocess` never imports the
training stack and a broken optional dependency of one verb cannot break another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tunelab import __version__
from tunelab.errors import TunelabError

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("tunelab.data.preprocess", "tokenize raw data into Megatron .bin/.idx datasets"),
    "train": ("tunelab.train.cli", "pretrain, fine-tune or LoRA-tune from a YAML config"),
    "convert": ("tunelab.convert.cli", "convert checkpoints between HF and Megatron mcore"),
    "merge-lora": ("tunelab.model.merge_cli", "merge a LoRA adapter into its base model"),
    "generate": ("tunelab.infer.generate_cli", "generate text from prompts or a JSONL file"),
    "chat": ("tunelab.infer.chat", "interactive terminal chat with a model"),
    "serve": ("tunelab.infer.server", "OpenAI-compatible HTTP server"),
    "eval": ("tunelab.eval.cli", "evaluate a model on MMLU, C-Eval, BoolQ, ..."),
    "demo": ("tunelab.demo.run", "the whole path on a built-in tiny model and data set, on CPU"),
}


def _load(verb: str):
    module_name, _ = COMMANDS[verb]
    return importlib.import_module(module_name)


def build_parser(verbs: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The parser, with full arguments for ``verbs`` (pass ``tuple(COMMANDS)`` for all).

    Only the modules of ``verbs`` are imported; the docs generator asks for all of them.
    """
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Pretrain and fine-tune LLMs on native PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in verbs:
            _load(name).add_arguments(p)
    return parser


def _find_verb(argv: list[str]) -> str | None:
    """The first positional argument, skipping the values of top-level options."""
    skip_next = False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a == "--log-level":
            skip_next = True
        elif not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = _find_verb(argv)
    parser = build_parser((verb,) if verb else ())
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(_load(args.verb).main(args) or 0)
    except TunelabError as e:
        print(f"tunelab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tunelab {args.verb}: interrupted", file=sys.stderr)
        return 130
