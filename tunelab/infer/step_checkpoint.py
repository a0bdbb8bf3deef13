"""Load a training checkpoint (``{output_dir}/checkpoints/step-N/``, DCP) for inference.

The run's config (``meta.json`` in the step directory, written by the trainer, else the run's
``config.yaml``) names the model: ``model.path`` (fine-tuning) or ``model.config`` (random
init), and the tokenizer (``data.tokenizer``, else ``model.path``). The model is built from
that config and only its tensors (``model.*`` keys) are read; optimizer and data state are
skipped. DCP reshards on load, so a checkpoint from any parallel layout loads in one process.
A LoRA run checkpoints only the adapter: the base weights come from ``model.path``, the
adapter (shapes and scaling from the run's ``lora`` section) from the checkpoint, and it is
merged for decoding.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import CheckpointError

log = logging.getLogger(__name__)

PREFIX = "model."  # the trainer saves {"model": state_dict, "optimizer": ..., ...}


@dataclass
class RunInfo:
    config_dir: Path  # holds config.json
    weights_dir: Path | None  # HF weights of the base (model.path), None for random init
    tokenizer_dir: Path
    lora: dict | None  # the run's lora section when lora.r > 0


def _checkpoint_keys(step_dir: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - DCP raises several types for a bad directory
        raise CheckpointError(
            f"{step_dir}: not a readable DCP checkpoint ({e}); pass an HF directory or a "
            "complete checkpoints/step-N directory"
        ) from e
    return set(meta.state_dict_metadata)


def _run_config(step_dir: Path) -> dict:
    meta = step_dir / "meta.json"
    if meta.is_file():
        cfg = json.loads(meta.read_text(encoding="utf-8")).get("config")
        if cfg:
            return cfg
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raise CheckpointError(
        f"{step_dir}: no meta.json with the run config and no {path}; pass --model with the "
        "run's exported HF directory (OUTPUT_DIR/hf) instead"
    )


def run_info(step_dir: Path) -> RunInfo:
    cfg = _run_config(step_dir)
    model, data, lora = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("lora") or {}
    weights = Path(model["path"]) if model.get("path") else None
    if weights is not None:
        config_dir = weights
    elif model.get("config"):
        c = Path(model["config"])
        config_dir = c if c.is_dir() else c.parent
    else:
        raise CheckpointError(
            f"{step_dir}: the run config names neither model.path nor model.config"
        )
    if not (config_dir / "config.json").is_file():
        raise CheckpointError(
            f"{step_dir}: the run's model config {config_dir / 'config.json'} is missing (moved "
            "since training?); pass --model with the exported HF directory instead"
        )
    tok = Path(data.get("tokenizer") or weights or config_dir)
    return RunInfo(config_dir, weights, tok, lora if int(lora.get("r") or 0) > 0 else None)


def _load_dcp(state: dict, step_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, checkpoint_id=str(step_dir))
        except Exception as e:  # noqa: BLE001 - DCP raises bare RuntimeErrors
            raise CheckpointError(f"{step_dir}: cannot read the model from it ({e})") from e


def load_step_checkpoint(step_dir: Path, dtype, device: torch.device, resolve_dtype):
    """Returns (model, ModelConfig, tokenizer_dir, generation_config_dir)."""
    from tunelab.model.config import ModelConfig

    step_dir = Path(step_dir)
    keys = _checkpoint_keys(step_dir)
    info = run_info(step_dir)
    cfg = ModelConfig.from_hf(info.config_dir)
    torch_dtype = resolve_dtype(dtype, device, cfg)
    if info.lora is not None:
        model = _load_lora_run(step_dir, keys, info, torch_dtype, device)
    else:
        model = _load_full_run(step_dir, keys, cfg, torch_dtype, device)
    log.info("loaded %s from checkpoint %s (config %s)", cfg.model_type, step_dir, info.config_dir)
    return model, cfg, info.tokenizer_dir, info.config_dir


def _load_full_run(step_dir, keys, cfg, torch_dtype, device):
    from tunelab.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    # named_parameters lists a tied lm_head once, under the embedding's name
    params = dict(model.named_parameters())
    missing = [n for n in params if PREFIX + n not in keys]
    if missing:
        raise CheckpointError(
            f"{step_dir}: the checkpoint lacks model weights such as {missing[:3]}; it was "
            "written for another model (check the run config)"
        )
    _load_dcp({PREFIX + n: t for n, t in params.items()}, step_dir)
    model = model.to(torch_dtype)
    model.tie_weights()
    return model


def _load_lora_run(step_dir, keys, info: RunInfo, torch_dtype, device):
    from tunelab.model.hf import load_model
    from tunelab.model.lora import LoraSpec, apply_lora, merge_lora, trainable_state_dict

    if info.weights_dir is None:
        raise CheckpointError(f"{step_dir}: a LoRA run needs model.path (the base weights)")
    model = load_model(info.weights_dir, dtype=torch_dtype, device=device)
    lora = info.lora
    spec = LoraSpec(
        r=int(lora["r"]),
        alpha=float(lora.get("alpha", 32.0)),
        dropout=0.0,
        target_modules=lora.get("target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"],
        use_rslora=bool(lora.get("use_rslora", False)),
    )
    apply_lora(model, spec)
    adapter = trainable_state_dict(model)  # the LoRA parameters themselves: loaded in place
    missing = [n for n in adapter if PREFIX + n not in keys]
    if missing:
        raise CheckpointError(
            f"{step_dir}: the checkpoint lacks LoRA weights such as {missing[:3]} for the "
            "run's lora section"
        )
    _load_dcp({PREFIX + n: t for n, t in adapter.items()}, step_dir)
    merge_lora(model)
    return model
