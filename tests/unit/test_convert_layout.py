"""Megatron mcore layout written by `tunelab convert`, checked against expectations written by
hand from reference/mindspeed-formats.md 4.2-4.3 (not derived from the converter's code)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_hf_model
from tunelab.convert.layout import ParallelLayout
from tunelab.convert.megatron import ConvertOptions, convert
from tunelab.errors import ConfigError
from tunelab.model.hf import load_hf_state_dict


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _to_mg(hf: Path, out: Path, **kw) -> Path:
    convert(ConvertOptions("hf", "mg", hf, out, progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def qwen2_hf(tmp_path_factory) -> Path:
    # heads 4, kv groups 2, head_dim 16, hidden 64, ffn 128, vocab 512, tied, qkv bias
    return save_tiny_hf_model(tmp_path_factory.mktemp("q2") / "hf", "qwen2", num_hidden_layers=4)


def test_tp2_pp2_files_keys_shapes_and_values(qwen2_hf, tmp_path):
    mg = _to_mg(qwen2_hf, tmp_path / "mg", tp=2, pp=2)
    hf = load_hf_state_dict(qwen2_hf)
    assert (mg / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    it = mg / "iter_0000001"
    assert sorted(p.name for p in it.iterdir()) == [
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]
    layer_keys = [
        "input_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    for r in range(2):
        for p in range(2):
            obj = _load(it / f"mp_rank_{r:02d}_{p:03d}" / "model_optim_rng.pt")
            assert obj["iteration"] == 1 and obj["checkpoint_version"] == 3.0
            args = obj["args"]
            assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (4, 64, 4)
            assert (args.num_query_groups, args.kv_channels, args.ffn_hidden_size) == (2, 16, 128)
            assert args.tensor_model_parallel_size == 2 and args.pipeline_model_parallel_size == 2
            assert args.add_qkv_bias and not args.untie_embeddings_and_output_weights
            sd = {k: v for k, v in obj["model"].items() if not k.endswith("_extra_state")}
            expected = {f"decoder.layers.{j}.{k}" for j in range(2) for k in layer_keys}
            if p == 0:
                expected.add("embedding.word_embeddings.weight")
            else:
                # tied + PP>1: the last stage has its own copy of the embedding as output weight
                expected |= {"decoder.final_layernorm.weight", "output_layer.weight"}
            assert set(sd) == expected
            for j in range(2):
                i = 2 * p + j  # global layer
                pre, hp = f"decoder.layers.{j}.", f"model.layers.{i}."
                q, k, v = (hf[f"{hp}self_attn.{n}_proj.weight"] for n in "qkv")
                # one query group per rank: [q heads 2r, 2r+1 (32 rows); k_r (16); v_r (16)]
                want_qkv = torch.cat(
                    [q[32 * r : 32 * r + 32], k[16 * r : 16 * r + 16], v[16 * r : 16 * r + 16]]
                )
                assert sd[pre + "self_attention.linear_qkv.weight"].shape == (64, 64)
                assert torch.equal(sd[pre + "self_attention.linear_qkv.weight"], want_qkv)
                qb, kb, vb = (hf[f"{hp}self_attn.{n}_proj.bias"] for n in "qkv")
                want_b = torch.cat(
                    [qb[32 * r : 32 * r + 32], kb[16 * r : 16 * r + 16], vb[16 * r : 16 * r + 16]]
                )
                assert torch.equal(sd[pre + "self_attention.linear_qkv.bias"], want_b)
                o = hf[f"{hp}self_attn.o_proj.weight"]
                assert torch.equal(
                    sd[pre + "self_attention.linear_proj.weight"], o[:, 32 * r : 32 * r + 32]
                )
                gate, up = hf[f"{hp}mlp.gate_proj.weight"], hf[f"{hp}mlp.up_proj.weight"]
                want_fc1 = torch.cat([gate[64 * r : 64 * r + 64], up[64 * r : 64 * r + 64]])
                assert sd[pre + "mlp.linear_fc1.weight"].shape == (128, 64)
                assert torch.equal(sd[pre + "mlp.linear_fc1.weight"], want_fc1)
                down = hf[f"{hp}mlp.down_proj.weight"]
                assert torch.equal(sd[pre + "mlp.linear_fc2.weight"], down[:, 64 * r : 64 * r + 64])
                assert torch.equal(
                    sd[pre + "input_layernorm.weight"], hf[hp + "input_layernorm.weight"]
                )
                assert torch.equal(
                    sd[pre + "pre_mlp_layernorm.weight"], hf[hp + "post_attention_layernorm.weight"]
                )
            emb = hf["model.embed_tokens.weight"][256 * r : 256 * r + 256]
            if p == 0:
                assert torch.equal(sd["embedding.word_embeddings.weight"], emb)
            else:
                assert torch.equal(sd["output_layer.weight"], emb)
                assert torch.equal(sd["decoder.final_layernorm.weight"], hf["model.norm.weight"])
            # each saved tensor owns its storage (no whole-tensor storage behind a TP slice)
            t = sd["decoder.layers.0.mlp.linear_fc2.weight"]
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_tp1_qkv_interleaves_query_groups(qwen2_hf, tmp_path):
    mg = _to_mg(qwen2_hf, tmp_path / "mg")
    sd = _load(mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    hf = load_hf_state_dict(qwen2_hf)
    q, k, v = (hf[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    want = torch.cat([q[0:32], k[0:16], v[0:16], q[32:64], k[16:32], v[16:32]])
    assert torch.equal(sd["decoder.layers.1.self_attention.linear_qkv.weight"], want)
    # PP=1, tied: no output_layer weight (the embedding is the head), as Megatron's GPTModel
    assert "output_layer.weight" not in sd and "output_layer._extra_state" in sd


def test_qwen3_qk_layernorm_and_te_names(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "qwen3")  # head_dim 32
    mg = _to_mg(hf_dir, tmp_path / "mg", tp=2, transformer_impl="transformer_engine")
    hf = load_hf_state_dict(hf_dir)
    for r in range(2):
        sd = _load(mg / "iter_0000001" / f"mp_rank_{r:02d}" / "model_optim_rng.pt")["model"]
        pre = "decoder.layers.0."
        assert torch.equal(
            sd[pre + "self_attention.q_layernorm.weight"],
            hf["model.layers.0.self_attn.q_norm.weight"],
        )
        assert sd[pre + "self_attention.k_layernorm.weight"].shape == (32,)
        assert torch.equal(
            sd[pre + "self_attention.linear_qkv.layer_norm_weight"],
            hf["model.layers.0.input_layernorm.weight"],
        )
        assert torch.equal(
            sd[pre + "mlp.linear_fc1.layer_norm_weight"],
            hf["model.layers.0.post_attention_layernorm.weight"],
        )
        assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in sd)
        # qkv rows per rank: (4 heads + 2*2 groups) * 32 / 2
        assert sd[pre + "self_attention.linear_qkv.weight"].shape == (128, 64)
    back = convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "back", progress=False))
    out = load_hf_state_dict(back)
    assert out.keys() == hf.keys() and all(torch.equal(out[k], hf[k]) for k in hf)


def test_vpp_and_num_layer_list_placement(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "llama2", num_hidden_layers=8)
    hf = load_hf_state_dict(hf_dir)
    mg = _to_mg(hf_dir, tmp_path / "vpp", pp=2, layers_per_vpp_stage=2)
    # Megatron's interleaving: stage 0 holds layers 0-1 (model0) and 4-5 (model1)
    f0 = _load(mg / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt")
    f1 = _load(mg / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt")
    assert "model" not in f0 and set(k for k in f0 if k.startswith("model")) == {"model0", "model1"}
    key = "decoder.layers.{}.mlp.linear_fc2.weight"
    for f, chunk, j, i in [(f0, 0, 1, 1), (f0, 1, 0, 4), (f1, 0, 0, 2), (f1, 1, 1, 7)]:
        assert torch.equal(
            f[f"model{chunk}"][key.format(j)], hf[f"model.layers.{i}.mlp.down_proj.weight"]
        )
    assert "embedding.word_embeddings.weight" in f0["model0"]
    assert "embedding.word_embeddings.weight" not in f0["model1"]
    assert "output_layer.weight" in f1["model1"] and "output_layer.weight" not in f1["model0"]
    mg2 = _to_mg(hf_dir, tmp_path / "list", pp=2, num_layer_list=[3, 5])
    g1 = _load(mg2 / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt")["model"]
    assert torch.equal(g1[key.format(0)], hf["model.layers.3.mlp.down_proj.weight"])
    assert key.format(4) in g1 and key.format(5) not in g1


def test_layout_rules_by_hand():
    lay = ParallelLayout.build(12, pp=3, layers_per_vpp_stage=2)
    assert [list(map(list, s)) for s in lay.chunks] == [
        [[0, 1], [6, 7]],
        [[2, 3], [8, 9]],
        [[4, 5], [10, 11]],
    ]
    assert ParallelLayout.from_counts(1, [[2, 2], [2, 2], [2, 2]]).chunks == lay.chunks
    assert [list(s[0]) for s in ParallelLayout.build(5, pp=2, num_layer_list=[2, 3]).chunks] == [
        [0, 1],
        [2, 3, 4],
    ]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(pp=3), "do not divide into"),
        (dict(pp=2, num_layer_list=[1, 2]), "sums to 3"),
        (dict(pp=2, num_layer_list=[4]), "has 1 entries"),
        (dict(pp=2, num_layer_list=[2, 2], layers_per_vpp_stage=1), "cannot be used together"),
        (dict(pp=1, layers_per_vpp_stage=2), "needs --target-pipeline-parallel-size >= 2"),
        (dict(pp=2, layers_per_vpp_stage=3), "must divide"),
    ],
)
def test_layout_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        ParallelLayout.build(4, **kw)


@pytest.mark.parametrize("tp, match", [(3, "num_attention_heads=4"), (4, "num_key_value_heads")])
def test_tp_must_divide_heads(qwen2_hf, tmp_path, tp, match):
    with pytest.raises(ConfigError, match=match):
        _to_mg(qwen2_hf, tmp_path / "mg", tp=tp)
    assert not (tmp_path / "mg" / "iter_0000001").exists()


def test_layout_equals_megatron_core_layer_offsets():
    """Stage / virtual-chunk layer ranges equal megatron-core's own get_transformer_layer_offset
    and get_num_layers_to_build (uneven: Megatron's first-stage count = a 2-entry layer list)."""
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    cases = [(12, 3, 2, None), (16, 4, 2, None), (16, 2, 1, None), (8, 2, None, None),
             (8, 2, None, [3, 5]), (10, 2, None, [7, 3])]  # fmt: skip
    for num_layers, pp, per_chunk, layer_list in cases:
        lay = ParallelLayout.build(num_layers, pp=pp, num_layer_list=layer_list,
                                   layers_per_vpp_stage=per_chunk)  # fmt: skip
        vpp = lay.vpp if per_chunk else None
        cfg = TransformerConfig(
            num_layers=num_layers, hidden_size=64, num_attention_heads=4,
            pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
            num_layers_in_first_pipeline_stage=layer_list[0] if layer_list else None,
            pipeline_dtype=torch.float32, use_cpu_initialization=True,
        )  # fmt: skip
        for p in range(pp):
            for c in range(lay.vpp):
                vp = c if vpp else None
                start = get_transformer_layer_offset(cfg, vp_stage=vp, pp_rank=p)
                count = get_num_layers_to_build(cfg, vp_stage=vp, pp_rank=p)
                assert lay.chunks[p][c] == range(start, start + count), (num_layers, pp, p, c)
