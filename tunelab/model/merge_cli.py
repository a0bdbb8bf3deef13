"""`tunelab merge-lora`: fold a PEFT LoRA adapter into its base HF model, shard by shard.

Each base safetensors shard is read, its adapted weights are merged (``W + scaling * B @ A``
computed in fp32, stored back in the weight's own dtype) and the shard is written under the
same file name, so peak memory is about one shard, the base dtype and sharding are kept and
the safetensors index stays valid. Everything else a model directory needs (config,
generation config, tokenizer and chat template) is copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from tunelab.errors import CheckpointError

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", required=True, metavar="DIR", help="base model: an HF directory (safetensors)"
    )
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="PEFT LoRA adapter directory (tunelab's or peft's)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output HF directory (written atomically)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="directory to copy tokenizer files and chat template from (default: the adapter "
        "directory if it holds a tokenizer, else the base directory)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it already exists"
    )


def _shard_files(base: Path) -> tuple[list[str], dict | None]:
    index_path = base / SAFE_INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names shard files that do not exist: {missing}")
        return files, index
    if (base / SAFE_SINGLE).is_file():
        return [SAFE_SINGLE], None
    if not base.is_dir():
        raise CheckpointError(f"--base {base}: directory does not exist")
    raise CheckpointError(
        f"--base {base}: no {SAFE_SINGLE} or {SAFE_INDEX}; merge-lora reads safetensors HF "
        "directories (convert .bin weights with transformers' save_pretrained first)"
    )


def _check_base_config(base: Path) -> dict:
    cfg_path = base / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"--base {base}: no config.json; not an HF model directory")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "unknown")
        raise CheckpointError(
            f"{cfg_path}: the base is quantized ({method}); LoRA cannot be merged into quantized "
            "weights. Merge into the original (bf16/fp16/fp32) model, then quantize the result"
        )
    return cfg


def _has_tokenizer(d: Path) -> bool:
    return any((d / name).is_file() for name in _TOKENIZER_MARKERS)


def merge_lora_dirs(
    base: str | Path, adapter: str | Path, out: str | Path, tokenizer: str | Path | None = None
) -> dict:
    """Merge ``adapter`` into the HF model at ``base`` and write an HF directory at ``out``.

    Returns a summary (merged module count, shards, dtypes). Errors (quantized base, adapter
    modules missing from the base, shape mismatches) raise CheckpointError before ``out``
    exists.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    from tunelab.model.hf import copy_tokenizer_files
    from tunelab.model.lora import LoraAdapter, merge_adapter_into_state_dict
    from tunelab.utils import atomic_path

    base, out = Path(base), Path(out)
    _check_base_config(base)
    files, _ = _shard_files(base)
    lora = LoraAdapter.load(adapter)
    if tokenizer is None:
        tokenizer = lora.path if _has_tokenizer(lora.path) else base
    tokenizer = Path(tokenizer)

    merged: set[str] = set()
    dtypes: set[str] = set()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for fname in tqdm(files, desc="merging shards", unit="shard", disable=len(files) < 2):
            with safe_open(str(base / fname), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                shard = {k: f.get_tensor(k) for k in f.keys()}
            shard = merge_adapter_into_state_dict(shard, lora, merged=merged)
            dtypes |= {str(t.dtype).removeprefix("torch.") for t in shard.values()}
            save_file(shard, str(tmp / fname), metadata={"format": "pt", **metadata})
            del shard
        missing = sorted(set(lora.weights) - merged)
        if missing:
            raise CheckpointError(
                f"adapter {lora.path} has LoRA weights for {len(missing)} module(s) whose base "
                f"weight is not in {base} (e.g. {missing[0]}.weight); the adapter belongs to "
                "another model"
            )
        for name in ("config.json", SAFE_INDEX, "generation_config.json"):
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        if _has_tokenizer(tokenizer):
            copied = copy_tokenizer_files(tokenizer, tmp)
            log.info("copied tokenizer files from %s: %s", tokenizer, ", ".join(copied))
        else:
            log.warning("no tokenizer files in %s; the merged model has no tokenizer", tokenizer)
    summary = {
        "out": str(out),
        "merged_modules": len(merged),
        "shards": len(files),
        "dtypes": sorted(dtypes),
    }
    log.info("merged %d LoRA modules into %s", len(merged), out)
    return summary


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"--out {out} already exists; pass --overwrite to replace it")
    summary = merge_lora_dirs(args.base, args.adapter, out, args.tokenizer)
    print(
        f"merged {summary['merged_modules']} LoRA modules into {summary['out']} "
        f"({summary['shards']} shard(s), dtype {', '.join(summary['dtypes'])})"
    )
    return 0
