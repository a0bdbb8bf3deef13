"""Hugging Face directories in and out: config.json + safetensors (single or sharded).

Our parameter names equal HF's, so loading is a dtype cast plus the tied-embedding rule: when
``tie_word_embeddings`` is set, HF checkpoints usually omit ``lm_head.weight`` (we accept it if
present and ignore it) and :func:`save_hf` drops it, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from tunelab.errors import CheckpointError
from tunelab.model.config import ModelConfig, normalize_dtype_name
from tunelab.model.transformer import Transformer
from tunelab.utils import atomic_path

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# Keys some older HF checkpoints carry that hold no learned state.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES[normalize_dtype_name(dtype)]


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF directory: the index's shards, or the single file."""
    index = model_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [model_dir / f for f in files]
    single = model_dir / SAFE_SINGLE
    if single.is_file():
        return [single]
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory does not exist")
    if list(model_dir.glob("*.bin")):
        raise CheckpointError(
            f"{model_dir}: only PyTorch .bin weights found; tunelab reads safetensors. Convert "
            "with transformers (from_pretrained + save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{model_dir}: no {SAFE_SINGLE} or {SAFE_INDEX} found")


def iter_hf_tensors(
    model_dir: str | Path, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from every safetensors file of ``model_dir`` (one at a time).
    ``progress``: a tqdm bar over shard files (shown on a terminal only)."""
    files = weight_files(Path(model_dir))
    if progress and len(files) > 1:
        files = tqdm(files, desc="Loading shards", unit="file", disable=None)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_hf_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory as stored (names and dtypes untouched)."""
    return dict(iter_hf_tensors(model_dir))


def load_weights(
    model: Transformer, model_dir: str | Path, strict: bool = True, dtype: torch.dtype | None = None
) -> None:
    """Copy the checkpoint's tensors into ``model``'s (already materialized) parameters.

    ``strict``: every parameter must be found and every checkpoint key used. With
    ``strict=False`` keys the model does not have (e.g. layers of another pipeline stage) are
    skipped, but missing parameters are still an error.
    """
    params = dict(model.named_parameters())  # tied weights appear once, under embed_tokens
    tied = model.config.tie_word_embeddings
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_hf_tensors(model_dir, progress=True):
            if _IGNORED_KEYS.match(name):
                continue
            if name == "lm_head.weight" and tied:
                continue
            p = params.get(name)
            if p is None:
                unexpected.append(name)
                continue
            if tuple(p.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{model_dir}: shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(p.shape)} (does config.json match the weights?)"
                )
            p.copy_(tensor.to(dtype or p.dtype))
            seen.add(name)
    if unexpected and strict:
        raise CheckpointError(
            f"{model_dir}: unexpected key(s) in checkpoint: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (not a {model.config.model_type} model, or "
            "config.json does not match the weights)"
        )
    missing = [n for n in params if n not in seen]
    if missing:
        raise CheckpointError(
            f"{model_dir}: missing key(s) in checkpoint: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (incomplete download or a different model)"
        )


def _stored_dtype(model_dir: Path) -> torch.dtype:
    for _name, t in iter_hf_tensors(model_dir):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_backend: str = "sdpa",
) -> Transformer:
    """Build a :class:`Transformer` from an HF directory without holding the weights twice:
    the model is created on the meta device, materialized on ``device`` in ``dtype`` and filled
    tensor by tensor. ``dtype`` None keeps the checkpoint's dtype (``config.json``'s
    ``torch_dtype``/``dtype``, else the stored tensors')."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_hf(model_dir)
    weight_files(model_dir)  # fail early, before allocating anything
    torch_dtype = (
        to_torch_dtype(dtype) or to_torch_dtype(cfg.torch_dtype) or _stored_dtype(model_dir)
    )
    with torch.device("meta"):
        model = Transformer(cfg, attn_backend=attn_backend).to(torch_dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty replaces parameters one by one, which unties them
    load_weights(model, model_dir)
    log.info(
        "loaded %s (%s, %d params) from %s",
        cfg.model_type,
        torch_dtype,
        cfg.num_params(),
        model_dir,
    )
    return model.eval()


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / 1234 -> bytes (decimal units as transformers uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"invalid shard size {size!r}; use e.g. '5GB', '500MB' or bytes")
    unit = (m.group(2) or "B").upper()
    base = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]  # fmt: skip
    return int(float(m.group(1)) * base)


_WRAPPER_INFIXES = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


def hf_name(name: str) -> str:
    """Our/HF parameter name with wrapper infixes (activation checkpointing, compile) removed."""
    return _WRAPPER_INFIXES.sub("", name)


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor from a sharded model
        t = t.full_tensor()
    return t.detach()


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_hf(
    model_or_state_dict: Transformer | dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write an HF directory: config.json, generation_config.json, safetensors (sharded with
    ``model.safetensors.index.json`` above ``max_shard_size``) and tokenizer files copied from
    ``tokenizer_dir`` (including ``chat_template.jinja``). Written atomically: ``out_dir``
    appears complete or not at all. ``dtype`` None keeps the tensors' dtype."""
    out_dir = Path(out_dir)
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    torch_dtype = to_torch_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        name = hf_name(name)
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = _plain_tensor(t)
        if torch_dtype is not None and t.is_floating_point():
            t = t.to(torch_dtype)
        tensors[name] = t.to("cpu").contiguous()
    if not tensors:
        raise CheckpointError("save_hf: the state dict is empty")
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    saved_dtype = (
        str(next(iter(float_dtypes))).removeprefix("torch.") if len(float_dtypes) == 1 else None
    )
    shards = _shards(tensors, parse_size(max_shard_size))

    hf_cfg = cfg.replace(torch_dtype=saved_dtype or cfg.torch_dtype).to_hf_dict()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
        _write_generation_config(tmp, cfg, tokenizer_dir)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_SINGLE), metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            total = 0
            bar = tqdm(shards, desc="Writing shards", unit="file", disable=None)
            for i, shard in enumerate(bar, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for name, t in shard.items():
                    weight_map[name] = fname
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    log.info("saved HF model to %s (%d shard(s))", out_dir, len(shards))
    return out_dir


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files (and chat template) that exist in ``src`` to ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"tokenizer directory {src} does not exist")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if (
        "tokenizer.json" not in copied
        and "tokenizer.model" not in copied
        and "vocab.json" not in copied
    ):
        raise CheckpointError(f"{src}: no tokenizer files found (expected tokenizer.json)")
    return copied


def _write_generation_config(out: Path, cfg: ModelConfig, tokenizer_dir) -> None:
    src = Path(tokenizer_dir) / "generation_config.json" if tokenizer_dir is not None else None
    if src is not None and src.is_file():
        shutil.copy2(src, out / "generation_config.json")
        return
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
           ("pad_token_id", cfg.pad_token_id)) if v is not None}  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
