"""`tunelab train [CONFIG.yaml] [--section.key=value ...]`: pretrain, fine-tune or LoRA-tune."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="run config YAML (see docs/config.md)")
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="--section.key=value overrides; Megatron names such as --micro-batch-size 4 work",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults + file + overrides) and exit",
    )
    # Every `--key` is a config override, which argparse cannot know in advance: nothing is
    # parsed as an option here (main() handles -h / --print-config), so overrides may also
    # come first, without a config file.
    p.prefix_chars = "+"
    p.set_defaults(train_parser=p)


def main(args: argparse.Namespace) -> int:
    from tunelab.config import load_config

    items = ([args.config] if args.config is not None else []) + list(args.overrides or [])
    if "-h" in items or "--help" in items:
        args.train_parser.print_help()
        return 0
    print_config = bool(getattr(args, "print_config", False))
    if "--print-config" in items:
        items.remove("--print-config")
        print_config = True
    config = items.pop(0) if items and not items[0].startswith("-") else None
    cfg = load_config(config, items)
    if print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from tunelab.parallel.launch import exit_process, launched_by_torchrun
    from tunelab.train.trainer import Trainer

    distributed = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        result = Trainer(cfg).train()
        return 128 + int(result.stopped_by_signal) if result.stopped_by_signal else 0
    code = 1
    try:
        from tunelab.parallel.launch import init_distributed, quiet_other_ranks

        quiet_other_ranks(init_distributed(cfg.train.device))
        result = Trainer(cfg).train()
        code = 128 + int(result.stopped_by_signal) if result.stopped_by_signal else 0
    except Exception as e:  # every rank's error reaches the user
        from tunelab.errors import TunelabError

        rank = os.environ.get("RANK", "?")
        if isinstance(e, TunelabError):
            print(f"[rank {rank}] tunelab train: error: {e}", file=sys.stderr)
            code = 2
        else:
            import traceback

            traceback.print_exc()
            code = 1
    exit_process(code)
    return code
