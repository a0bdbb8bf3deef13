"""KV cache: left-padded batched greedy decoding equals transformers ``generate``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_hf_model, tiny_hf_model
from tunelab.model.hf import load_model
from tunelab.model.kv_cache import KVCache

PAD = 0


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _greedy(model, ids, mask, new_tokens):
    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + new_tokens, torch.float32, "cpu")
    cache.set_prompt_padding(mask)
    pos = KVCache.prefill_position_ids(mask)
    out = []
    with torch.no_grad():
        logits = model(ids, pos, cache=cache)
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            pos = pos[:, -1:] + 1
            logits = model(nxt[:, None], pos, cache=cache)
    assert cache.seq_len == ids.shape[1] + new_tokens
    return torch.stack(out, dim=1)


@pytest.mark.parametrize(
    "family, overrides",
    [("qwen2", {}), ("llama3", {}), ("qwen3", {}), ("mistral", {"sliding_window": 6})],
)
def test_left_padded_greedy_equals_transformers_generate(family, overrides, tmp_path):
    d = save_tiny_hf_model(tmp_path / family, family, **overrides)
    ours, hf = load_model(d), tiny_hf_model(family, **overrides)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 11, 1, 8)]
    ids, mask = _left_pad(prompts)
    new = 12
    ref = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
        eos_token_id=None, pad_token_id=PAD,
    )[:, ids.shape[1] :]  # fmt: skip
    assert torch.equal(_greedy(ours, ids, mask, new), ref)


def test_cached_logits_equal_uncached(tiny_hf_dir):
    model = load_model(tiny_hf_dir)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 32, torch.float32, "cpu")
        parts = [model(ids[:, :9], cache=cache)]
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids, cache=cache)
    cache.select_rows([1])
    assert cache.k[0].shape[0] == 1 and cache.key_padding_mask.shape == (1, 32)
    cache.reset()
    assert cache.seq_len == 0
