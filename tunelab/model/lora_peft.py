"""PEFT adapter directories: write them (``peft`` loads them onto the ``transformers`` model),
read them (ours or trained with ``peft``), and merge them into plain state dicts.

Part of :mod:`tunelab.model.lora`, which re-exports everything public here; import from there.
File layout: ``adapter_config.json`` (peft's ``LoraConfig`` fields) and
``adapter_model.safetensors`` with keys ``base_model.model.<our name>.lora_{A,B}.weight``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import CheckpointError, ConfigError
from tunelab.model.lora import (
    LoraLinear,
    LoraSpec,
    apply_lora,
    describe_linear_layers,
    linear_layer_names,
    lora_delta,
    lora_layers,
    lora_scaling,
    lora_state_dict,
)
from tunelab.utils import atomic_path

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """Short leaf names when they select exactly ``names``; an exact alternation otherwise."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    by_leaf = [n for n in linear_layer_names(model) if n.rsplit(".", 1)[-1] in leaves]
    by_leaf += [n for n in lora_layers(model) if n.rsplit(".", 1)[-1] in leaves]
    if sorted(set(by_leaf)) == sorted(names):
        return leaves
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def peft_config_dict(
    spec: LoraSpec,
    target_modules: list[str] | str,
    base_model_name_or_path: str | None,
    layers: dict[str, LoraLinear] | None = None,
) -> dict:
    """An ``adapter_config.json`` body that ``peft`` reads as a LoraConfig."""
    rank_pattern: dict[str, int] = dict(spec.rank_pattern)
    alpha_pattern: dict[str, float] = dict(spec.alpha_pattern)
    for name, layer in (layers or {}).items():
        if layer.r != spec.r:
            rank_pattern[re.escape(name)] = layer.r
        if layer.alpha != float(spec.alpha):
            alpha_pattern[re.escape(name)] = layer.alpha
    alpha = spec.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_modules,
        "use_rslora": spec.use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def write_peft_adapter(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically.

    ``state_dict`` holds our names (``...q_proj.lora_A.weight``), already gathered.
    ``out_dir`` is replaced as a whole. With ``tokenizer_dir`` its tokenizer files and chat
    template are copied in too (as LLaMA-Factory does), so the adapter carries the template
    it was trained with and ``merge-lora`` picks it up.
    """
    from safetensors.torch import save_file

    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            from tunelab.model.hf import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_dir, tmp)
    logger.info("wrote PEFT adapter (%d tensors) to %s", len(tensors), out_dir)
    return out_dir


def save_peft_adapter(
    model: nn.Module,
    spec: LoraSpec,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Save the model's adapters as a PEFT adapter directory (atomic; see
    :func:`write_peft_adapter`). One process only: on several ranks call
    :func:`lora_state_dict` on every rank (it gathers) and ``write_peft_adapter`` on rank 0."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("save_peft_adapter: the model has no LoRA layers (apply_lora first)")
    names = list(layers)
    config = peft_config_dict(
        spec, peft_target_modules(model, names), base_model_name_or_path, layers
    )
    return write_peft_adapter(lora_state_dict(model), config, out_dir, tokenizer_dir)


@dataclass
class LoraAdapter:
    """An adapter read from disk: per module (our name) its A [r, in], B [out, r], scaling."""

    path: Path
    config: dict
    spec: LoraSpec
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @classmethod
    def load(cls, adapter_dir: str | Path) -> LoraAdapter:
        adapter_dir = Path(adapter_dir)
        cfg_path = adapter_dir / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter dir")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from e
        spec = _spec_from_peft(config, cfg_path)
        tensors = _read_adapter_tensors(adapter_dir)
        return cls(adapter_dir, config, spec, _pair_weights(tensors, spec, adapter_dir))


def _spec_from_peft(config: dict, where: Path) -> LoraSpec:
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": config.get("use_dora"),
        "modules_to_save": config.get("modules_to_save"),
        "lora_bias": config.get("lora_bias"),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "layer_replication": config.get("layer_replication"),
    }
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    bad = {k: v for k, v in unsupported.items() if v}
    if bad:
        raise CheckpointError(
            f"{where}: unsupported adapter options {bad}; tunelab loads plain LoRA adapters "
            "(no DoRA, no modules_to_save, bias 'none')"
        )
    try:
        return LoraSpec(
            r=int(config["r"]),
            alpha=float(config.get("lora_alpha", config["r"])),
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=config.get("target_modules") or "all-linear",
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad LoRA config ({e!r})") from e


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st, binf = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_WEIGHTS_BIN
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if binf.is_file():
        return torch.load(str(binf), map_location="cpu", weights_only=True)
    raise CheckpointError(f"{adapter_dir}: neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}")


_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pair_weights(
    tensors: dict[str, torch.Tensor], spec: LoraSpec, where: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = _KEY_RE.match(name)
        if not m:
            raise CheckpointError(
                f"{where}: unexpected tensor {key!r} in the adapter (only lora_A / lora_B "
                "weights of linear layers are supported)"
            )
        halves.setdefault(m["module"], {})[m["ab"]] = t
    out = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(f"{where}: {module}.{missing}.weight is missing")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{where}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "do not form a rank-r pair"
            )
        r = a.shape[0]
        _, alpha = spec.rank_alpha(module)
        out[module] = (a, b, lora_scaling(r, alpha, spec.use_rslora))
    if not out:
        raise CheckpointError(f"{where}: the adapter holds no LoRA weights")
    return out


@torch.no_grad()
def load_peft_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
    base_dtype: torch.dtype | None = None,
) -> LoraSpec:
    """Load a PEFT LoRA adapter (ours or peft's) into ``model``; returns its spec.

    Without LoRA layers, wraps exactly the modules the adapter has weights for (ranks from the
    tensors, alphas from its config); with LoRA already applied (continuing a run), the
    adapted modules and shapes must match. Mismatch -> CheckpointError naming the key.
    """
    adapter = LoraAdapter.load(adapter_dir)
    layers = lora_layers(model)
    if not layers:
        available = set(linear_layer_names(model))
        for name in adapter.weights:
            if name not in available:
                raise CheckpointError(
                    f"{adapter.path}: adapter key {PEFT_PREFIX}{name}.lora_A.weight names no "
                    f"linear layer of this model; {describe_linear_layers(sorted(available))}"
                )
        # Ranks per module come from the tensors (they are what peft's rank_pattern produced).
        ranks = {n: a.shape[0] for n, (a, _, _) in adapter.weights.items()}
        spec = adapter.spec
        pattern = {re.escape(n): r for n, r in ranks.items() if r != spec.r}
        spec_for_apply = LoraSpec(
            r=spec.r,
            alpha=spec.alpha,
            dropout=spec.dropout,
            target_modules=spec.target_modules,
            use_rslora=spec.use_rslora,
            # the exact per-module ranks first: the first matching pattern wins
            rank_pattern={
                **pattern,
                **{k: v for k, v in spec.rank_pattern.items() if k not in pattern},
            },
            alpha_pattern=spec.alpha_pattern,
        )
        order = [n for n in linear_layer_names(model) if n in adapter.weights]
        apply_lora(
            model, spec_for_apply, adapter_dtype=adapter_dtype, base_dtype=base_dtype, targets=order
        )
        layers = lora_layers(model)
    for name in layers:
        if name not in adapter.weights:
            raise CheckpointError(
                f"{adapter.path}: no {PEFT_PREFIX}{name}.lora_A.weight for the model's LoRA layer "
                f"{name}; the adapter was trained on other target modules"
            )
    for name, (a, b, scaling) in adapter.weights.items():
        layer = layers.get(name)
        if layer is None:
            raise CheckpointError(
                f"{adapter.path}: adapter key {PEFT_PREFIX}{name}.lora_A.weight has no LoRA layer "
                "in the model; set lora.target_modules to the adapter's targets"
            )
        for key, src, dst in (
            ("lora_A", a, layer.lora_A.weight),
            ("lora_B", b, layer.lora_B.weight),
        ):
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(
                    f"{adapter.path}: {PEFT_PREFIX}{name}.{key}.weight has shape "
                    f"{tuple(src.shape)}, the model expects {tuple(dst.shape)} (check lora.r and "
                    "that the adapter belongs to this base model)"
                )
            _copy_into(dst, src)
        if not math.isclose(layer.scaling, scaling, rel_tol=1e-6):
            raise CheckpointError(
                f"{adapter.path}: {name}: adapter scaling {scaling:g} (alpha/r from its config) "
                f"differs from the model's {layer.scaling:g}; set lora.alpha / lora.use_rslora "
                "to the adapter's"
            )
    logger.info("loaded LoRA adapter %s (%d layers)", adapter.path, len(adapter.weights))
    return adapter.spec


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    src = src.to(dst.dtype)
    if hasattr(dst, "device_mesh"):  # DTensor: shard the full tensor the way dst is sharded
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)
    dst.copy_(src.to(dst.device))


@torch.no_grad()
def merge_adapter_into_state_dict(
    state_dict: dict[str, torch.Tensor],
    adapter: str | Path | LoraAdapter,
    *,
    merged: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` (HF names, any subset: one shard) with every adapter whose
    ``<module>.weight`` it holds folded in, each weight keeping its dtype.

    Names merged are added to ``merged`` so callers going shard by shard can check that every
    adapter module was found. Non-float or mis-shaped base weights -> CheckpointError.
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = LoraAdapter.load(adapter)
    out = dict(state_dict)
    for name, (a, b, scaling) in adapter.weights.items():
        key = f"{name}.weight"
        w = state_dict.get(key)
        if w is None:
            continue
        if not w.is_floating_point() or w.element_size() < 2:
            raise CheckpointError(
                f"base weight {key} has dtype {w.dtype}: a quantized base cannot be merged; "
                "merge into the unquantized model and quantize afterwards"
            )
        expected = (b.shape[0], a.shape[1])
        if tuple(w.shape) != expected:
            raise CheckpointError(
                f"base weight {key} has shape {tuple(w.shape)} but the adapter's lora_B @ lora_A "
                f"is {expected} (adapter {adapter.path}); the adapter belongs to another model"
            )
        out[key] = (w.float() + lora_delta(a, b, scaling).to(w.device)).to(w.dtype)
        if merged is not None:
            merged.add(name)
    return out
