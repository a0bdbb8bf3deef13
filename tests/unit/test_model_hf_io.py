"""HF load/save: bit-exact round trips, sharding, AutoModel compatibility, errors (must-show 3)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.model import random_ids
from tests.helpers.tiny_models import save_tiny_hf_model
from tunelab.errors import CheckpointError, ConfigError
from tunelab.model.config import ModelConfig
from tunelab.model.hf import load_hf_state_dict, load_model, save_hf


def test_save_load_bit_exact_and_loads_in_transformers(tiny_hf_dir, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = load_model(tiny_hf_dir)
    out = save_hf(ours, ours.config, tmp_path / "out", tokenizer_dir=tiny_tokenizer_dir)
    src, dst = load_hf_state_dict(tiny_hf_dir), load_hf_state_dict(out)
    assert set(src) == set(dst) and "lm_head.weight" not in dst  # tied: dropped like HF
    for k in src:
        assert torch.equal(src[k], dst[k]), k
    for f in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    again = load_model(out)
    ids = random_ids(2, 24)
    hf = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        a, b, c = ours(ids), again(ids), hf(ids, use_cache=False).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama3", "qwen2_untied"])
def test_sharded_round_trip_bf16(family, tmp_path):
    src = save_tiny_hf_model(tmp_path / "src", family)
    ours = load_model(src, dtype="bf16")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    out = save_hf(ours, ours.config, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_model(out)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    sd_a, sd_b = ours.state_dict(), back.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    fp32 = save_hf(back, back.config, tmp_path / "fp32", dtype="float32")
    assert load_hf_state_dict(fp32)["model.norm.weight"].dtype == torch.float32


def test_checkpoint_errors_name_the_key(tiny_hf_dir, tmp_path):
    from safetensors.torch import save_file

    sd = load_hf_state_dict(tiny_hf_dir)
    cfg = ModelConfig.from_hf(tiny_hf_dir)
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    d = tmp_path / "missing"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(d)
    bad = dict(sd, **{"model.layers.0.extra.weight": torch.zeros(2)})
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight"):
        load_model(d)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(3)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(d)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "nothing_here")


def test_unsupported_configs_are_errors():
    base = ModelConfig.from_hf(
        dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8,
             num_hidden_layers=1, num_attention_heads=2)
    )  # fmt: skip
    raw = base.to_hf_dict()
    with pytest.raises(ConfigError, match="llama, qwen2, qwen3, mistral"):
        ModelConfig.from_hf(dict(raw, model_type="gpt2"))
    with pytest.raises(ConfigError, match="default, linear, llama3"):
        ModelConfig.from_hf(
            dict(raw, rope_scaling={"type": "yarn", "factor": 4.0}, rope_parameters=None)
        )
    raw.pop("layer_types")
    mixed = dict(raw, num_hidden_layers=2, use_sliding_window=True, sliding_window=16)
    with pytest.raises(ConfigError, match="only some layers"):
        ModelConfig.from_hf(dict(mixed, max_window_layers=1))
    assert ModelConfig.from_hf(dict(mixed, max_window_layers=0)).sliding_window == 16
    assert ModelConfig.from_hf(dict(mixed, max_window_layers=2)).sliding_window is None
    mistral = dict(raw, model_type="mistral", max_position_embeddings=64)
    assert ModelConfig.from_hf(dict(mistral, sliding_window=16)).sliding_window == 16
    assert ModelConfig.from_hf(dict(mistral, sliding_window=64)).sliding_window is None
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf(dict(raw, hidden_act="gelu"))
