"""LoRA: low-rank adapters on ``nn.Linear`` layers, PEFT-compatible files, merging.

A wrapped layer keeps its base parameters under their original names and adds two plain
``nn.Linear`` submodules, so a LoRA model's state dict reads::

    model.layers.0.self_attn.q_proj.weight           base, frozen   [out, in]
    model.layers.0.self_attn.q_proj.lora_A.weight    trainable      [r, in]
    model.layers.0.self_attn.q_proj.lora_B.weight    trainable      [out, r]

and ``y = x W^T + b + scaling * B(A(dropout(x)))`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). A is Kaiming-uniform initialised and B is zero, as in
``peft``, so a fresh adapter leaves the model's outputs unchanged. The adapter branch runs
in the adapters' dtype (fp32 by default) even when the frozen base is bf16.

PEFT adapter files use ``base_model.model.`` + our names (our names are the Hugging Face
names), so ``peft.PeftModel.from_pretrained`` loads them onto the ``transformers`` model and
adapters trained with ``peft`` load here.

Notes for parallelism (apply LoRA *before* TP / FSDP / activation checkpointing / compile, so
module names carry no wrapper prefixes):

* Tensor parallel: derive the adapter's placements from the base layer's.
  Colwise base (q/k/v, gate/up; weight ``Shard(0)``, input replicated, output ``Shard(-1)``):
  ``lora_A.weight`` is replicated and ``lora_B.weight`` is ``Shard(0)`` (sharded on the out
  dim), so ``B(A(x))`` comes out ``Shard(-1)`` like the base output and no extra
  communication is needed. Rowwise base (o, down; weight ``Shard(1)``, input ``Shard(-1)``,
  output partial then all-reduced): ``lora_A.weight`` is ``Shard(1)`` (sharded on the in dim)
  and ``lora_B.weight`` is replicated; ``A(x)`` is then a partial sum, ``B`` keeps it partial,
  and it is reduced together with the base output in the layer's one all-reduce.
  ``LoraLinear`` subclasses ``nn.Linear`` (so the stock styles accept it), but torch's
  ``ColwiseParallel`` partitions *all* ``named_parameters()`` of the module (recursing into
  ``lora_A`` / ``lora_B``), so subclass the styles and override ``_partition_linear_fn``:
  ``distribute_module`` calls it once per submodule; on the layer itself (``name == ""``)
  register ``weight`` / ``bias`` as the stock style does and set ``lora_A.weight`` /
  ``lora_B.weight`` to ``nn.Parameter(distribute_tensor(w, mesh, [placement]))`` as above;
  return early for the children (``name`` is ``"lora_A"`` etc.). Checked on 2 gloo ranks
  (up_proj colwise + down_proj rowwise, 3 SGD steps): losses identical to one process,
  adapter weights within 1.5e-8.
  Dropout on a sharded rowwise input draws a different mask than one process would.
* FSDP2: ``fully_shard`` per block (then the root) works with the frozen base and trainable
  adapters in the same group, also with a bf16 base and fp32 adapters and no
  ``MixedPrecisionPolicy`` (torch 2.13; checked on 2 gloo ranks, half batch each, 3 AdamW
  steps: adapters within 3e-8 of one process, base bit-identical).
* ``lora_state_dict`` gathers DTensors with ``full_tensor()`` (a collective: call it on every
  rank), and ``write_peft_adapter`` writes an already-gathered state dict, so only rank 0
  needs to write.
* Checkpoints of a LoRA run only need ``trainable_state_dict`` (the adapters).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import CheckpointError, ConfigError
from tunelab.utils import atomic_path

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = ("all-linear", "all")
# Never adapted: the output projection is used through its weight by the chunked loss, and
# with tied embeddings it is the embedding matrix.
EXCLUDED = ("lm_head",)

# Names users bring from MindSpeed (mcore), Megatron legacy and MindFormers -> our leaf names.
NAME_ALIASES: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "dense": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "dense_h_to_4h": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
    "dense_4h_to_h": ("down_proj",),
    "wq": ("q_proj",),
    "wk": ("k_proj",),
    "wv": ("v_proj",),
    "wo": ("o_proj",),
    "w1": ("gate_proj",),
    "w2": ("down_proj",),
    "w3": ("up_proj",),
}
# Our "<parent>.<leaf>" -> the same layer's names in other frameworks, so a regex written for
# them (MindFormers ".*wq|.*wk", MindSpeed ".*linear_qkv") matches our layers.
_FOREIGN_SUFFIXES: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": (
        "attention.wq",
        "self_attention.linear_qkv",
        "self_attention.query_key_value",
    ),
    "self_attn.k_proj": (
        "attention.wk",
        "self_attention.linear_qkv",
        "self_attention.query_key_value",
    ),
    "self_attn.v_proj": (
        "attention.wv",
        "self_attention.linear_qkv",
        "self_attention.query_key_value",
    ),
    "self_attn.o_proj": ("attention.wo", "self_attention.linear_proj", "self_attention.dense"),
    "mlp.gate_proj": ("feed_forward.w1", "mlp.linear_fc1", "mlp.dense_h_to_4h"),
    "mlp.up_proj": ("feed_forward.w3", "mlp.linear_fc1", "mlp.dense_h_to_4h"),
    "mlp.down_proj": ("feed_forward.w2", "mlp.linear_fc2", "mlp.dense_4h_to_h"),
}
_REGEX_CHARS = set("*+?|()[]{}^$\\")


@dataclass
class LoraSpec:
    """What to adapt and how. ``alpha`` scales the update by ``alpha / r``.

    ``target_modules``: a list of names (HF ``q_proj``..``down_proj``, MindSpeed
    ``linear_qkv linear_proj linear_fc1 linear_fc2``, Megatron legacy or MindFormers ``wq``..``w3``
    names; a dotted suffix such as ``self_attn.q_proj`` or a full module name also works), a
    regex matched against full module names (``.*wq|.*wk|.*wv|.*wo``), ``all-linear``, or one
    string of names separated by spaces or commas.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    # Per-module overrides as peft writes them: {pattern: r} / {pattern: alpha}, where a
    # pattern matches a module whose name ends with it (peft's rule).
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if not self.alpha or float(self.alpha) <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError(
                "lora.target_modules is empty; name layers (e.g. q_proj v_proj) or use 'all-linear'"
            )

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """The (r, alpha) of module ``name``, after rank_pattern / alpha_pattern."""
        return (
            int(_pattern_value(self.rank_pattern, name, self.r)),
            float(_pattern_value(self.alpha_pattern, name, self.alpha)),
        )


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update; built from an existing layer, sharing its
    ``weight`` / ``bias`` parameters (so optimizers and tied references stay valid)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        dtype = adapter_dtype or base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.alpha, use_rslora)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """peft's default init: A like ``nn.Linear`` (Kaiming uniform, a=sqrt(5)), B zero."""
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape [out, in]."""
        return _delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, rslora={self.use_rslora}"


def _delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return (b.float() @ a.float()) * scaling


# --------------------------------------------------------------------------- targets


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the plain ``nn.Linear`` layers LoRA could wrap (not adapters themselves)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) or name.endswith((".lora_A", ".lora_B")):
            continue
        if isinstance(module, nn.Linear):
            names.append(name)
    return names


def _is_regex(target: str) -> bool:
    return any(c in _REGEX_CHARS for c in target)


def _split_targets(target_modules) -> list[str]:
    if isinstance(target_modules, str):
        if _is_regex(target_modules):
            return [target_modules]
        return [t for t in re.split(r"[,\s]+", target_modules) if t]
    return [str(t) for t in target_modules]


def _foreign_names(name: str) -> list[str]:
    out = [name]
    for ours, theirs in _FOREIGN_SUFFIXES.items():
        if name == ours or name.endswith("." + ours):
            stem = name[: len(name) - len(ours)]
            for suffix in theirs:
                out.append(stem + suffix)
                # MindSpeed / Megatron put layers under decoder.layers.
                out.append(stem.replace("model.layers.", "decoder.layers.", 1) + suffix)
    return out


def _name_matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def _describe_linear_layers(names: Sequence[str]) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    example = next((n for n in names if n.rsplit(".", 1)[-1] not in EXCLUDED), None)
    text = "linear layers in this model: " + (", ".join(leaves) if leaves else "(none)")
    if example:
        text += f" (full names look like {example!r})"
    return text


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """The full names of the linear layers ``target_modules`` selects (in model order).

    Every name or regex must select at least one layer; otherwise ConfigError lists the
    model's linear layers.
    """
    linear = linear_layer_names(model)
    candidates = [n for n in linear if n.rsplit(".", 1)[-1] not in EXCLUDED]
    targets = _split_targets(target_modules)
    if not targets:
        raise ConfigError("lora.target_modules is empty; " + _describe_linear_layers(linear))
    hint = (
        "Use HF names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj), MindSpeed names "
        "(linear_qkv linear_proj linear_fc1 linear_fc2), a regex over full names "
        "(e.g. '.*q_proj|.*v_proj'), or 'all-linear'."
    )
    selected: set[str] = set()
    for target in targets:
        if target.lower() in ALL_LINEAR:
            hits = set(candidates)
        elif _is_regex(target):
            try:
                pattern = re.compile(target)
            except re.error as e:
                raise ConfigError(f"lora.target_modules: invalid regex {target!r}: {e}") from e
            hits = {n for n in candidates if any(pattern.fullmatch(f) for f in _foreign_names(n))}
            skipped = [n for n in linear if n not in candidates and pattern.fullmatch(n)]
            if skipped:
                logger.warning(
                    "LoRA target regex %r also matches %s; not adapted (unsupported)",
                    target,
                    ", ".join(skipped),
                )
        else:
            if target.rsplit(".", 1)[-1] in EXCLUDED:
                raise ConfigError(
                    f"lora.target_modules: LoRA on {target!r} is not supported (the output "
                    f"projection is shared with the loss and, when tied, with the embeddings). "
                    + hint
                )
            hits = {n for n in candidates if _name_matches(target, n)}
            if not hits and target in NAME_ALIASES:
                hits = {
                    n for n in candidates if any(_name_matches(t, n) for t in NAME_ALIASES[target])
                }
        if not hits:
            raise ConfigError(
                f"lora.target_modules: {target!r} matches no linear layer; "
                f"{_describe_linear_layers(linear)}. {hint}"
            )
        selected |= hits
    return [n for n in candidates if n in selected]


# --------------------------------------------------------------------------- apply / merge


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


# Prefixes that wrappers (activation checkpointing, torch.compile, FSDP1) insert into module
# names; adapters are saved under the plain names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """``{name: LoraLinear}``, names without wrapper prefixes (the HF / PEFT names)."""
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(
    model: nn.Module,
    spec: LoraSpec,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
    base_dtype: torch.dtype | None = None,
    targets: Iterable[str] | None = None,
) -> list[str]:
    """Wrap the linear layers ``spec`` selects, in place; freeze every other parameter.

    Returns the wrapped module names. ``adapter_dtype`` is the adapters' dtype (None: the base
    layer's); ``base_dtype`` casts the frozen parameters (e.g. bf16 base, fp32 adapters).
    ``targets`` (full names) overrides ``spec.target_modules``; used to load peft adapters.
    Call it before any parallel wrapping.
    """
    if lora_layers(model):
        raise ConfigError("LoRA is already applied to this model; apply it once")
    names = list(targets) if targets is not None else resolve_targets(model, spec.target_modules)
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRA target {name!r} is a {type(base).__name__}, not nn.Linear")
        r, alpha = spec.rank_alpha(name)
        layer = LoraLinear(base, r, alpha, spec.dropout, spec.use_rslora, adapter_dtype)
        layer.train(base.training)
        _set_submodule(model, name, layer)
    for pname, p in model.named_parameters():
        is_adapter = ".lora_A." in pname or ".lora_B." in pname
        p.requires_grad_(is_adapter)
        if not is_adapter and base_dtype is not None and p.is_floating_point():
            p.data = p.data.to(base_dtype)
    num_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_all = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA on %d layers (r=%d, alpha=%g): %d trainable of %d parameters (%.3f%%)",
        len(names),
        spec.r,
        spec.alpha,
        num_train,
        num_all,
        100 * num_train / num_all,
    )
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (in the weight's dtype), in place, and replace
    the wrapped layers by plain ``nn.Linear``s; returns the merged names."""
    merged = []
    raw = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name, layer in raw:
        w = layer.weight
        w.copy_((w.float() + layer.delta_weight().to(w.device)).to(w.dtype))
        plain = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
        )
        plain.weight = layer.weight
        plain.bias = layer.bias
        plain.train(layer.training)
        _set_submodule(model, name, plain)
        merged.append(clean_name(name))
    return merged


def _full(t: torch.Tensor) -> torch.Tensor:
    # DTensor (TP / FSDP2) -> the whole tensor; duck-typed so model/ needs no distributed import.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{our name: tensor}`` of every adapter weight, full (gathered) and detached."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = _full(layer.lora_A.weight).detach()
        out[f"{name}.lora_B.weight"] = _full(layer.lora_B.weight).detach()
    return out


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (with LoRA: the adapters), unGathered, for checkpoints."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- PEFT files


def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
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
    state_dict: dict[str, torch.Tensor], config: dict, out_dir: str | Path
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically.

    ``state_dict`` holds our names (``...q_proj.lora_A.weight``), already gathered.
    """
    from safetensors.torch import save_file

    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote PEFT adapter (%d tensors) to %s", len(tensors), out_dir)
    return out_dir


def save_peft_adapter(
    model: nn.Module,
    spec: LoraSpec,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Save the model's adapters as a PEFT adapter directory (atomic)."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("save_peft_adapter: the model has no LoRA layers (apply_lora first)")
    names = list(layers)
    config = peft_config_dict(
        spec, _peft_target_modules(model, names), base_model_name_or_path, layers
    )
    return write_peft_adapter(lora_state_dict(model), config, out_dir)


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
                    f"linear layer of this model; {_describe_linear_layers(sorted(available))}"
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
        out[key] = (w.float() + _delta(a, b, scaling).to(w.device)).to(w.dtype)
        if merged is not None:
            merged.add(name)
    return out
