"""Full-size hub configs parse, and our parameter/FLOP counts match transformers (on meta)."""

from __future__ import annotations

import pytest
import torch

from tunelab.model.config import ModelConfig
from tunelab.model.transformer import Transformer

_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, bos_token_id=128000,
              eos_token_id=128001, vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
              rope_theta=500000.0, max_position_embeddings=131072, torch_dtype="bfloat16")  # fmt: skip
_L3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)  # fmt: skip
_QWEN = dict(hidden_act="silu", rms_norm_eps=1e-6, vocab_size=151936, rope_theta=1000000.0,
             max_position_embeddings=32768, sliding_window=131072, use_sliding_window=False,
             max_window_layers=28, bos_token_id=151643, eos_token_id=151645,
             torch_dtype="bfloat16")  # fmt: skip

# name -> (config.json as on the hub (abridged to the keys that matter), published size)
REAL = {
    "Llama-2-7b": (dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_scaling=None, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2, torch_dtype="float16"), 6_738_415_616),
    "Llama-3.1-8B": (dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          rope_scaling=_L3_SCALING, tie_word_embeddings=False), 8_030_261_248),
    "Llama-3.2-1B": (dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          head_dim=64, rope_scaling=dict(_L3_SCALING, factor=32.0),
                          tie_word_embeddings=True), 1_235_814_400),
    "Qwen2.5-7B": (dict(_QWEN, model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        vocab_size=152064, tie_word_embeddings=False), 7_615_616_512),
    "Qwen2.5-0.5B": (dict(_QWEN, model_type="qwen2", hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          tie_word_embeddings=True), 494_032_768),
    "Qwen3-8B": (dict(_QWEN, model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, attention_bias=False, sliding_window=None,
                      tie_word_embeddings=False), 8_190_735_360),
    "Mistral-7B-v0.3": (dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             vocab_size=32768, max_position_embeddings=32768, rms_norm_eps=1e-5,
                             rope_theta=1000000.0, sliding_window=None, hidden_act="silu",
                             tie_word_embeddings=False, torch_dtype="bfloat16"), 7_248_023_552),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_sizes_match_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw, published = REAL[name]
    cfg = ModelConfig.from_hf(raw)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw))
        ours = Transformer(cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert cfg.num_params() == hf_count == sum(p.numel() for p in ours.parameters())
    if published is not None:
        assert cfg.num_params() == published
    linear = sum(m.weight.numel() for m in ours.modules() if isinstance(m, torch.nn.Linear))
    assert cfg.num_matmul_params() == linear
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == hf_shapes
    assert ModelConfig.from_hf(cfg.to_hf_dict()) == cfg
