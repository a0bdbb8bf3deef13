"""A KV cache with fixed shapes for decoding, so `torch.compile` builds one graph for all steps.

`KVCache` hands attention only the slots written so far (``[:seq_len]``), so every decode
step has a new key length and a compiled model would recompile (or go dynamic). After the
prefill, `StaticKVCache.freeze()` switches to static mode: the write position is a tensor,
K/V are written with ``index_copy_`` and attention always sees the whole buffer, with slots
beyond the current one masked. Prefill itself runs in the ordinary (dynamic) mode. The model
code is unchanged: it only calls `update`, `attention_mask` and `advance`.
"""

from __future__ import annotations

import torch

from tunelab.model.attention import AttentionMask
from tunelab.model.kv_cache import KVCache


class StaticKVCache(KVCache):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static = False
        self.slot = torch.zeros((), dtype=torch.long, device=self.device)
        self._slots = torch.arange(self.max_seq_len, device=self.device)

    def freeze(self) -> None:
        """Enter static mode at the current position (call after the prefill)."""
        self.slot.fill_(self.seq_len)
        self.static = True

    def attention_mask(self, n_new: int, window: int | None = None) -> AttentionMask:
        if not self.static:
            return super().attention_mask(n_new, window=window)
        assert n_new == 1, "static mode decodes one token per step"
        allowed = self.key_padding_mask & (self._slots <= self.slot)  # [B, T]
        if window is not None:
            # Sliding-window models: the query in `slot` also needs slot - k_slot < window.
            allowed = allowed & (self.slot - self._slots < window)
        return AttentionMask("sdpa", dense=allowed[:, None, None, :])

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if not self.static:
            return super().update(layer_idx, k, v)
        idx = self.slot.view(1)
        self.k[layer_idx].index_copy_(2, idx, k.to(self.dtype))
        self.v[layer_idx].index_copy_(2, idx, v.to(self.dtype))
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, n: int) -> None:
        if self.static:
            self.slot.add_(n)  # in place: the compiled graph sees the same tensor every step
        self.seq_len += int(n)
