"""The HF-named tensor stream: read from HF or Megatron files, written to Megatron files.

Readers: an HF directory (safetensors, tensor by tensor, in model order) or a Megatron
checkpoint (one pipeline stage at a time, its TP shards merged back to HF tensors). The
Megatron writer writes a stage's files as soon as all of its tensors arrived.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.convert import layout as L
from tunelab.convert.mcore_io import (
    FILE_NAME,
    McoreCheckpoint,
    load_file,
    model_chunks,
    rank_dir_name,
    save_file,
)
from tunelab.convert.mcore_lora import McoreLora
from tunelab.errors import CheckpointError
from tunelab.model.config import ModelConfig

log = logging.getLogger(__name__)

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def hf_layer_keys(dims: L.ModelDims, i: int) -> set[str]:
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

    from tunelab.model.hf import weight_files  # resolves single file / index + shards

    for path in weight_files(Path(load_dir)):
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
                    keys |= hf_layer_keys(self.dims, i)
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
