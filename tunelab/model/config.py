"""ModelConfig: the one parser of Hugging Face ``config.json`` in tunelab.

Supported families (``model_type``): llama (Llama 2, Llama 3/3.1/3.2), qwen2 (Qwen2/Qwen2.5),
qwen3 and mistral. Anything the decoder does not implement (another model_type, a rope scaling
type, a sliding window in only some layers, a non-SiLU activation, attention dropout) is a
``ConfigError`` that lists what is supported: a config is never silently half-understood.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tunelab.errors import CheckpointError, ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor")

_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip


def normalize_dtype_name(dtype: Any) -> str | None:
    """'bf16' / torch.bfloat16 / 'bfloat16' -> 'bfloat16'; None stays None."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ConfigError(
            f"unsupported dtype {dtype!r}; use one of bfloat16 (bf16), float16 (fp16), "
            "float32 (fp32)"
        )
    return _DTYPE_NAMES[name]


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer in the Llama/Qwen/Mistral family.

    Field names follow the HF config where they exist. ``raw`` keeps the original HF dict so
    ``to_hf_dict`` round-trips keys we do not interpret (e.g. ``architectures``).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain RoPE, else {"rope_type": "linear" | "llama3", ...params}
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    # Sliding-window attention (same window in every layer): a query sees at most this many
    # keys, itself included. None = full causal attention.
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, source: str | Path | dict | Any) -> ModelConfig:
        """Read an HF config: a model directory, a ``config.json`` path, a dict or an HF
        ``PretrainedConfig`` object."""
        where = "config dict"
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: no config.json; pass a Hugging Face model directory"
                )
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: invalid JSON ({e})") from e
        elif isinstance(source, dict):
            raw = copy.deepcopy(source)
        elif hasattr(source, "to_dict"):
            raw = source.to_dict()
        else:
            raise ConfigError(f"cannot read a model config from {type(source).__name__}")
        return cls._from_raw(raw, where)

    @classmethod
    def _from_raw(cls, raw: dict, where: str) -> ModelConfig:
        mt = raw.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {mt!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral)"
            )

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"{where}: required key {key!r} is missing")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = raw.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _parse_rope(raw, where)
        sliding_window = _parse_sliding_window(raw, mt, where)
        if float(raw.get("attention_dropout") or 0.0) != 0.0:
            raise ConfigError(
                f"{where}: attention_dropout={raw['attention_dropout']} is not supported; "
                "set it to 0.0"
            )
        if mt == "qwen2":
            qkv_bias, o_bias, mlp_bias, qk_norm = True, False, False, False
        elif mt == "qwen3":
            b = bool(raw.get("attention_bias", False))
            qkv_bias, o_bias, mlp_bias, qk_norm = b, b, False, True
        elif mt == "llama":
            b = bool(raw.get("attention_bias", False))
            qkv_bias, o_bias, mlp_bias, qk_norm = b, b, bool(raw.get("mlp_bias", False)), False
        else:  # mistral
            qkv_bias, o_bias, mlp_bias, qk_norm = False, False, False, False
        dtype = raw.get("dtype", raw.get("torch_dtype"))
        return cls(
            model_type=mt,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            hidden_act=str(raw.get("hidden_act", "silu")),
            sliding_window=sliding_window,
            initializer_range=float(raw.get("initializer_range", 0.02)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=normalize_dtype_name(dtype) if dtype not in (None, "auto") else None,
            raw=raw,
        )

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; the supported families "
                "use 'silu' (SwiGLU)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):  # fmt: skip
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sliding_window is not None and int(self.sliding_window) <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.sliding_window is not None and self.model_type in ("llama",):
            raise ConfigError("sliding_window is not part of the llama architecture")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type")
            if rt not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"rope_scaling type {rt!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (e.g. a smaller ``num_hidden_layers`` in tests)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ export
    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` dict. Keys we do not interpret are kept from the source."""
        out = copy.deepcopy(self.raw)
        for k in ("transformers_version", "_name_or_path", "_commit_hash"):
            out.pop(k, None)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]  # fmt: skip
        out.setdefault("architectures", [arch])
        out.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            attention_dropout=0.0,
        )
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type in ("qwen2", "qwen3"):
            sliding = self.sliding_window is not None
            out["use_sliding_window"] = sliding
            if sliding:
                out["sliding_window"] = self.sliding_window
                out["max_window_layers"] = 0  # every layer slides
            kind = "sliding_attention" if sliding else "full_attention"
            out["layer_types"] = [kind] * self.num_hidden_layers
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        # Both spellings of rope settings: the legacy keys are read by every transformers
        # version (and vLLM); transformers 5 writes ``rope_parameters``.
        scaling = copy.deepcopy(self.rope_scaling)
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = scaling
        params = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if scaling:
            params.update(scaling)
            out["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
        out["rope_parameters"] = params
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
            out["dtype"] = self.torch_dtype
        else:
            out.pop("torch_dtype", None)
            out.pop("dtype", None)
        return out

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        h, L = self.hidden_size, self.num_hidden_layers
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        per_layer = self._layer_matmul_params() + 2 * h
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.o_bias:
            per_layer += h
        if self.mlp_bias:
            per_layer += 2 * self.intermediate_size + h
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return embed + head + L * per_layer + h

    def _layer_matmul_params(self) -> int:
        h = self.hidden_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        return attn + mlp

    def num_matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all linear layers including the
        output head (the embedding lookup is not a matmul)."""
        return (
            self.num_hidden_layers * self._layer_matmul_params()
            + self.vocab_size * self.hidden_size
        )

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 x matmul params + the attention
        score/value matmuls 6 x L x hidden x seq (the usual MFU convention)."""
        return 6 * self.num_matmul_params() + 6 * self.num_hidden_layers * self.hidden_size * int(
            seq_len
        )

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    def field_names(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "raw"]


def _parse_rope(raw: dict, where: str) -> tuple[float, dict | None]:
    """Return (rope_theta, scaling) from either transformers-5 ``rope_parameters`` or the
    legacy ``rope_theta`` + ``rope_scaling`` keys."""
    params = raw.get("rope_parameters")
    legacy = raw.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters must be a dict, got {params!r}")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(
            f"{where}: per-layer-type rope_parameters are not supported "
            "(only one RoPE setting for all layers)"
        )
    merged: dict = {}
    if legacy:
        merged.update(legacy)
    if params:
        merged.update(params)
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = raw.get("rope_theta", 10000.0)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope scaling type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)} (plain RoPE, linear, llama3)"
        )
    if rope_type == "default":
        # transformers may add neutral keys (e.g. partial_rotary_factor=1.0); reject others.
        extra = {k: v for k, v in merged.items() if not (k == "partial_rotary_factor" and v == 1.0)}
        if extra:
            raise ConfigError(f"{where}: unsupported RoPE parameters {sorted(extra)}")
        return float(theta), None
    if "factor" not in merged:
        raise ConfigError(f"{where}: rope scaling {rope_type!r} needs 'factor'")
    scaling: dict = {"rope_type": rope_type, "factor": float(merged["factor"])}
    if rope_type == "llama3":
        for k in _LLAMA3_ROPE_KEYS:
            if k not in merged:
                raise ConfigError(f"{where}: llama3 rope scaling needs {k!r}")
            scaling[k] = float(merged[k])
        omp = merged.get("original_max_position_embeddings")
        if omp is None:
            raise ConfigError(
                f"{where}: llama3 rope scaling needs 'original_max_position_embeddings'"
            )
        scaling["original_max_position_embeddings"] = int(omp)
    return float(theta), scaling


def _parse_sliding_window(raw: dict, model_type: str, where: str) -> int | None:
    """The window (one for all layers) or None. Per-layer mixes are refused."""
    if model_type == "llama":
        return None
    sw = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            sw = None
        if layer_types is None:
            first = int(raw.get("max_window_layers") or 0)
            n = int(raw.get("num_hidden_layers") or 0)
            layer_types = [
                "sliding_attention" if sw is not None and i >= first else "full_attention"
                for i in range(n)
            ]
    elif layer_types is None:
        layer_types = ["sliding_attention" if sw is not None else "full_attention"]
    kinds = set(layer_types)
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{where}: unsupported layer_types {sorted(kinds)}")
    if kinds == {"full_attention", "sliding_attention"}:
        raise ConfigError(
            f"{where}: sliding-window attention in only some layers (layer_types / "
            "max_window_layers) is not supported; tunelab supports one sliding window for all "
            "layers or none"
        )
    if kinds == {"full_attention"} or sw is None:
        return None
    max_pos = raw.get("max_position_embeddings")
    if max_pos is not None and int(sw) >= int(max_pos):
        return None  # the window never binds within the supported context
    return int(sw)
