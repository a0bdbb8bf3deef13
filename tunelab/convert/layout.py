"""Megatron mcore tensor layouts: parallel splits, QKV/fc1 packing and key names.

Everything here is pure tensor and name logic (no files). Conventions follow
reference/mindspeed-formats.md section 4.3:

- QKV: per query group g, the rows [q heads of g; k_g; v_g]; TP rank r holds whole groups.
- fc1 (SwiGLU): gate and up are each chunked over TP; rank r holds cat(gate_r, up_r).
- Column-parallel weights (embedding, output layer, QKV, fc1) split on dim 0, row-parallel
  weights (linear_proj, linear_fc2) on dim 1, norms are replicated.
- Layer indices inside a file are local to the pipeline stage (or virtual chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunelab.errors import ConfigError

# HF key of a decoder layer (relative to `model.layers.{i}.`) -> mcore local-spec key
# (relative to `decoder.layers.{j}.`), and how it is split over tensor-parallel ranks.
# The QKV and fc1 fusions are handled separately (several HF tensors make one mcore tensor).
_LAYER_SIMPLE: tuple[tuple[str, str, str], ...] = (
    ("input_layernorm.weight", "input_layernorm.weight", "replicated"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", "replicated"),
    ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", "replicated"),
    ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", "replicated"),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", "row"),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight", "row"),
)
_QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_TE_RENAMES_INV = {v: k for k, v in _TE_RENAMES.items()}
QKV = "self_attention.linear_qkv"
FC1 = "mlp.linear_fc1.weight"
# Modules that carry `_extra_state` in a Megatron (local spec) state dict; written as None so
# the key set equals what Megatron's own GPTModel saves and loads strictly.
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)

EMBED_HF, NORM_HF, HEAD_HF = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
EMBED_MG, NORM_MG, HEAD_MG = (
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)


@dataclass(frozen=True)
class ModelDims:
    """The shapes a layout depends on (taken from the HF config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_tp(
        self, tp: int, where: str = "--target-tensor-parallel-size", vocab: bool = True
    ) -> None:
        """Raise if this model cannot be split over ``tp`` tensor-parallel ranks (``vocab``:
        also the vocab, which a Megatron checkpoint may have padded beyond config.json's)."""
        if tp < 1:
            raise ConfigError(f"{where}={tp}: must be >= 1")
        checks = (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads (query groups)", self.num_kv_heads),
            ("intermediate_size", self.ffn_hidden_size),
            ("vocab_size", self.vocab_size if vocab else tp),
        )
        for name, value in checks:
            if value % tp:
                raise ConfigError(
                    f"{where}={tp} does not divide the model's {name}={value}; "
                    f"choose a tensor-parallel size that divides it"
                )


@dataclass(frozen=True)
class ParallelLayout:
    """Which global layers live in which pipeline stage and virtual chunk."""

    tp: int
    pp: int
    # chunks[pp_rank][vchunk] -> global layer range of that model chunk
    chunks: tuple[tuple[range, ...], ...]

    @property
    def vpp(self) -> int:
        return len(self.chunks[0])

    @property
    def num_layers(self) -> int:
        return sum(len(r) for stage in self.chunks for r in stage)

    def has_embedding(self, pp_rank: int, vchunk: int) -> bool:
        return pp_rank == 0 and vchunk == 0

    def has_head(self, pp_rank: int, vchunk: int) -> bool:
        return pp_rank == self.pp - 1 and vchunk == self.vpp - 1

    def describe(self) -> str:
        parts = []
        for p, stage in enumerate(self.chunks):
            layers = ",".join(f"{r.start}-{r.stop - 1}" for r in stage)
            parts.append(f"pp{p}:[{layers}]")
        return f"tp={self.tp} pp={self.pp} vpp={self.vpp} " + " ".join(parts)

    @classmethod
    def build(
        cls,
        num_layers: int,
        tp: int = 1,
        pp: int = 1,
        num_layer_list: Sequence[int] | None = None,
        layers_per_vpp_stage: int | None = None,
    ) -> ParallelLayout:
        """Megatron's assignment of layers to stages, with MindSpeed's --num-layer-list."""
        if pp < 1:
            raise ConfigError(f"--target-pipeline-parallel-size={pp}: must be >= 1")
        if tp < 1:
            raise ConfigError(f"--target-tensor-parallel-size={tp}: must be >= 1")
        if num_layer_list and layers_per_vpp_stage:
            raise ConfigError(
                "--num-layer-list and --num-layers-per-virtual-pipeline-stage cannot be used "
                "together (MindSpeed allows one or the other); drop one of them"
            )
        if num_layer_list:
            counts = [int(n) for n in num_layer_list]
            if len(counts) != pp:
                raise ConfigError(
                    f"--num-layer-list {','.join(map(str, counts))} has {len(counts)} entries "
                    f"but --target-pipeline-parallel-size is {pp}; give one count per stage"
                )
            if any(n < 1 for n in counts):
                raise ConfigError(f"--num-layer-list {counts}: every stage needs >= 1 layer")
            if sum(counts) != num_layers:
                raise ConfigError(
                    f"--num-layer-list {','.join(map(str, counts))} sums to {sum(counts)} but "
                    f"the model has {num_layers} layers"
                )
            starts = [sum(counts[:p]) for p in range(pp)]
            chunks = tuple((range(s, s + n),) for s, n in zip(starts, counts))
            return cls(tp, pp, chunks)
        if num_layers % pp:
            raise ConfigError(
                f"the model's {num_layers} layers do not divide into "
                f"--target-pipeline-parallel-size={pp} equal stages; pass --num-layer-list "
                f"(e.g. {_example_list(num_layers, pp)})"
            )
        per_stage = num_layers // pp
        if not layers_per_vpp_stage:
            return cls(
                tp, pp, tuple((range(p * per_stage, (p + 1) * per_stage),) for p in range(pp))
            )
        if pp < 2:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage needs --target-pipeline-parallel-size "
                ">= 2 (virtual stages interleave over pipeline ranks)"
            )
        if layers_per_vpp_stage < 1 or per_stage % layers_per_vpp_stage:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage={layers_per_vpp_stage} must divide "
                f"the {per_stage} layers of each pipeline stage "
                f"({num_layers} layers / pp {pp})"
            )
        vpp = per_stage // layers_per_vpp_stage
        # Megatron interleaves: chunk c of stage p holds the (c * pp + p)-th block of layers.
        chunks = tuple(
            tuple(
                range((c * pp + p) * layers_per_vpp_stage, (c * pp + p + 1) * layers_per_vpp_stage)
                for c in range(vpp)
            )
            for p in range(pp)
        )
        return cls(tp, pp, chunks)

    @classmethod
    def from_counts(cls, tp: int, counts: Sequence[Sequence[int]]) -> ParallelLayout:
        """Rebuild the layout of an existing checkpoint from its per-file layer counts.

        ``counts[pp_rank][vchunk]`` is the number of layers found in that model chunk; global
        order is chunk-major (all stages' chunk 0, then all stages' chunk 1, ...).
        """
        pp, vpp = len(counts), len(counts[0])
        starts: dict[tuple[int, int], int] = {}
        offset = 0
        for c in range(vpp):
            for p in range(pp):
                starts[(p, c)] = offset
                offset += counts[p][c]
        chunks = tuple(
            tuple(range(starts[(p, c)], starts[(p, c)] + counts[p][c]) for c in range(vpp))
            for p in range(pp)
        )
        return cls(tp, pp, chunks)


def _example_list(num_layers: int, pp: int) -> str:
    base, extra = divmod(num_layers, pp)
    return ",".join(str(base + (1 if p < extra else 0)) for p in range(pp))


# ---------------------------------------------------------------- tensor packing


def pack_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: ModelDims, tp: int
) -> list[torch.Tensor]:
    """HF q/k/v projections (weight [out, h] or bias [out]) -> per-rank mcore linear_qkv."""
    ng, d = dims.num_kv_heads, dims.head_dim
    rest = q.shape[1:]
    qg = q.reshape(ng, dims.heads_per_group * d, *rest)
    kg = k.reshape(ng, d, *rest)
    vg = v.reshape(ng, d, *rest)
    full = torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)
    return [t.clone() for t in full.chunk(tp, dim=0)]


def unpack_qkv(
    ranks: Sequence[torch.Tensor], dims: ModelDims
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank mcore linear_qkv tensors -> HF (q, k, v)."""
    ng, d, hpg = dims.num_kv_heads, dims.head_dim, dims.heads_per_group
    full = torch.cat(list(ranks), dim=0)
    rest = full.shape[1:]
    expected = (dims.num_heads + 2 * ng) * d
    if full.shape[0] != expected:
        raise ValueError(f"linear_qkv has {full.shape[0]} rows, expected {expected}")
    grouped = full.reshape(ng, (hpg + 2) * d, *rest)
    q, k, v = grouped.split([hpg * d, d, d], dim=1)
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def pack_fc1(gate: torch.Tensor, up: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """HF gate/up projections -> per-rank mcore linear_fc1 = cat(gate_r, up_r)."""
    return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]


def unpack_fc1(ranks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    gates, ups = zip(*(t.chunk(2, dim=0) for t in ranks))
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)


def split_tp(t: torch.Tensor, kind: str, tp: int) -> list[torch.Tensor]:
    """Split one tensor for tensor parallelism; clones so each saved rank owns its storage."""
    if kind == "replicated":
        return [t.clone() for _ in range(tp)]
    dim = 0 if kind == "col" else 1
    return [c.clone() for c in t.chunk(tp, dim=dim)]


def merge_tp(ranks: Sequence[torch.Tensor], kind: str, key: str = "") -> torch.Tensor:
    if kind == "replicated":
        first = ranks[0]
        for r, t in enumerate(ranks[1:], start=1):
            if not torch.equal(first, t):
                raise ValueError(f"{key}: replicated tensor differs between TP rank 0 and {r}")
        return first
    return torch.cat(list(ranks), dim=0 if kind == "col" else 1)


# ---------------------------------------------------------------- per-layer conversion


def hf_layer_shapes(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor shapes of one decoder layer (names relative to the layer)."""
    h, d, ffn = dims.hidden_size, dims.head_dim, dims.ffn_hidden_size
    q, kv = dims.num_heads * d, dims.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    if dims.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                       "self_attn.v_proj.bias": (kv,)})  # fmt: skip
    if dims.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    return shapes


def check_shapes(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the first tensor whose shape the config does not predict."""
    for k, t in tensors.items():
        want = shapes.get(k)
        if want is not None and tuple(t.shape) != want:
            raise ValueError(
                f"{k} has shape {tuple(t.shape)} but the config implies {want} "
                "(is the config for these weights?)"
            )


def layer_to_mcore(
    hf: dict[str, torch.Tensor], dims: ModelDims, tp: int, te: bool = False
) -> list[dict[str, torch.Tensor]]:
    """One decoder layer, HF names relative to the layer -> per-rank mcore dicts (relative).

    Raises KeyError naming a missing tensor and ValueError for a tensor left unconverted.
    """
    hf = dict(hf)
    check_shapes(hf, hf_layer_shapes(dims))
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def put(key: str, parts: list[torch.Tensor]) -> None:
        if te:
            key = _TE_RENAMES.get(key, key)
        for r in range(tp):
            out[r][key] = parts[r]

    for kind in ("weight", "bias"):
        names = [f"self_attn.{p}_proj.{kind}" for p in "qkv"]
        present = [n in hf for n in names]
        if kind == "weight" or any(present):
            if not all(present):
                missing = [n for n, ok in zip(names, present) if not ok]
                raise KeyError(", ".join(missing))
            put(f"{QKV}.{kind}", pack_qkv(*(hf.pop(n) for n in names), dims, tp))
    put(FC1, pack_fc1(hf.pop("mlp.gate_proj.weight"), hf.pop("mlp.up_proj.weight"), tp))
    for hf_key, mg_key, kind in _LAYER_SIMPLE:
        if hf_key in hf:
            put(mg_key, split_tp(hf.pop(hf_key), kind, tp))
        elif dims.qk_norm or hf_key not in _QK_NORMS:
            raise KeyError(hf_key)
    if hf:
        raise ValueError(
            f"tensors with no Megatron mcore equivalent: {sorted(hf)} (supported: Llama, "
            "Mistral, Qwen2/2.5/3 dense layers)"
        )
    return out


def layer_from_mcore(ranks: Sequence[dict[str, torch.Tensor]], dims: ModelDims) -> dict:
    """Per-rank mcore dicts of one layer (relative names, local or TE) -> HF (relative)."""
    ranks = [normalize_layer_keys(r) for r in ranks]
    keys = set(ranks[0])
    for r, d in enumerate(ranks[1:], start=1):
        if set(d) != keys:
            diff = sorted(keys.symmetric_difference(d))
            raise ValueError(f"TP rank {r} has different tensors than rank 0: {diff}")
    hf: dict[str, torch.Tensor] = {}
    for kind in ("weight", "bias"):
        key = f"{QKV}.{kind}"
        if key in keys:
            q, k, v = unpack_qkv([d[key] for d in ranks], dims)
            hf[f"self_attn.q_proj.{kind}"] = q
            hf[f"self_attn.k_proj.{kind}"] = k
            hf[f"self_attn.v_proj.{kind}"] = v
            keys.discard(key)
    gate, up = unpack_fc1([d[FC1] for d in ranks])
    hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"] = gate, up
    keys.discard(FC1)
    for hf_key, mg_key, kind in _LAYER_SIMPLE:
        if mg_key in keys:
            hf[hf_key] = merge_tp([d[mg_key] for d in ranks], kind, mg_key)
            keys.discard(mg_key)
    if keys:
        raise ValueError(f"tensors tunelab cannot convert to HF: {sorted(keys)}")
    check_shapes(hf, hf_layer_shapes(dims))
    return hf


def normalize_layer_keys(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TE names -> local names, PEFT `base_layer.` dropped, `_extra_state` entries removed."""
    out = {}
    for k, v in d.items():
        if k.endswith("._extra_state"):
            continue
        k = k.replace(".base_layer.", ".")
        out[_TE_RENAMES_INV.get(k, k)] = v
    return out
