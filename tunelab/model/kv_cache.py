"""Preallocated per-layer key/value cache for batched generation with left padding.

API (the inference engine builds on exactly this)::

    cache = KVCache(cfg, batch_size, max_seq_len, dtype, device)

    # Prefill: prompts LEFT-padded to a common length S0. ``attention_mask`` [B, S0] is 1 for
    # real tokens, 0 for padding. ``cache.prefill_position_ids`` gives HF-compatible positions.
    cache.set_prompt_padding(attention_mask)             # fills key_padding_mask[:, :S0]
    pos = cache.prefill_position_ids(attention_mask)     # [B, S0], pads get position 1
    logits = model(input_ids, pos, cache=cache)          # writes K/V at slots [0, S0)
    # Decode: one (or more) new tokens per row; positions continue per row.
    next_pos = pos[:, -1:] + 1
    logits = model(next_ids[:, None], next_pos, cache=cache)   # writes slot S0, S0+1, ...

Fields:
- ``k[layer]``, ``v[layer]``: ``[B, num_kv_heads, max_seq_len, head_dim]`` in ``dtype``.
- ``seq_len`` (int): number of slots already written, identical for all rows (left padding
  keeps rows aligned). A forward with ``S`` tokens writes slots ``[seq_len, seq_len + S)`` in
  every layer, and the model then advances ``seq_len`` by ``S``.
- ``key_padding_mask``: bool ``[B, max_seq_len]``, True where a slot holds a real token. It is
  True everywhere after construction; the engine marks padding slots False (directly or with
  :meth:`set_prompt_padding`). Slots written by decode steps stay True.

A query in slot ``i`` attends to slot ``j`` when ``j <= i`` and ``key_padding_mask[b, j]``
(and ``i - j < cfg.sliding_window`` for sliding-window models whose cache is longer than the
window: the model then calls ``attention_mask(n_new, window=...)``, so a subclass that
overrides ``attention_mask`` must accept ``window``).
``position_ids`` only drive the rotary embedding (no document masking with a cache); pass the
per-row positions (for left padding: ``cumsum(mask) - 1``), or None for ``seq_len + arange``
(correct when there is no padding). Exceeding ``max_seq_len`` raises ``ValueError``.
:meth:`reset` empties the cache for reuse; :meth:`select_rows` keeps a subset of rows (e.g.
to drop finished sequences).
"""

from __future__ import annotations

import torch

from tunelab.model.attention import AttentionMask
from tunelab.model.config import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.batch_size = int(batch_size)
        self.max_seq_len = int(max_seq_len)
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.k = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)
        ]
        self.key_padding_mask = torch.ones(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.seq_len = 0

    def reset(self) -> None:
        self.seq_len = 0
        self.key_padding_mask.fill_(True)

    def set_prompt_padding(self, attention_mask: torch.Tensor) -> None:
        """Mark the left padding of a prompt batch: ``attention_mask`` [B, S0], 1 = real token.
        Call before the prefill forward, with an empty cache."""
        s0 = attention_mask.shape[1]
        if s0 > self.max_seq_len:
            raise ValueError(
                f"prompt length {s0} exceeds the cache's max_seq_len {self.max_seq_len}"
            )
        self.key_padding_mask[:, :s0] = attention_mask.to(self.device, torch.bool)

    @staticmethod
    def prefill_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions for a left-padded prompt batch, as transformers computes them."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 1)

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only ``rows`` (indices into the batch), e.g. after some sequences finished."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]
        self.key_padding_mask = self.key_padding_mask.index_select(0, idx)
        self.batch_size = int(idx.numel())

    # ---------------------------------------------------------------- used by the model
    def default_position_ids(self, batch: int, n_new: int) -> torch.Tensor:
        pos = torch.arange(self.seq_len, self.seq_len + n_new, device=self.device)
        return pos.expand(batch, n_new)

    def attention_mask(self, n_new: int, window: int | None = None) -> AttentionMask:
        """Dense SDPA mask [B, 1, n_new, seq_len + n_new] for the next forward. ``window``
        (sliding-window models; the model passes it only when the cache is longer than the
        window): a query in slot i also needs ``i - j < window``."""
        start, end = self.seq_len, self.seq_len + n_new
        if end > self.max_seq_len:
            raise ValueError(f"KV cache full: {end} tokens exceed max_seq_len {self.max_seq_len}")
        q_slot = torch.arange(start, end, device=self.device)[:, None]
        k_slot = torch.arange(end, device=self.device)[None, :]
        allowed = (k_slot <= q_slot)[None] & self.key_padding_mask[:, None, :end]
        if window is not None:
            allowed = allowed & (q_slot - k_slot < window)[None]
        # A padding query sees only itself, so its (ignored) row never becomes all -inf / NaN.
        allowed = allowed | (k_slot == q_slot)[None]
        return AttentionMask("sdpa", dense=allowed[:, None])

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's K/V ([B, Hkv, S, D]) at ``seq_len``; return all valid slots."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        self.k[layer_idx][:, :, start:end] = k.to(self.dtype)
        self.v[layer_idx][:, :, start:end] = v.to(self.dtype)
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.seq_len += int(n)
