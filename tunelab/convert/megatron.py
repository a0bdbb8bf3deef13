"""HF <-> Megatron mcore conversion: a stream of HF-named tensors between a reader and a writer
(`streams.py`). mcore -> mcore re-sharding goes through the same stream. The HF writer is
``save_hf``, which takes the whole state dict, so mcore -> HF holds the model once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tunelab.convert import layout as L
from tunelab.convert.args import (  # noqa: F401 (re-exported)
    MODEL_TYPE_HF,
    config_from_megatron_args,
    dims_from_config,
    megatron_args,
    padded_vocab_size,
)
from tunelab.convert.mcore_io import (
    TRACKER,
    McoreCheckpoint,
    find_checkpoint,
    iteration_dir_name,
    load_file,
)
from tunelab.convert.mcore_lora import McoreLora
from tunelab.convert.streams import (  # noqa: F401 (re-exported)
    McoreReader,
    McoreWriter,
    hf_layer_keys,
    iter_hf_source,
)
from tunelab.errors import CheckpointError, ConfigError
from tunelab.model.config import ModelConfig
from tunelab.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
        expected |= hf_layer_keys(dims, i)
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
