"""Load a training checkpoint (``{output_dir}/checkpoints/step-N/``, DCP) for inference.

The model is built from the run's HF config (on the meta device, then materialized) and only
the model's tensors are read from the DCP checkpoint; optimizer and data state are skipped.
DCP reshards on load, so a checkpoint written by any parallel layout loads in one process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunelab.errors import CheckpointError

log = logging.getLogger(__name__)

# Where the model's tensors may sit inside the checkpoint's state dict.
_PREFIXES = ("model.", "", "app.model.", "state.model.")


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


def find_hf_dir(step_dir: Path) -> Path:
    """The HF directory whose config and tokenizer describe this run's model."""
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    candidates = [step_dir, step_dir / "hf", run_dir / "hf"]
    for cfg_name in ("config.yaml", "run_config.yaml", "config.yml"):
        path = run_dir / cfg_name
        if path.is_file():
            import yaml

            run = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            model = run.get("model") or {}
            for key in ("path", "config"):
                if model.get(key):
                    p = Path(model[key])
                    candidates.append(p if p.is_dir() else p.parent)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise CheckpointError(
        f"{step_dir}: cannot find the run's HF config (looked for config.json in "
        f"{', '.join(str(c) for c in candidates)}); pass --model with the HF directory instead"
    )


def load_step_checkpoint(step_dir: Path, dtype, device: torch.device, resolve_dtype):
    """Returns (model, ModelConfig, hf_dir for tokenizer and generation config)."""
    import torch.distributed.checkpoint as dcp

    from tunelab.model.config import ModelConfig
    from tunelab.model.transformer import Transformer

    step_dir = Path(step_dir)
    keys = _checkpoint_keys(step_dir)
    hf_dir = find_hf_dir(step_dir)
    cfg = ModelConfig.from_hf(hf_dir)
    torch_dtype = resolve_dtype(dtype, device, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    # named_parameters lists a tied lm_head once, under the embedding's name
    params = dict(model.named_parameters())
    names = list(params)
    prefix = next((p for p in _PREFIXES if all(p + n in keys for n in names)), None)
    if prefix is None:
        lora = sorted(k for k in keys if ".lora_A." in k or ".lora_B." in k)
        hint = (
            " It holds LoRA weights only: serve the run's exported adapter with --model BASE "
            "--adapter OUTPUT_DIR/hf/adapter (or merge-lora)."
            if lora
            else ""
        )
        missing = [n for n in names if "model." + n not in keys][:3]
        raise CheckpointError(
            f"{step_dir}: the checkpoint does not hold this model's weights (e.g. missing "
            f"{missing}).{hint}"
        )
    state = {prefix + n: t for n, t in params.items()}
    dcp.load(state, checkpoint_id=str(step_dir))
    model = model.to(torch_dtype)
    model.tie_weights()
    log.info("loaded %s from checkpoint %s (config from %s)", cfg.model_type, step_dir, hf_dir)
    return model, cfg, hf_dir
