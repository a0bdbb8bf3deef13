"""`tunelab eval`: benchmark accuracy (MMLU, C-Eval, ...) or held-out perplexity of a model."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.eval.tasks import TASKS

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="HF model directory or a tunelab step-N checkpoint",
    )
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter applied on top of --model")
    p.add_argument("--task", required=True, choices=[*TASKS, "perplexity"])
    p.add_argument(
        "--data-dir",
        "--task-data-path",
        metavar="DIR",
        help="task data in its official layout (docs/eval.md)",
    )
    p.add_argument(
        "--data-path",
        metavar="PREFIX",
        help="--task perplexity: a tunelab/Megatron dataset prefix (.bin/.idx)",
    )
    p.add_argument("--shots", type=int, metavar="K", help="few-shot examples (default: per task)")
    p.add_argument(
        "--scoring", choices=["loglikelihood", "generate"], help="override the task's scoring mode"
    )
    p.add_argument(
        "--batch-size",
        "--evaluation-batch-size",
        type=int,
        default=1,
        help="questions per forward pass / prompts per generation batch (default 1)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="generation length (default: per task)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        help="tokens per sequence; longer prompts lose their start (default: the "
        "model's max_position_embeddings)",
    )
    tmpl = p.add_mutually_exclusive_group()
    tmpl.add_argument(
        "--prompt-type",
        metavar="NAME",
        help="wrap each prompt in this tunelab/MindSpeed template (fine-tuned models)",
    )
    tmpl.add_argument(
        "--hf-chat-template",
        action="store_true",
        help="wrap each prompt with the tokenizer's chat template",
    )
    p.add_argument(
        "--eval-language",
        choices=["en", "zh"],
        help="prompt language where a task has both (mmlu); default en",
    )
    p.add_argument(
        "--limit",
        "--max-eval-samples",
        type=int,
        metavar="N",
        help="score at most N questions per subject (N sequences for perplexity)",
    )
    p.add_argument(
        "--output",
        metavar="FILE.json",
        help="write every per-question prediction and the config here",
    )
    p.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="human_eval: run model-generated code (separate process, no network)",
    )
    p.add_argument(
        "--code-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="human_eval: time limit per program (default 10)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: the checkpoint's)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")


def _check(args) -> None:
    for name in ("shots", "batch_size", "max_new_tokens", "limit", "max_length"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "shots" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.task == "perplexity":
        if not args.data_path:
            raise ConfigError("--task perplexity needs --data-path PREFIX (a .bin/.idx dataset)")
        unused = [
            "eval_language",
            "data_dir",
            "shots",
            "scoring",
            "max_new_tokens",
            "prompt_type",
            "hf_chat_template",
            "allow_code_execution",
        ]
    else:
        unused = ["data_path"] + ([] if args.task == "human_eval" else ["allow_code_execution"])
    for name in unused:
        if getattr(args, name):
            log.warning("--%s has no effect with --task %s", name.replace("_", "-"), args.task)
    if args.task == "perplexity":
        return
    if not args.data_dir:
        raise ConfigError(f"--task {args.task} needs --data-dir DIR (see docs/eval.md for layouts)")
    if args.task == "human_eval":
        if not args.allow_code_execution:
            raise ConfigError(
                "human_eval runs model-generated code; refusing without --allow-code-execution "
                "(it then runs in a separate, time-limited process without network)"
            )
        if args.scoring == "loglikelihood":
            raise ConfigError("human_eval is scored by running code: use --scoring generate")


def main(args: argparse.Namespace) -> int:
    _check(args)
    if args.task == "perplexity":
        return _perplexity(args)

    from tunelab.eval.harness import EvalSettings, evaluate
    from tunelab.eval.tasks import get_task

    task = get_task(args.task)
    if args.eval_language:
        if args.eval_language not in task.languages:
            log.warning(
                "--eval-language %s has no effect with --task %s", args.eval_language, task.name
            )
        else:
            task.language = args.eval_language
    shots = task.default_shots if args.shots is None else args.shots
    subjects = task.load(Path(args.data_dir), shots)  # malformed data fails before model load
    settings = EvalSettings(
        scoring=args.scoring or task.default_scoring,
        shots=shots,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or task.default_max_new_tokens,
        limit=args.limit,
    )
    if settings.scoring == "loglikelihood":  # fail before loading the model, not midway
        for subject in subjects:
            for doc in subject.docs:
                task.choices(doc)
    if task.needs_code_execution:
        task.sandbox.allow = True
        task.sandbox.timeout_s = args.code_timeout
        print(f"code execution enabled; each program runs with: {task.sandbox.isolation}")

    engine = _engine(args)
    scorer = _scorer(engine, args)
    wrap = None
    if engine.uses_template:

        def wrap(text: str) -> tuple[int, ...]:
            return tuple(engine.encode_chat([{"role": "user", "content": text}]))

    start = time.time()
    result = evaluate(task, subjects, scorer, settings, wrap=wrap)
    result.config = {
        **_config(args),
        "scoring": settings.scoring,
        "shots": shots,
        "max_new_tokens": settings.max_new_tokens,
        "max_length": scorer.max_length,
        "language": task.language,
        "prompt_format": args.prompt_type
        or ("hf-chat-template" if args.hf_chat_template else "raw"),
        "seconds": round(time.time() - start, 3),
    }
    if task.needs_code_execution:
        result.config["sandbox"] = task.sandbox.isolation
    print(result.table())
    _write(args.output, result.to_dict())
    return 0


def _engine(args):
    from tunelab.infer.engine import Engine

    return Engine.from_pretrained(
        args.model,
        adapter=args.adapter,
        dtype=args.dtype,
        device=args.device,
        prompt_type=args.prompt_type,
        hf_chat_template=args.hf_chat_template,
        max_batch_size=args.batch_size,
    )


def _scorer(engine, args):
    from tunelab.eval.harness import LMScorer

    return LMScorer.from_engine(engine, args.max_length)


def _perplexity(args) -> int:
    from tunelab.eval.perplexity import evaluate_perplexity

    engine = _engine(args)
    start = time.time()
    result = evaluate_perplexity(
        args.data_path,
        forward=lambda ids, pos: engine.model(ids, pos),
        max_length=args.max_length or engine.context_len,
        batch_size=args.batch_size,
        limit=args.limit,
        device=engine.device,
    )
    print(result.table())
    out = {**result.__dict__, "config": {**_config(args), "seconds": round(time.time() - start, 3)}}
    _write(args.output, out)
    return 0


def _config(args) -> dict:
    keys = (
        "model",
        "adapter",
        "task",
        "data_dir",
        "data_path",
        "batch_size",
        "limit",
        "dtype",
        "device",
    )
    return {k: getattr(args, k) for k in keys}


def _write(path: str | None, obj: dict) -> None:
    if not path:
        return
    from tunelab.utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"wrote {path}")
