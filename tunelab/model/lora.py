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

PEFT adapter files (written and read in ``lora_peft.py``, re-exported here) use
``base_model.model.`` + our names (which are the Hugging Face names), so
``peft.PeftModel.from_pretrained`` loads them onto the ``transformers`` model and adapters
trained with ``peft`` load here.

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

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)

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
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, rslora={self.use_rslora}"


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
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


def describe_linear_layers(names: Sequence[str]) -> str:
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
        raise ConfigError("lora.target_modules is empty; " + describe_linear_layers(linear))
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
                f"{describe_linear_layers(linear)}. {hint}"
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


# The PEFT file functions live in lora_peft.py (which imports this module); they are served
# from here lazily so `from tunelab.model.lora import save_peft_adapter` works without a cycle.
_PEFT_API = (
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "LoraAdapter",
    "load_peft_adapter",
    "merge_adapter_into_state_dict",
    "peft_config_dict",
    "save_peft_adapter",
    "write_peft_adapter",
)


__all__ = [
    "ALL_LINEAR",
    "NAME_ALIASES",
    "LoraLinear",
    "LoraSpec",
    "apply_lora",
    "clean_name",
    "linear_layer_names",
    "lora_layers",
    "lora_scaling",
    "lora_state_dict",
    "merge_lora",
    "resolve_targets",
    "trainable_state_dict",
    *_PEFT_API,
]


def __getattr__(name: str):
    if name in _PEFT_API:
        from tunelab.model import lora_peft

        return getattr(lora_peft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
