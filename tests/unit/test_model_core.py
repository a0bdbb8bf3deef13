"""Config round trips and sizes, init, backends, pipeline-stage path, checkpointing, compile."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.model import packed_position_ids, random_ids
from tests.helpers.tiny_models import FAMILIES, tiny_hf_config, tiny_hf_model
from tunelab.errors import ConfigError
from tunelab.model.config import ModelConfig
from tunelab.model.hf import load_hf_state_dict, save_hf
from tunelab.model.init import build_from_scratch, init_weights
from tunelab.model.transformer import Transformer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trip_and_param_count(family):
    from transformers import AutoConfig

    hf_cfg = tiny_hf_config(family)
    cfg = ModelConfig.from_hf(hf_cfg)
    again = ModelConfig.from_hf(cfg.to_hf_dict())
    assert again == cfg
    # What we write is read back by transformers with the same meaning.
    hf_again = AutoConfig.for_model(**cfg.to_hf_dict())
    assert hf_again.rope_parameters["rope_type"] == hf_cfg.rope_parameters["rope_type"]
    assert hf_again.rope_parameters["rope_theta"] == hf_cfg.rope_parameters["rope_theta"]
    hf_model = tiny_hf_model(family)
    assert cfg.num_params() == sum(p.numel() for p in hf_model.parameters())
    ours = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in ours.parameters())
    assert {k for k, _ in ours.named_parameters()} == {k for k, _ in hf_model.named_parameters()}


def test_flops_and_matmul_params():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen2"))
    linear = sum(
        m.weight.numel() for m in Transformer(cfg).modules() if isinstance(m, torch.nn.Linear)
    )
    assert cfg.num_matmul_params() == linear
    assert cfg.flops_per_token(128) == 6 * linear + 6 * 2 * 64 * 128


def test_legacy_rope_keys_and_llama3_parity():
    raw = tiny_hf_config("llama3").to_dict()
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    with pytest.raises(ConfigError, match="supported"):
        ModelConfig.from_hf(dict(raw, rope_scaling={"type": "dynamic", "factor": 2.0}))


def test_init_is_seeded_and_scaled():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama2", num_hidden_layers=8, hidden_size=128))
    a, b = build_from_scratch(cfg, seed=3), build_from_scratch(cfg, seed=3)
    c = init_weights(Transformer(cfg), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    std = sa["model.layers.0.mlp.up_proj.weight"].std().item()
    out_std = sa["model.layers.0.mlp.down_proj.weight"].std().item()
    assert abs(std - 0.02) < 0.002 and abs(out_std - 0.02 / math.sqrt(16)) < 0.001
    assert torch.equal(sa["model.norm.weight"], torch.ones(128))
    tied = build_from_scratch(ModelConfig.from_hf(tiny_hf_config("qwen2")))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.model.layers["0"].self_attn.q_proj.bias.abs().sum() == 0


def test_flex_backend_forward_equals_sdpa_on_cpu():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3"))
    model = build_from_scratch(cfg, seed=1).requires_grad_(False)  # no flex backward on CPU
    pos = packed_position_ids([[30, 50, 60], [140]])  # not a multiple of flex's block size
    ids = random_ids(2, 140)
    with torch.no_grad():
        sdpa = model(ids, pos)
        causal = model(ids)
        model.set_attn_backend("flex")
        flex = model(ids, pos)
        flex_causal = model(ids)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex_causal, causal, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="sdpa, flex, flash"):
        model.set_attn_backend("xformers")
    model.requires_grad_(True)
    with pytest.raises(ConfigError, match="no backward pass on CPU"):
        model.loss(ids, ids, pos)


def test_pipeline_stage_path_hidden_in_hidden_out():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen2", num_hidden_layers=4))
    full = build_from_scratch(cfg, seed=2)
    ids, pos = random_ids(2, 24), packed_position_ids([[10, 14], [24]])
    first, last = build_from_scratch(cfg, seed=2), build_from_scratch(cfg, seed=2)
    for name in ("2", "3"):
        del first.model.layers[name]
    for name in ("0", "1"):
        del last.model.layers[name]
    first.model.norm = first.lm_head = None
    last.model.embed_tokens = None
    with torch.no_grad():
        hidden = first(ids, pos, labels=ids)  # labels are ignored without lm_head
        assert hidden.shape == (2, 24, 64)
        torch.testing.assert_close(last(hidden, pos), full(ids, pos))
        torch.testing.assert_close(last.loss(hidden, ids, pos)[0], full.loss(ids, ids, pos)[0])
    assert "model.layers.3.mlp.up_proj.weight" in dict(last.named_parameters())


def test_activation_checkpointed_blocks_give_equal_grads(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = ModelConfig.from_hf(tiny_hf_config("llama3"))
    ref, ckpt = build_from_scratch(cfg, seed=0), build_from_scratch(cfg, seed=0)
    for name in list(ckpt.model.layers.keys()):
        ckpt.model.layers[name] = checkpoint_wrapper(ckpt.model.layers[name])
    ids, pos = random_ids(2, 16), packed_position_ids([[6, 10], [16]])
    for m in (ref, ckpt):
        m.loss(ids, ids, pos)[0].backward()
    g_ref = [p.grad for p in ref.parameters()]
    g_ck = [p.grad for p in ckpt.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g_ck))
    # Saving a wrapped model writes plain HF names.
    out = save_hf(ckpt, cfg, tmp_path / "hf")
    assert set(load_hf_state_dict(out)) == set(ref.state_dict()) - {"lm_head.weight"}


@pytest.mark.slow
def test_blocks_work_under_torch_compile():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen2", num_hidden_layers=1))
    model = build_from_scratch(cfg, seed=0)
    ids, pos = random_ids(2, 16), packed_position_ids([[6, 10], [16]])
    eager_loss, _ = model.loss(ids, ids, pos)
    for name in list(model.model.layers.keys()):
        model.model.layers[name] = torch.compile(model.model.layers[name], fullgraph=True)
    compiled_loss, _ = model.loss(ids, ids, pos)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)


def test_repeated_kv_heads_equal_native_gqa():
    import torch.nn.functional as F

    from tunelab.model.attention import _repeat_kv

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 10, 16, generator=g) for h in (8, 2, 2))
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    native = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(q, _repeat_kv(k, 8), _repeat_kv(v, 8), attn_mask=mask)
    torch.testing.assert_close(native, repeated)


def _reference_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window_size=(-1, -1)):
    """flash-attn's documented varlen semantics in plain PyTorch: q/k/v are [total, heads, D],
    sequences are cut at ``cu_seqlens``, GQA by head groups, window (left, right) on top of
    causal."""
    import torch.nn.functional as F

    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = e - s
        i = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= i[None, :] <= i[:, None]
        if window_size[0] >= 0:
            allowed &= i[:, None] - i[None, :] <= window_size[0]
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(rep, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(rep, 0)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed).transpose(0, 1)
    return out


@pytest.mark.parametrize("window", [None, 9])
def test_flash_varlen_glue_with_reference_kernel(monkeypatch, window):
    import sys
    import types

    import tunelab.model.attention as attention

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = _reference_flash_varlen
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attention, "flash_available", lambda: True)
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3")).replace(sliding_window=window)
    model = build_from_scratch(cfg, seed=5)
    pos = packed_position_ids([[7, 20, 13], [40]])
    ids = random_ids(2, 40)
    with torch.no_grad():
        sdpa = model(ids, pos)
        sdpa_plain = model(ids)
        model.set_attn_backend("flash")
        with pytest.raises(ConfigError, match="needs bf16 or fp16"):
            model(ids, pos)
        # The reference kernel runs in any dtype; let fp32 through to compare exactly.
        monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float32,))
        flash = model(ids, pos)
        flash_plain = model(ids)
    torch.testing.assert_close(flash, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flash_plain, sdpa_plain, rtol=1e-5, atol=1e-5)
