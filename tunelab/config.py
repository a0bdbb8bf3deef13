"""Run configuration: dataclass sections, YAML loading, command-line overrides, validation.

A run config is one YAML file with the sections ``model``, ``data``, ``train``, ``optim``,
``parallel``, ``lora``, ``checkpoint`` and ``logging``. Any key can be overridden on the
command line as ``--section.key=value`` (or ``--section.key value``). Megatron / MindSpeed
argument names (``micro_batch_size``, ``lr_warmup_fraction``, ``tensor_model_parallel_size``,
``lora_r``, ...) are accepted as aliases, at the top level of the YAML file, inside their
section, or as ``--micro-batch-size 4`` on the command line. Unknown keys, wrong types and
impossible combinations raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)


def _choices(*values: str, doc: str = "") -> Any:
    return {"choices": values, "doc": doc}


@dataclass
class ModelSection:
    """Which model to train: an HF directory to start from, or a config to initialize."""

    path: str | None = None  # HF directory (config.json + safetensors) to fine-tune / continue
    config: str | None = None  # HF config.json (or its directory): random init, for pretraining
    attn_backend: str = field(default="sdpa", metadata=_choices("sdpa", "flex", "flash"))
    init_std: float | None = None  # std of random init (default: the config's initializer_range)
    export_dtype: str = field(
        default="auto", metadata=_choices("auto", "float32", "bfloat16", "float16")
    )


@dataclass
class DataSection:
    """Training data: Megatron .bin/.idx prefixes written by `tunelab preprocess`."""

    mode: str = field(default="sft", metadata=_choices("pretrain", "sft"))
    # One prefix, or a blend "0.5 a 0.5 b" / [0.5, a, 0.5, b]. Pretrain prefixes name the
    # `{prefix}_text_document` files (with or without that suffix); SFT prefixes are given
    # without `_packed_*` as in MindSpeed.
    path: list[str] = field(default_factory=list)
    eval_path: list[str] = field(default_factory=list)  # separate eval data (else the split)
    split: str = "100,0,0"  # train,valid,test weights over documents (Megatron's --split)
    seq_length: int = 2048
    tokenizer: str | None = None  # HF tokenizer directory (default: model.path)
    packed: str = field(default="auto", metadata=_choices("auto", "true", "false"))
    pad_to_multiple_of: int | None = None  # non-packed SFT: default seq_length (8 if variable)
    variable_seq_lengths: bool = False  # non-packed SFT: pad each batch only to its longest row
    # restart positions / attention after each EOS (pretrain; plain-packed SFT rows)
    reset_position_ids: bool = False
    shuffle: bool = True
    pad_token_id: int | None = None  # default: the tokenizer's pad token, else 0


@dataclass
class TrainSection:
    """The loop: steps, batch sizes, precision, seed, evaluation, output directory."""

    output_dir: str = "runs/tunelab"
    steps: int = 1000
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # default: micro_batch_size x data-parallel size
    seed: int = 1234
    precision: str = field(default="fp32", metadata=_choices("fp32", "bf16-mixed", "bf16"))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_interval: int = 0  # evaluate every N steps (0: never)
    eval_iters: int = 0  # micro-batches per evaluation (0: the whole eval split)
    nan_policy: str = field(default="stop", metadata=_choices("stop", "skip"))
    max_skipped_steps: int = 10  # with nan_policy=skip: stop after this many in a row


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule."""

    name: str = field(default="adamw", metadata=_choices("adamw"))
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    schedule: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant"))
    warmup_steps: int | None = None
    warmup_fraction: float | None = None  # of train.steps (Megatron's lr_warmup_fraction)
    decay_steps: int | None = None  # default: train.steps
    fused: str = field(default="auto", metadata=_choices("auto", "true", "false"))


@dataclass
class ParallelSection:
    """Parallel layout under torchrun; on one process everything is 1."""

    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever is left of the world size
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = True  # with tp > 1: shard norms / dropout along the sequence
    num_layer_list: list[int] | None = None  # uneven pipeline split, e.g. [16, 16]
    virtual_stages: int = 1  # pipeline stages per rank (interleaved schedule when > 1)
    # 1F1B, GPipe, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble; None picks 1F1B, or
    # Interleaved1F1B when virtual_stages > 1
    pp_schedule: str | None = None
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block
    param_dtype: str | None = None  # FSDP compute dtype (default: from train.precision)
    reduce_dtype: str | None = None  # FSDP gradient-reduction dtype (default float32)
    reshard_after_forward: bool | None = None  # FSDP: free gathered params after forward


@dataclass
class LoraSection:
    """LoRA adapters (enabled when r > 0)."""

    r: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    use_rslora: bool = False
    load: str | None = None  # PEFT adapter directory to start from
    base_dtype: str | None = None  # keep frozen base weights in this dtype (e.g. bfloat16)


@dataclass
class CheckpointSection:
    """Resumable checkpoints under {output_dir}/checkpoints/step-N/ and the final export."""

    interval: int = 0  # save every N steps (0: only at the end and on a signal)
    keep_last: int = 3  # keep the newest k step checkpoints (0: keep all)
    resume: str = "auto"  # auto (newest complete) | never | a step-N directory
    save_final: bool = True  # checkpoint after the last step
    export_hf: bool | None = None  # write {output_dir}/hf/ (default: yes, LoRA runs: no)


@dataclass
class LoggingSection:
    """Progress display and metric sinks."""

    interval: int = 1  # log every N steps
    progress: str = field(default="auto", metadata=_choices("auto", "bar", "line", "none"))
    tensorboard: bool | None = None  # default: when the tensorboard package is installed
    plot: bool = True  # loss-curve PNG at the end (needs matplotlib)
    log_sample: bool = True  # log one rendered training sample at the start
    peak_tflops: float | None = None  # for MFU where the device is not known (CPU, new GPUs)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "optim": OptimSection,
    "parallel": ParallelSection,
    "lora": LoraSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
}


def _not(v: Any) -> bool:
    return not _coerce(v, bool, "flag")


# alias -> (section, key, value converter or None). MindSpeed / Megatron / HF names whose
# meaning is the same as ours; flags that are negations carry a converter.
ALIASES: dict[str, tuple[str, str, Callable[[Any], Any] | None]] = {
    "model_name_or_path": ("model", "path", None),
    "hf_path": ("model", "path", None),
    "model_config": ("model", "config", None),
    "attention_backend": ("model", "attn_backend", None),
    "init_method_std": ("model", "init_std", None),
    "data_path": ("data", "path", None),
    "valid_data_path": ("data", "eval_path", None),
    "max_seq_len": ("data", "seq_length", None),
    "tokenizer_name_or_path": ("data", "tokenizer", None),
    "tokenizer_path": ("data", "tokenizer", None),
    "is_instruction_dataset": ("data", "mode", lambda v: "sft" if _not(_not(v)) else "pretrain"),
    "no_shuffle": ("data", "shuffle", _not),
    "no_pad_to_seq_lengths": ("data", "variable_seq_lengths", None),
    "reset_attention_mask": ("data", "reset_position_ids", None),
    "save": ("train", "output_dir", None),
    "train_iters": ("train", "steps", None),
    "max_steps": ("train", "steps", None),
    "bf16": ("train", "precision", lambda v: "bf16" if _not(_not(v)) else "fp32"),
    "learning_rate": ("optim", "lr", None),
    "optimizer": ("optim", "name", None),
    "adam_beta1": ("optim", "beta1", None),
    "adam_beta2": ("optim", "beta2", None),
    "adam_eps": ("optim", "eps", None),
    "clip_grad": ("optim", "max_grad_norm", None),
    "lr_decay_style": ("optim", "schedule", None),
    "lr_scheduler_type": ("optim", "schedule", None),
    "lr_warmup_iters": ("optim", "warmup_steps", None),
    "lr_warmup_fraction": ("optim", "warmup_fraction", None),
    "warmup_ratio": ("optim", "warmup_fraction", None),
    "lr_decay_iters": ("optim", "decay_steps", None),
    "tensor_model_parallel_size": ("parallel", "tp", None),
    "pipeline_model_parallel_size": ("parallel", "pp", None),
    "fsdp_size": ("parallel", "dp_shard", None),
    "recompute": ("parallel", "activation_checkpointing", None),
    "lora_r": ("lora", "r", None),
    "lora_alpha": ("lora", "alpha", None),
    "lora_dropout": ("lora", "dropout", None),
    "lora_target_modules": ("lora", "target_modules", None),
    "lora_target": ("lora", "target_modules", None),
    "lora_load": ("lora", "load", None),
    "use_rslora": ("lora", "use_rslora", None),
    "save_interval": ("checkpoint", "interval", None),
    "load": ("checkpoint", "resume", None),
    "resume_from_checkpoint": ("checkpoint", "resume", None),
    "save_total_limit": ("checkpoint", "keep_last", None),
    "log_interval": ("logging", "interval", None),
}


@dataclass
class RunConfig:
    """The whole run. Build with :func:`load_config`; check with :meth:`validate`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- derived values -------------------------------------------------------------
    def dp_size(self, world_size: int) -> int:
        """Data-parallel degree (replicate x shard) for ``world_size`` processes."""
        p = self.parallel
        if world_size % (p.tp * p.pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp ({p.tp}) x "
                f"parallel.pp ({p.pp}); change the process count or the layout"
            )
        return world_size // (p.tp * p.pp)

    def global_batch_size(self, world_size: int = 1) -> int:
        t = self.train
        if t.global_batch_size is None:
            return t.micro_batch_size * self.dp_size(world_size)
        return t.global_batch_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        return self.global_batch_size(world_size) // (
            self.train.micro_batch_size * self.dp_size(world_size)
        )

    def warmup_steps(self) -> int:
        o = self.optim
        if o.warmup_steps is not None:
            return o.warmup_steps
        if o.warmup_fraction is not None:
            return int(round(o.warmup_fraction * self.train.steps))
        return 0

    def decay_steps(self) -> int:
        return self.optim.decay_steps if self.optim.decay_steps is not None else self.train.steps

    def export_hf(self) -> bool:
        e = self.checkpoint.export_hf
        return (self.lora.r == 0) if e is None else e

    def validate(self, world_size: int = 1) -> RunConfig:
        """Check values and combinations; raises ConfigError naming the key. Returns self."""
        _validate(self, world_size)
        return self


# ---- type coercion -----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or the command line) as type ``tp``, or ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = text.replace(",", " ").split()
        elif isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _fields(section: str) -> dict[str, Any]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _all_names() -> list[str]:
    names = list(SECTIONS)
    for s in SECTIONS:
        names += [f"{s}.{k}" for k in _fields(s)]
    return names + list(ALIASES)


def _suggest(name: str, candidates: Iterable[str]) -> str:
    cands = list(candidates)
    close = difflib.get_close_matches(name, cands, n=1, cutoff=0.5)
    if not close:
        # a bare key that exists inside some section ("lr" -> optim.lr)
        bare = name.split(".")[-1]
        close = [c for c in cands if c.endswith("." + bare)][:1]
    if not close:
        close = difflib.get_close_matches(name.split(".")[-1], cands, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _resolve(section: str | None, key: str, where: str) -> tuple[str, str, Callable | None]:
    """Map a (section, key) as written by the user to (section, canonical key, converter)."""
    key = key.replace("-", "_")
    if section is not None:
        if section not in SECTIONS:
            raise ConfigError(
                f"{where}: unknown section {section!r}{_suggest(section, SECTIONS)} "
                f"(sections: {', '.join(SECTIONS)})"
            )
        if key in _fields(section):
            return section, key, None
        if key in ALIASES and ALIASES[key][0] == section:
            return ALIASES[key]
        hint = ""
        if key in ALIASES:
            s, k, _ = ALIASES[key]
            hint = f"; {key!r} belongs to section {s!r} (as {s}.{k})"
        else:
            owners = [s for s in SECTIONS if key in _fields(s)]
            if owners:
                hint = f"; {key!r} belongs to section {owners[0]!r} (as {owners[0]}.{key})"
        if not hint:
            cands = [f"{section}.{k}" for k in _fields(section)] + _all_names()
            hint = _suggest(f"{section}.{key}", cands)
        raise ConfigError(f"{where}: unknown key {section}.{key}{hint}")
    if key in ALIASES:
        return ALIASES[key]
    owners = [s for s in SECTIONS if key in _fields(s)]
    if len(owners) == 1:
        return owners[0], key, None
    if len(owners) > 1:
        raise ConfigError(
            f"{where}: key {key!r} is ambiguous; write it as one of "
            + ", ".join(f"{s}.{key}" for s in owners)
        )
    raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, _all_names())}")


def _set(cfg: RunConfig, section: str, key: str, conv: Callable | None, value: Any, where: str):
    tp, f = _fields(section)[key]
    name = f"{section}.{key}"
    try:
        if conv is not None:
            value = conv(value)
        value = _coerce(value, tp, name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(
            f"{where}: {name} must be one of {', '.join(choices)}; got {value!r}"
            f"{_suggest(str(value), choices)}"
        )
    setattr(getattr(cfg, section), key, value)


def apply_mapping(cfg: RunConfig, data: dict[str, Any], where: str) -> None:
    """Apply a YAML-style mapping (sections and/or flat alias keys) onto ``cfg``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    for top, value in data.items():
        top = str(top)
        if top in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section {top!r} must be a mapping of keys")
            for k, v in value.items():
                s, key, conv = _resolve(top, str(k), where)
                _set(cfg, s, key, conv, v, where)
        else:
            s, key, conv = _resolve(None, top, where)
            _set(cfg, s, key, conv, value, where)


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``--a.b=v``, ``--a.b v`` and ``--flag-name v`` items -> [(dotted key, value text)]."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        if not item.startswith("--") or item == "--":
            raise ConfigError(
                f"command line: unexpected argument {item!r}; overrides look like "
                "--section.key=value (e.g. --optim.lr=1e-4)"
            )
        body = item[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 2
        else:  # a bare flag such as --bf16 or --no-shuffle
            key, value = body, "true"
            i += 1
        out.append((key, value))
    return out


def _value_from_text(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults <- ``base`` mapping <- YAML file at ``path`` <- command-line ``overrides``."""
    cfg = RunConfig()
    if base:
        apply_mapping(cfg, base, "config")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        apply_mapping(cfg, data, str(p))
    for key, text in parse_overrides(list(overrides or [])):
        where = f"--{key}"
        if "." in key:
            section, k = key.split(".", 1)
            s, k2, conv = _resolve(section, k, where)
        else:
            s, k2, conv = _resolve(None, key, where)
        _set(cfg, s, k2, conv, _value_from_text(text), where)
    return cfg


# ---- validation --------------------------------------------------------------------------


def parse_blend(items: list[str], key: str = "data.path") -> list[tuple[float, str]]:
    """``["0.5", "a", "0.5", "b"]`` or ``["a"]`` -> [(weight, prefix)], weights normalized."""
    if not items:
        return []
    if len(items) == 1:
        return [(1.0, items[0])]

    def num(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if num(items[0]) is None:
        if any(num(s) is not None for s in items):
            raise ConfigError(
                f"{key}: mix of weights and paths {items}; write a blend as "
                "'0.5 prefix_a 0.5 prefix_b' (weight before each prefix)"
            )
        return [(1.0 / len(items), s) for s in items]  # several prefixes: equal weights
    if len(items) % 2:
        raise ConfigError(
            f"{key}: a blend needs weight/prefix pairs, got {len(items)} items: {items}"
        )
    pairs = []
    for w, p in zip(items[::2], items[1::2]):
        wf = num(w)
        if wf is None or wf <= 0:
            raise ConfigError(f"{key}: blend weight {w!r} (before {p!r}) must be a positive number")
        if num(p) is not None:
            raise ConfigError(f"{key}: expected a prefix after weight {w!r}, got {p!r}")
        pairs.append((wf, p))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def parse_split(text: str, key: str = "data.split") -> tuple[float, float, float]:
    parts = [s for s in text.replace("/", ",").replace(" ", ",").split(",") if s]
    try:
        vals = [float(s) for s in parts]
    except ValueError:
        raise ConfigError(f"{key}: expected 'train,valid,test' weights, got {text!r}") from None
    while len(vals) < 3:
        vals.append(0.0)
    if len(vals) > 3 or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ConfigError(f"{key}: expected 3 non-negative weights like '969,30,1', got {text!r}")
    s = sum(vals)
    return vals[0] / s, vals[1] / s, vals[2] / s


def _positive(value: int | float | None, key: str, zero_ok: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _validate(cfg: RunConfig, world_size: int) -> None:
    m, d, t, o, p, lo, c, lg = (
        cfg.model,
        cfg.data,
        cfg.train,
        cfg.optim,
        cfg.parallel,
        cfg.lora,
        cfg.checkpoint,
        cfg.logging,
    )
    if not m.path and not m.config:
        raise ConfigError(
            "model.path (an HF directory to start from) or model.config (an HF config.json "
            "for a randomly initialized model) must be set"
        )
    if m.path and m.config:
        raise ConfigError(
            "set only one of model.path (load weights) and model.config (random init)"
        )
    if not d.path:
        raise ConfigError("data.path must name at least one dataset prefix (tunelab preprocess)")
    parse_blend(d.path, "data.path")
    parse_blend(d.eval_path, "data.eval_path")
    _, valid_frac, _ = parse_split(d.split)
    _positive(d.seq_length, "data.seq_length")
    _positive(d.pad_to_multiple_of, "data.pad_to_multiple_of")
    if d.mode == "pretrain" and d.variable_seq_lengths:
        raise ConfigError(
            "data.variable_seq_lengths applies to non-packed SFT data; pretraining rows are "
            "always seq_length tokens (set data.mode=sft or drop the option)"
        )
    if d.mode == "pretrain" and d.pad_to_multiple_of is not None:
        logger.warning("data.pad_to_multiple_of has no effect in pretrain mode")

    for k in ("steps", "micro_batch_size"):
        _positive(getattr(t, k), f"train.{k}")
    _positive(t.global_batch_size, "train.global_batch_size")
    _positive(t.eval_interval, "train.eval_interval", zero_ok=True)
    _positive(t.eval_iters, "train.eval_iters", zero_ok=True)
    _positive(t.max_skipped_steps, "train.max_skipped_steps")
    for k in ("dp_replicate", "tp", "pp", "virtual_stages"):
        _positive(getattr(p, k), f"parallel.{k}")
    if p.dp_shard != -1:
        _positive(p.dp_shard, "parallel.dp_shard")
    dp = cfg.dp_size(world_size)
    if p.dp_shard != -1 and p.dp_replicate * p.dp_shard != dp:
        raise ConfigError(
            f"parallel.dp_replicate ({p.dp_replicate}) x parallel.dp_shard ({p.dp_shard}) must "
            f"equal the data-parallel size {dp} (world size {world_size} / tp {p.tp} / pp {p.pp})"
        )
    if dp % p.dp_replicate:
        raise ConfigError(
            f"parallel.dp_replicate ({p.dp_replicate}) must divide the data-parallel size {dp}"
        )
    if p.num_layer_list is not None and len(p.num_layer_list) != p.pp * p.virtual_stages:
        raise ConfigError(
            f"parallel.num_layer_list has {len(p.num_layer_list)} entries; it needs one per "
            f"pipeline stage (parallel.pp x parallel.virtual_stages = {p.pp * p.virtual_stages})"
        )
    gbs = cfg.global_batch_size(world_size)
    if gbs % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({gbs}) must be divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({dp}); e.g. use "
            f"{max(1, gbs // (t.micro_batch_size * dp)) * t.micro_batch_size * dp}"
        )
    if t.eval_interval and not d.eval_path and valid_frac == 0:
        raise ConfigError(
            "train.eval_interval is set but there is no eval data: give data.eval_path or a "
            "valid share in data.split (e.g. '95,5,0')"
        )

    _positive(o.lr, "optim.lr", zero_ok=True)
    _positive(o.min_lr, "optim.min_lr", zero_ok=True)
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
    _positive(o.weight_decay, "optim.weight_decay", zero_ok=True)
    _positive(o.max_grad_norm, "optim.max_grad_norm", zero_ok=True)
    _positive(o.eps, "optim.eps")
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(o, k) < 1:
            raise ConfigError(f"optim.{k} must be in [0, 1), got {getattr(o, k)}")
    if o.warmup_steps is not None and o.warmup_fraction is not None:
        raise ConfigError(
            "set only one of optim.warmup_steps (lr_warmup_iters) and optim.warmup_fraction "
            "(lr_warmup_fraction)"
        )
    if o.warmup_fraction is not None and not 0 <= o.warmup_fraction <= 1:
        raise ConfigError(f"optim.warmup_fraction must be in [0, 1], got {o.warmup_fraction}")
    _positive(o.warmup_steps, "optim.warmup_steps", zero_ok=True)
    _positive(o.decay_steps, "optim.decay_steps")
    if cfg.warmup_steps() > cfg.decay_steps():
        raise ConfigError(
            f"optim warmup ({cfg.warmup_steps()} steps) is longer than the decay "
            f"({cfg.decay_steps()} steps); lower optim.warmup_steps or raise optim.decay_steps"
        )

    _positive(lo.r, "lora.r", zero_ok=True)
    if lo.r > 0:
        _positive(lo.alpha, "lora.alpha")
        if not 0 <= lo.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
        if not lo.target_modules:
            raise ConfigError("lora.target_modules is empty; name the layers to adapt")
    elif lo.load:
        raise ConfigError(f"lora.load is set ({lo.load}) but lora.r is 0; set lora.r > 0")

    _positive(c.interval, "checkpoint.interval", zero_ok=True)
    _positive(c.keep_last, "checkpoint.keep_last", zero_ok=True)
    _positive(lg.interval, "logging.interval")
    _positive(lg.peak_tflops, "logging.peak_tflops")
