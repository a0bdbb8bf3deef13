"""`tunelab generate`: continue prompts from the command line or a JSONL file.

``--prompt`` texts are generated as one batch; a single prompt streams to the terminal.
``--input rows.jsonl --output out.jsonl`` reads rows with ``"prompt"`` (text) or
``"messages"`` (a chat, rendered with the template), validates every row before generating,
batches rows of similar length, and writes each input row plus ``completion``,
``finish_reason``, ``prompt_tokens``, ``completion_tokens`` in input order, atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig
from tunelab.utils import atomic_path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tunelab.infer.options import add_model_arguments, add_sampling_arguments

    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=256)
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--prompt", nargs="+", default=None, metavar="TEXT",
                     help="one or more prompts, generated as one batch")  # fmt: skip
    src.add_argument("--input", default=None, metavar="FILE.jsonl",
                     help='rows with "prompt" (text) or "messages" (a chat); needs --output')  # fmt: skip
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="where --input results go (written atomically)")  # fmt: skip
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the template "
                        "(--prompt-type or --hf-chat-template)")  # fmt: skip
    p.add_argument("--system", default=None, help="system prompt for --chat and messages rows")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (16)")
    p.add_argument("--no-stream", action="store_true",
                   help="print a single --prompt's result at the end instead of streaming")  # fmt: skip


def _encode(engine: Engine, row: dict, chat: bool, system: str | None, where: str) -> list[int]:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of role messages")
        return engine.encode_chat(msgs, system=row.get("system", system))
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DataError(
            f"{where}: needs a non-empty string 'prompt' or a 'messages' list "
            f"(keys present: {sorted(row)})"
        )
    if chat:
        return engine.encode_chat([{"role": "user", "content": prompt}], system=system)
    return engine.encode_text(prompt)


def read_rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append((n, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def generate_file(
    engine: Engine,
    in_path: Path,
    out_path: Path,
    config: GenerationConfig,
    chat: bool = False,
    system: str | None = None,
    batch_size: int = 16,
) -> int:
    """Generate every row of ``in_path`` into ``out_path``; returns the number of rows."""
    from tqdm import tqdm

    rows = read_rows(in_path)
    prompts = []
    for n, row in rows:
        where = f"{in_path}:{n}"
        ids = _encode(engine, row, chat, system, where)
        try:
            engine.check_prompt(ids)
        except TunelabError as e:
            raise DataError(f"{where}: {e}") from e
        prompts.append(ids)
    # Similar lengths together: less padding in each batch. Results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", unit="row", disable=None) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, c in zip(idx, engine.complete([prompts[i] for i in idx], config)):
                results[i] = c
            bar.update(len(idx))
    with atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for (_, row), c in zip(rows, results):
            out = dict(row)
            out.update(
                completion=c.text,
                finish_reason=c.finish_reason,
                prompt_tokens=c.num_prompt_tokens,
                completion_tokens=len(c.token_ids),
            )
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return len(rows)


def main(args: argparse.Namespace) -> int:
    from tunelab.infer.options import engine_from_args, generation_config_from_args

    if (args.prompt is None) == (args.input is None):
        raise ConfigError("give either --prompt TEXT ... or --input FILE.jsonl --output FILE.jsonl")
    if args.input and not args.output:
        raise ConfigError("--input needs --output FILE.jsonl")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.chat and not (args.prompt_type or args.hf_chat_template):
        raise ConfigError("--chat needs the template: add --prompt-type NAME or --hf-chat-template")
    engine = engine_from_args(args, max_batch_size=args.batch_size)
    config = generation_config_from_args(args, engine.defaults)
    if args.input:
        n = generate_file(
            engine, Path(args.input), Path(args.output), config, args.chat, args.system,
            args.batch_size,
        )  # fmt: skip
        print(f"tunelab generate: {n} rows -> {args.output}", file=sys.stderr)
        return 0
    prompts = [
        _encode(engine, {"prompt": p}, args.chat, args.system, "--prompt") for p in args.prompt
    ]
    for ids in prompts:
        engine.check_prompt(ids)
    if len(prompts) == 1 and not args.no_stream:
        for piece in engine.stream_text(prompts[0], config):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for i, c in enumerate(engine.complete(prompts, config)):
        if len(prompts) > 1:
            print(f"=== [{i}] {args.prompt[i]}")
        print(c.text, flush=True)
    return 0
