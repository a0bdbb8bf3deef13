"""HF <-> Megatron mcore conversion: a stream of HF-named tensors between a reader and a writer.

Readers: an HF directory (safetensors, tensor by tensor) or a Megatron checkpoint (one
pipeline stage at a time, its TP shards merged back to HF tensors). Writers: a Megatron
checkpoint (a stage's file is written as soon as all of its tensors arrived, so with files in
layer order memory holds about one stage) or an HF directory (``save_hf`` takes the whole
state dict, so mcore -> HF holds the model once). mcore -> mcore re-sharding goes through the
same HF-named stream.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tunelab.convert import layout as L
from tunelab.convert.mcore_io import (
    FILE_NAME,
    TRACKER,
    McoreCheckpoint,
    find_checkpoint,
    iteration_dir_name,
    load_file,
    model_chunks,
    rank_dir_name,
    save_file,
)
from tunelab.convert.mcore_lora import McoreLora
from tunelab.errors import CheckpointError, ConfigError
from tunelab.model.config import ModelConfig
from tunelab.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# MindSpeed --model-type-hf names -> HF model_type (used only when no config.json is at hand).
MODEL_TYPE_HF = {
    "llama2": "llama",
    "llama3": "llama",
    "llama": "llama",
    "mistral": "mistral",
    "magistral": "mistral",
    "qwen2": "qwen2",
    "qwen25": "qwen2",
    "qwen3": "qwen3",
}


@dataclass
class ConvertOptions:
    load_model_type: str  # "hf" | "mg"
    save_model_type: str  # "hf" | "mg"
    load_dir: Path
    save_dir: Path | None = None
    tp: int = 1
    pp: int = 1
    num_layer_list: list[int] | None = None
    layers_per_vpp_stage: int | None = None
    params_dtype: str | None = None  # fp16 | bf16 | fp32; None keeps the source dtype
    model_type_hf: str | None = None
    transformer_impl: str = "local"
    hf_config_dir: Path | None = None
    save_hf_dir: Path | None = None
    lora_load: Path | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_target_modules: list[str] | None = None
    allow_unsafe_pickle: bool = False
    # Megatron's --make-vocab-size-divisible-by: pad the vocab to a multiple of this x TP
    make_vocab_size_divisible_by: int | None = None
    iteration: int = 1
    progress: bool = True


def dims_from_config(cfg: ModelConfig) -> L.ModelDims:
    if cfg.o_bias or cfg.mlp_bias:
        raise ConfigError(
            "the model has biases on o_proj or the MLP (attention_bias / mlp_bias); Megatron "
            "mcore conversion supports bias on q/k/v only (--add-qkv-bias)"
        )
    return L.ModelDims(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        tie_embeddings=cfg.tie_word_embeddings,
        qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm,
    )


def padded_vocab_size(vocab: int, tp: int, divisible_by: int | None) -> int:
    """Megatron's _vocab_size_with_padding: round up to a multiple of divisible_by x TP."""
    if not divisible_by:
        return vocab
    if divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by {divisible_by}: must be >= 1")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def megatron_args(cfg: ModelConfig, lay: L.ParallelLayout, te: bool, dtype: torch.dtype | None,
                  model_type_hf: str | None, padded_vocab: int | None = None
                  ) -> argparse.Namespace:  # fmt: skip
    """The `args` Namespace stored in every file: Megatron's own names for the architecture
    (what Megatron checks on load) plus ``hf_config`` so mcore -> HF needs no other input."""
    dtype = dtype or torch.float32
    scaling = cfg.rope_scaling or {}
    return argparse.Namespace(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_key_value_heads != cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings,
        padded_vocab_size=padded_vocab or cfg.vocab_size,
        vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=1,
        normalization="RMSNorm",
        norm_epsilon=cfg.rms_norm_eps,
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=cfg.rope_theta,
        use_rope_scaling=scaling.get("rope_type") == "llama3",
        rope_scaling_factor=scaling.get("factor", 1.0),
        add_qkv_bias=cfg.qkv_bias,
        add_bias_linear=False,
        disable_bias_linear=True,
        qk_layernorm=cfg.qk_norm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=(len(lay.chunks[0][0]) if lay.vpp > 1 else None),
        num_layer_list=",".join(str(len(s[0])) for s in lay.chunks) if lay.vpp == 1 else None,
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        use_mcore_models=True,
        transformer_impl="transformer_engine" if te else "local",
        model_type_hf=model_type_hf,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        hf_config=cfg.to_hf_dict(),
    )


def config_from_megatron_args(args, model_type_hf: str | None, where: Path) -> ModelConfig:
    """An HF config dict from a checkpoint's `args` (ours carry it whole as ``hf_config``)."""
    hf = getattr(args, "hf_config", None)
    if isinstance(hf, dict):
        return ModelConfig.from_hf(hf)
    if args is None or not hasattr(args, "num_layers"):
        raise CheckpointError(
            f"{where}: the checkpoint's args do not describe the model; pass --hf-config-dir "
            "(or --save-dir) pointing at the original Hugging Face directory"
        )
    mt = MODEL_TYPE_HF.get(model_type_hf or "")
    if mt is None:
        mt = (
            "qwen3"
            if getattr(args, "qk_layernorm", False)
            else ("qwen2" if getattr(args, "add_qkv_bias", False) else "llama")
        )
        log.warning("%s: no --model-type-hf; reading the checkpoint as model_type %s", where, mt)
    heads = int(args.num_attention_heads)
    raw = {
        "model_type": mt,
        "num_hidden_layers": int(args.num_layers),
        "hidden_size": int(args.hidden_size),
        "intermediate_size": int(args.ffn_hidden_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(
            args.num_query_groups if getattr(args, "group_query_attention", False) else heads
        ),
        "head_dim": int(getattr(args, "kv_channels", None) or args.hidden_size // heads),
        "vocab_size": int(getattr(args, "padded_vocab_size", None) or args.vocab_size),
        "max_position_embeddings": int(getattr(args, "max_position_embeddings", 4096) or 4096),
        "rms_norm_eps": float(getattr(args, "norm_epsilon", 1e-6)),
        "rope_theta": float(getattr(args, "rotary_base", 10000)),
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
    }
    if mt == "llama" and getattr(args, "add_qkv_bias", False):
        raise CheckpointError(
            f"{where}: qkv bias without o_proj bias has no Llama equivalent; pass "
            "--model-type-hf qwen25 or --hf-config-dir"
        )
    return ModelConfig.from_hf(raw)


# ------------------------------------------------------------------------------ readers


def _hf_layer_keys(dims: L.ModelDims, i: int) -> set[str]:
    keys = {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    }
    for p in "qkv":
        keys.add(f"self_attn.{p}_proj.weight")
        if dims.qkv_bias:
            keys.add(f"self_attn.{p}_proj.bias")
    if dims.qk_norm:
        keys |= {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    return {f"model.layers.{i}.{k}" for k in keys}


def _model_order(name: str) -> tuple[int, str]:
    m = _HF_LAYER.match(name)
    if m:
        return int(m[1]), name
    return (-1, name) if name == L.EMBED_HF else (1 << 30, name)


def iter_hf_source(load_dir: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors one at a time, each file read in model order (embedding, layers 0..L-1,
    norm, head) rather than safetensors' lexicographic order (layer 10 before layer 2), so
    pipeline stages complete, and are written and freed, as early as possible."""
    from safetensors import safe_open

    from tunelab.model.hf import _weight_files  # resolves single file / index + shards

    for path in _weight_files(Path(load_dir)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in sorted(f.keys(), key=_model_order):
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name == L.HEAD_HF and cfg.tie_word_embeddings:
                    continue  # tied: the embedding is the head (HF may or may not store a copy)
                yield name, f.get_tensor(name)


class McoreReader:
    """Reads a Megatron checkpoint stage by stage and yields HF-named full tensors."""

    def __init__(
        self,
        ckpt: McoreCheckpoint,
        dims: L.ModelDims,
        allow_unsafe_pickle: bool = False,
        lora: McoreLora | None = None,
    ):
        self.ckpt, self.dims, self.lora = ckpt, dims, lora
        self.allow_unsafe = allow_unsafe_pickle
        counts = []
        for p in range(ckpt.pp):
            path = ckpt.file(0, p)
            chunks = model_chunks(load_file(path, allow_unsafe_pickle), path)
            counts.append([_count_layers(c) for c in chunks])
        if len({len(c) for c in counts}) != 1:
            raise CheckpointError(f"{ckpt.iter_dir}: stages have different numbers of chunks")
        self.layout = L.ParallelLayout.from_counts(ckpt.tp, counts)
        if self.layout.num_layers != dims.num_layers:
            raise CheckpointError(
                f"{ckpt.iter_dir} holds {self.layout.num_layers} layers but the config says "
                f"{dims.num_layers} (num_hidden_layers); is the config for this checkpoint?"
            )
        dims.check_tp(ckpt.tp, where=f"{ckpt.iter_dir} TP", vocab=False)

    def _stage(self, p: int) -> list[list[dict[str, torch.Tensor]]]:
        """[vchunk][tp_rank] -> that rank's model chunk, normalized, LoRA merged."""
        per_rank = []
        for t in range(self.ckpt.tp):
            path = self.ckpt.file(t, p)
            chunks = model_chunks(load_file(path, self.allow_unsafe), path)
            if len(chunks) != self.layout.vpp:
                raise CheckpointError(f"{path}: {len(chunks)} model chunks, rank 0 has more")
            per_rank.append(chunks)
        out = []
        for c in range(self.layout.vpp):
            ranks = []
            for t in range(self.ckpt.tp):
                d = L.normalize_layer_keys(per_rank[t][c])
                if self.lora is not None:
                    d = self.lora.merge(d, t, p, c)
                ranks.append(d)
            out.append(ranks)
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        dims = self.dims
        for p in range(self.ckpt.pp):
            for c, ranks in enumerate(self._stage(p)):
                where = f"{self.ckpt.file(0, p)} chunk {c}"
                layers: dict[int, list[dict[str, torch.Tensor]]] = {}
                rest: list[dict[str, torch.Tensor]] = [{} for _ in ranks]
                for t, d in enumerate(ranks):
                    for k, v in d.items():
                        m = _MG_LAYER.match(k)
                        if m:
                            layers.setdefault(int(m[1]), [{} for _ in ranks])[t][m[2]] = v
                        else:
                            rest[t][k] = v
                global_ids = self.layout.chunks[p][c]
                for j in sorted(layers):
                    try:
                        hf = L.layer_from_mcore(layers[j], dims)
                    except (KeyError, ValueError) as e:
                        raise CheckpointError(f"{where}: layer {j}: {e}") from None
                    for k, v in hf.items():
                        yield f"model.layers.{global_ids[j]}.{k}", v
                yield from self._non_layer(rest, where)

    def _non_layer(self, rest, where) -> Iterator[tuple[str, torch.Tensor]]:
        keys = set(rest[0])
        for t, d in enumerate(rest[1:], start=1):
            if set(d) != keys:
                raise CheckpointError(f"{where}: TP rank {t} has other tensors than rank 0")
        vocab = self.dims.vocab_size
        for mg, hf, kind in (
            (L.EMBED_MG, L.EMBED_HF, "col"),
            (L.NORM_MG, L.NORM_HF, "replicated"),
            (L.HEAD_MG, L.HEAD_HF, "col"),
        ):
            if mg not in keys:
                continue
            keys.discard(mg)
            if mg == L.HEAD_MG and self.dims.tie_embeddings:
                continue  # the last stage's copy of a tied embedding (PP > 1)
            t = L.merge_tp([d[mg] for d in rest], kind, mg)
            if kind == "col":
                if t.shape[0] < vocab:
                    raise CheckpointError(
                        f"{where}: {mg} has {t.shape[0]} rows, fewer than vocab_size {vocab}"
                    )
                t = t[:vocab]  # Megatron pads the vocab to a multiple; HF has the true size
            if (
                t.shape[1:] != (self.dims.hidden_size,)
                and t.dim() == 2
                or (t.dim() == 1 and t.shape != (self.dims.hidden_size,))
            ):
                raise CheckpointError(
                    f"{where}: {mg} has shape {tuple(t.shape)}; hidden_size is "
                    f"{self.dims.hidden_size} (is the config for this checkpoint?)"
                )
            yield hf, t
        if keys:
            raise CheckpointError(f"{where}: tensors tunelab cannot convert: {sorted(keys)}")


def _non_layer_shapes(dims: L.ModelDims) -> dict[str, tuple[int, ...]]:
    v, h = dims.vocab_size, dims.hidden_size
    return {L.EMBED_HF: (v, h), L.HEAD_HF: (v, h), L.NORM_HF: (h,)}


def _count_layers(model: dict) -> int:
    ids = {int(m[1]) for k in model if (m := _MG_LAYER.match(k))}
    if ids and ids != set(range(len(ids))):
        raise CheckpointError(f"layer indices {sorted(ids)} are not 0..n-1 (local numbering)")
    return len(ids)


# ------------------------------------------------------------------------------ writers


@dataclass
class McoreWriter:
    """Buffers HF tensors per pipeline rank and writes that rank's files once complete."""

    out_dir: Path  # the iteration directory (temporary name while writing)
    cfg: ModelConfig
    dims: L.ModelDims
    layout: L.ParallelLayout
    te: bool
    dtype: torch.dtype | None
    args: argparse.Namespace
    iteration: int
    adapter: object | None = None  # tunelab.model.lora.LoraAdapter
    padded_vocab: int | None = None
    merged: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        lay = self.layout
        self._owner: dict[int, int] = {}
        for p, stage in enumerate(lay.chunks):
            for r in stage:
                for i in r:
                    self._owner[i] = p
        self._expected: list[set[str]] = []
        for p, stage in enumerate(lay.chunks):
            keys: set[str] = set()
            for r in stage:
                for i in r:
                    keys |= _hf_layer_keys(self.dims, i)
            if p == 0:
                keys.add(L.EMBED_HF)
            if p == lay.pp - 1:
                keys.add(L.NORM_HF)
                if self.dims.tie_embeddings:
                    keys.add(L.EMBED_HF)  # copied to output_layer on the last stage (PP > 1)
                else:
                    keys.add(L.HEAD_HF)
            self._expected.append(keys)
        self._buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(lay.pp)]
        self._done = [False] * lay.pp
        self.files_written = 0
        self._buffered = 0
        self.peak_buffered_bytes = 0  # memory held waiting for a stage to complete

    def add(self, name: str, t: torch.Tensor) -> None:
        m = _HF_LAYER.match(name)
        if m:
            owners = [self._owner.get(int(m[1]))]
        elif name == L.EMBED_HF:
            owners = [0, self.layout.pp - 1] if self.dims.tie_embeddings else [0]
        elif name in (L.NORM_HF, L.HEAD_HF):
            owners = [self.layout.pp - 1]
        else:
            owners = [None]
        for p in dict.fromkeys(owners):
            if p is None or name not in self._expected[p]:
                raise CheckpointError(
                    f"tensor {name!r} has no place in a Megatron mcore checkpoint of this model "
                    f"({self.cfg.model_type}, {self.dims.num_layers} layers)"
                )
            self._buffers[p][name] = t
            self._buffered += t.numel() * t.element_size()
            self.peak_buffered_bytes = max(self.peak_buffered_bytes, self._buffered)
            if self._buffers[p].keys() == self._expected[p]:
                self._flush(p)

    def finish(self) -> None:
        for p in range(self.layout.pp):
            if not self._done[p]:
                missing = sorted(self._expected[p] - self._buffers[p].keys())
                raise CheckpointError(
                    f"the source lacks {len(missing)} tensor(s) for pipeline stage {p}: "
                    f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
                )

    def _flush(self, p: int) -> None:
        hf = self._buffers[p]
        self._buffers[p] = {}
        self._buffered -= sum(t.numel() * t.element_size() for t in hf.values())
        if self.adapter is not None:
            from tunelab.model.lora import merge_adapter_into_state_dict

            hf = merge_adapter_into_state_dict(hf, self.adapter, merged=self.merged)
        try:
            L.check_shapes(hf, _non_layer_shapes(self.dims))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if self.dtype is not None:
            hf = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in hf.items()}
        lay, tp = self.layout, self.layout.tp
        for key in (L.EMBED_HF, L.HEAD_HF):
            if key in hf and self.padded_vocab and self.padded_vocab > hf[key].shape[0]:
                t = hf[key]
                # as MindSpeed's converter pads: repeat the last row (never sampled: the
                # tokenizer has no such ids, and HF export cuts them off again)
                hf[key] = torch.cat([t, t[-1:].expand(self.padded_vocab - t.shape[0], -1)])
        files: list[dict] = [
            {"args": self.args, "checkpoint_version": 3.0, "iteration": self.iteration}
            for _ in range(tp)
        ]
        for c, layers in enumerate(lay.chunks[p]):
            model: list[dict[str, torch.Tensor | None]] = [{} for _ in range(tp)]
            if lay.has_embedding(p, c):
                for r, part in enumerate(L.split_tp(hf[L.EMBED_HF], "col", tp)):
                    model[r][L.EMBED_MG] = part
            for j, i in enumerate(layers):
                prefix = f"model.layers.{i}."
                rel = {k[len(prefix) :]: v for k, v in hf.items() if k.startswith(prefix)}
                try:
                    parts = L.layer_to_mcore(rel, self.dims, tp, te=self.te)
                except KeyError as e:
                    raise CheckpointError(f"layer {i}: missing tensor {e}") from None
                except ValueError as e:
                    raise CheckpointError(f"layer {i}: {e}") from None
                for r in range(tp):
                    for k, v in parts[r].items():
                        model[r][f"decoder.layers.{j}.{k}"] = v
                    if not self.te:
                        for mod in L.EXTRA_STATE_MODULES:
                            model[r][f"decoder.layers.{j}.{mod}._extra_state"] = None
            if lay.has_head(p, c):
                head = hf[L.EMBED_HF] if self.dims.tie_embeddings else hf.get(L.HEAD_HF)
                norm = L.split_tp(hf[L.NORM_HF], "replicated", tp)
                # Megatron's own GPTModel keeps a separate output weight on the last stage
                # when PP > 1, even when tied; with PP == 1 the embedding is the head.
                write_head = not self.dims.tie_embeddings or lay.pp > 1
                heads = L.split_tp(head, "col", tp) if write_head else None
                for r in range(tp):
                    model[r][L.NORM_MG] = norm[r]
                    if heads is not None:
                        model[r][L.HEAD_MG] = heads[r]
                    if not self.te:
                        model[r]["output_layer._extra_state"] = None
            key = "model" if lay.vpp == 1 else f"model{c}"
            for r in range(tp):
                files[r][key] = model[r]
        for r in range(tp):
            save_file(self.out_dir / rank_dir_name(r, p, lay.pp) / FILE_NAME, files[r])
            self.files_written += 1
        self._done[p] = True
        log.info("wrote pipeline stage %d (%d TP file(s))", p, tp)


# ------------------------------------------------------------------------------ driver


def _resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError(f"--params-dtype {name!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _has_tokenizer(d: Path | None) -> bool:
    return d is not None and any(
        (d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def _load_lora(opts: ConvertOptions, base: McoreCheckpoint | None):
    """(PEFT adapter or None, McoreLora or None) for --lora-load."""
    if opts.lora_load is None:
        return None, None
    lora_dir = Path(opts.lora_load)
    if (lora_dir / "adapter_config.json").is_file():
        from tunelab.model.lora import LoraAdapter

        adapter = LoraAdapter.load(lora_dir)
        spec = adapter.spec
        if opts.lora_r is not None and opts.lora_r != spec.r:
            raise ConfigError(
                f"--lora-r {opts.lora_r} but {lora_dir}/adapter_config.json has r={spec.r}; "
                "drop the flag (a PEFT adapter carries its own r and alpha)"
            )
        if opts.lora_alpha is not None and float(opts.lora_alpha) != float(spec.alpha):
            raise ConfigError(
                f"--lora-alpha {opts.lora_alpha} but {lora_dir}/adapter_config.json has "
                f"lora_alpha={spec.alpha:g}; drop the flag"
            )
        if opts.lora_target_modules:
            log.warning("--lora-target-modules is ignored: the PEFT adapter names its modules")
        return adapter, None
    if base is None:
        raise ConfigError(
            f"--lora-load {lora_dir}: not a PEFT adapter (no adapter_config.json); a "
            "MindSpeed (Megatron-layout) LoRA checkpoint needs --load-model-type mg with the "
            "base checkpoint it was trained on"
        )
    return None, McoreLora.open(
        lora_dir, base, opts.lora_r, opts.lora_alpha, opts.lora_target_modules,
        opts.allow_unsafe_pickle,
    )  # fmt: skip


def _source_config(opts: ConvertOptions, args) -> ModelConfig:
    """Config for an mcore source: --hf-config-dir, then --save-dir (the seeds' habit of
    pointing it at the original HF model), then the checkpoint's own args."""
    for d in (opts.hf_config_dir, opts.save_dir if opts.save_model_type == "hf" else None):
        if d is not None and (Path(d) / "config.json").is_file():
            return ModelConfig.from_hf(Path(d))
    if opts.hf_config_dir is not None:
        raise CheckpointError(f"--hf-config-dir {opts.hf_config_dir}: no config.json there")
    return config_from_megatron_args(args, opts.model_type_hf, Path(opts.load_dir))


def hf_output_dir(opts: ConvertOptions) -> Path:
    if opts.save_hf_dir is not None:
        return Path(opts.save_hf_dir)
    if opts.save_dir is None:
        raise ConfigError("--save-dir (or --save-hf-dir) is required")
    return Path(opts.save_dir) / "mg2hf"


def convert(opts: ConvertOptions) -> Path:
    """Run one conversion; returns the directory written."""
    if opts.load_model_type not in ("hf", "mg") or opts.save_model_type not in ("hf", "mg"):
        raise ConfigError("--load-model-type and --save-model-type must be 'hf' or 'mg'")
    if opts.load_model_type == "hf" and opts.save_model_type == "hf" and opts.lora_load is None:
        raise ConfigError("hf -> hf without --lora-load does nothing; use `tunelab merge-lora`")
    if opts.transformer_impl not in ("local", "transformer_engine"):
        raise ConfigError("--transformer-impl must be 'local' or 'transformer_engine'")
    dtype = _resolve_dtype(opts.params_dtype)
    load_dir = Path(opts.load_dir)

    base_ckpt: McoreCheckpoint | None = None
    if opts.load_model_type == "hf":
        cfg = ModelConfig.from_hf(load_dir)
        stream_factory = lambda dims: iter_hf_source(load_dir, cfg)  # noqa: E731
        adapter, mlora = _load_lora(opts, None)
    else:
        base_ckpt = find_checkpoint(load_dir)
        args = load_file(base_ckpt.file(0, 0), opts.allow_unsafe_pickle).get("args")
        cfg = _source_config(opts, args)
        adapter, mlora = _load_lora(opts, base_ckpt)
        stream_factory = lambda dims: McoreReader(  # noqa: E731
            base_ckpt, dims, opts.allow_unsafe_pickle, mlora
        )
    dims = dims_from_config(cfg)
    if opts.model_type_hf and MODEL_TYPE_HF.get(opts.model_type_hf, cfg.model_type) != (
        cfg.model_type
    ):
        log.warning(
            "--model-type-hf %s does not match the config's model_type %s; using the config",
            opts.model_type_hf,
            cfg.model_type,
        )

    if opts.save_model_type == "mg":
        if opts.save_dir is None:
            raise ConfigError("--save-dir is required")
        padded = padded_vocab_size(dims.vocab_size, opts.tp, opts.make_vocab_size_divisible_by)
        dims.check_tp(opts.tp, vocab=padded == dims.vocab_size)
        lay = L.ParallelLayout.build(
            dims.num_layers, opts.tp, opts.pp, opts.num_layer_list, opts.layers_per_vpp_stage
        )
        save_dir = Path(opts.save_dir)
        if base_ckpt is not None and save_dir.resolve() == load_dir.resolve():
            raise ConfigError("--save-dir must differ from --load-dir")
        te = opts.transformer_impl == "transformer_engine"
        out_cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch.")) if dtype else cfg
        args_ns = megatron_args(out_cfg, lay, te, dtype, opts.model_type_hf, padded)
        log.info("writing Megatron mcore checkpoint %s (%s)", save_dir, lay.describe())
        with atomic_path(save_dir / iteration_dir_name(opts.iteration)) as tmp:
            writer = McoreWriter(
                tmp, cfg, dims, lay, te, dtype, args_ns, opts.iteration, adapter, padded
            )
            for name, t in tqdm(
                stream_factory(dims), desc="convert", unit="tensor", disable=not opts.progress
            ):
                writer.add(name, t)
            writer.finish()
            log.info("peak memory held for unfinished stages: %.1f MB",
                     writer.peak_buffered_bytes / 1e6)  # fmt: skip
            _check_lora_done(adapter, writer.merged, mlora)
        atomic_write_text(save_dir / TRACKER, f"{opts.iteration}\n")
        return save_dir

    from tunelab.model.hf import save_hf
    from tunelab.model.lora import merge_adapter_into_state_dict

    out = hf_output_dir(opts)
    state: dict[str, torch.Tensor] = {}
    for name, t in tqdm(stream_factory(dims), desc="convert", unit="tensor",
                        disable=not opts.progress):  # fmt: skip
        if name in state:
            raise CheckpointError(f"tensor {name} appears twice in the source")
        state[name] = t
    expected = {L.EMBED_HF, L.NORM_HF} | ({L.HEAD_HF} if not dims.tie_embeddings else set())
    for i in range(dims.num_layers):
        expected |= _hf_layer_keys(dims, i)
    if state.keys() != expected:
        missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
        raise CheckpointError(f"{load_dir}: missing tensors {missing[:8]}, unexpected {extra[:8]}")
    merged: set[str] = set()
    if adapter is not None:
        state = merge_adapter_into_state_dict(state, adapter, merged=merged)
    tok_dir = next(
        (Path(d) for d in (opts.hf_config_dir, opts.save_dir, load_dir) if _has_tokenizer(
            Path(d) if d is not None else None)),
        None,
    )  # fmt: skip
    _check_lora_done(adapter, merged, mlora)
    save_hf(state, cfg, out, dtype=dtype, tokenizer_dir=tok_dir)
    return out


def _check_lora_done(adapter, merged: set[str], mlora: McoreLora | None) -> None:
    if adapter is not None:
        missing = sorted(set(adapter.weights) - merged)
        if missing:
            raise CheckpointError(
                f"{adapter.path}: adapter modules not found in the model: {missing[:8]}"
            )
    if mlora is not None:
        mlora.check_done()
