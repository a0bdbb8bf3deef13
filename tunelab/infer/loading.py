"""Load what inference needs: model (HF dir or training step dir, + LoRA), tokenizer, defaults.

Generation defaults and eos ids come from the model's ``generation_config.json`` when it has
one (as `transformers` does), else from ``config.json`` and the tokenizer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import CheckpointError, TunelabError
from tunelab.infer.sampling import GenerationConfig

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    model_cfg: object
    device: torch.device
    dtype: torch.dtype
    defaults: GenerationConfig
    eos_token_ids: list[int]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg) -> torch.dtype:
    """Explicit dtype, else the checkpoint's (bf16 -> fp32 on CPU, where bf16 matmuls crawl)."""
    from tunelab.model.config import normalize_dtype_name

    if isinstance(dtype, torch.dtype):
        return dtype
    name = normalize_dtype_name(dtype) or normalize_dtype_name(cfg.torch_dtype) or "float32"
    if dtype is None and device.type == "cpu" and name != "float32":
        log.info("checkpoint dtype %s -> float32 on CPU (pass --dtype to override)", name)
        name = "float32"
    return getattr(torch, name)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x]


def read_generation_defaults(model_dir: Path, cfg, tokenizer) -> tuple[GenerationConfig, list[int]]:
    """(default sampling settings, eos token ids) for ``model_dir``."""
    gen: dict = {}
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON ({e}); fix or delete the file") from e
    eos = _as_list(gen.get("eos_token_id")) or _as_list(cfg.eos_token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(int(tokenizer.eos_token_id))
    defaults = GenerationConfig()
    if gen.get("do_sample"):
        defaults = GenerationConfig(
            temperature=float(gen.get("temperature", 1.0)),
            top_p=float(gen.get("top_p", 1.0)),
            top_k=int(gen.get("top_k") or 0),
            repetition_penalty=float(gen.get("repetition_penalty", 1.0)),
        )
    elif gen.get("repetition_penalty"):
        defaults = GenerationConfig(repetition_penalty=float(gen["repetition_penalty"]))
    return defaults, eos


def _load_tokenizer(path: Path):
    # preprocess's own loader: the same directory gives the same ids in training and serving
    # (transformers picks the tokenizer class from config.json when one is present).
    from tunelab.data.preprocess import load_tokenizer

    try:
        return load_tokenizer(str(path))
    except TunelabError as e:
        raise CheckpointError(
            f"{path}: no usable tokenizer ({e}); the model directory needs tokenizer.json / "
            "tokenizer_config.json next to config.json"
        ) from e


def load_for_inference(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Loaded:
    """Build the model from an HF directory or a ``checkpoints/step-N`` directory."""
    from tunelab.model.config import ModelConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    dev = resolve_device(device)
    if (model_dir / "config.json").is_file():
        from tunelab.model.hf import load_model

        cfg = ModelConfig.from_hf(model_dir)
        torch_dtype = resolve_dtype(dtype, dev, cfg)
        model = load_model(model_dir, dtype=torch_dtype, device=dev)
        tok_dir = gen_dir = model_dir
    else:
        from tunelab.infer.step_checkpoint import load_step_checkpoint

        model, cfg, tok_dir, gen_dir = load_step_checkpoint(model_dir, dtype, dev, resolve_dtype)
        torch_dtype = next(model.parameters()).dtype
    if adapter is not None:
        from tunelab.model.lora import load_peft_adapter, merge_lora

        load_peft_adapter(model, adapter, adapter_dtype=torch_dtype)
        # Merged weights decode as fast as the base model; the adapter stays untouched on disk.
        merge_lora(model)
        model.to(dev)
    model.eval().requires_grad_(False)
    # Like merge-lora: an adapter saved with its tokenizer (fine-tuning often changes the chat
    # template) brings the tokenizer to use.
    if adapter is not None and any(
        (Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        tok_dir = Path(adapter)
        log.info("using the tokenizer saved with the adapter: %s", tok_dir)
    tokenizer = _load_tokenizer(tok_dir)
    defaults, eos = read_generation_defaults(gen_dir, cfg, tokenizer)
    return Loaded(model, tokenizer, cfg, dev, torch_dtype, defaults, eos)
