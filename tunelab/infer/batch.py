"""A batch being decoded, which new requests can join between steps (continuous batching).

All rows share one write position in the `KVCache` (left padding keeps them aligned). A new
request is prefilled on its own and spliced in as an extra row whose prompt ends exactly at
the shared position; if its prompt is longer than the tokens decoded so far, every row's
slots are shifted right first (the shift is masked padding; rotary positions are per row and
already applied, so nothing else changes). Rows that finish leave the batch.

With a static cache (the compiled decode path) the batch keeps its shape: finished rows stay
and nobody joins, so the compiled graph is reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tunelab.infer.sampling import Sampler
from tunelab.infer.text import TextStream
from tunelab.model.kv_cache import KVCache

if TYPE_CHECKING:
    from tunelab.infer.engine import Engine, GenRequest, TokenEvent, _Row


INITIAL_DECODE_SLOTS = 256


def _pad_slots(cache: KVCache, front: int, back: int) -> None:
    """Grow every row by ``front`` masked slots before and ``back`` empty slots after."""
    if not front and not back:
        return
    for layer in range(len(cache.k)):
        for store in (cache.k, cache.v):
            t = store[layer]
            b, h, _, d = t.shape
            parts = [t.new_zeros(b, h, front, d), t, t.new_zeros(b, h, back, d)]
            store[layer] = torch.cat(parts, dim=2)
    m = cache.key_padding_mask
    cache.key_padding_mask = torch.cat(
        [m.new_zeros(m.shape[0], front), m, m.new_ones(m.shape[0], back)], dim=1
    )
    cache.max_seq_len += front + back
    cache.seq_len += front


class RunningBatch:
    """Prefill ``requests`` as one left-padded batch; then alternate `sample` and `forward`."""

    @torch.inference_mode()
    def __init__(self, engine: Engine, requests: Sequence[GenRequest]) -> None:
        self.engine = engine
        self.next_index = 0
        rows = [self._new_row(req) for req in requests]
        lens = [len(r.request.prompt_ids) for r in rows]
        width, steps, batch = max(lens), max(r.max_new for r in rows), len(rows)
        dev = engine.device
        input_ids = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, width - lens[b] :] = torch.tensor(r.request.prompt_ids, dtype=torch.long)
            mask[b, width - lens[b] :] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        # The last sampled token is never fed back, so width + steps - 1 slots suffice. The
        # dynamic cache starts smaller and grows on demand: a request that may run to the end
        # of a long context must not reserve all of it up front.
        num_slots = width + steps - 1
        if engine.static_cache:
            from tunelab.infer.static_cache import StaticKVCache

            # Round up so a compiled decode step is reused across similar requests.
            num_slots = -(-num_slots // 128) * 128
            self.cache: KVCache = StaticKVCache(engine.cfg, batch, num_slots, engine.dtype, dev)
        else:
            num_slots = min(num_slots, width + INITIAL_DECODE_SLOTS)
            self.cache = KVCache(engine.cfg, batch, num_slots, engine.dtype, dev)
        self.cache.set_prompt_padding(mask)
        pos = KVCache.prefill_position_ids(mask)
        self.sampler = Sampler([r.request.config for r in rows], engine.vocab_size, dev)
        self.sampler.observe([r.request.prompt_ids for r in rows])
        self.logits = engine._logits_last(engine.model, input_ids, pos, self.cache)
        if engine.static_cache:
            self.cache.freeze()
        self.last_pos = pos[:, -1]
        self.active: list[_Row] = rows
        self._nxt: list[int] = []

    def _new_row(self, req: GenRequest) -> _Row:
        from tunelab.infer.engine import _Row

        eng = self.engine
        eng.check_prompt(req.prompt_ids)
        max_new = min(req.config.max_new_tokens, eng.context_len - len(req.prompt_ids))
        row = _Row(
            self.next_index,
            req,
            TextStream(eng.tokenizer, req.config.stop),
            eng.stop_ids_for(req.config),
            max_new,
        )
        self.next_index += 1
        return row

    @property
    def done(self) -> bool:
        return all(r.finish_reason is not None for r in self.active)

    @torch.inference_mode()
    def sample(self) -> list[TokenEvent]:
        """Choose each row's next token; return the events (finished rows emit nothing)."""
        self._nxt = self.sampler(self.logits).tolist()
        eng = self.engine
        return [
            eng._advance(r, tok)
            for r, tok in zip(self.active, self._nxt)
            if r.finish_reason is None
        ]

    @torch.inference_mode()
    def forward(self) -> None:
        """Drop finished rows (dynamic cache only) and run the next decode step."""
        keep = [i for i, r in enumerate(self.active) if r.finish_reason is None]
        nxt = self._nxt
        if len(keep) < len(self.active) and not self.engine.static_cache:
            self.cache.select_rows(keep)
            self.sampler.select_rows(keep)
            self.last_pos = self.last_pos.index_select(
                0, torch.tensor(keep, device=self.engine.device)
            )
            self.active = [self.active[i] for i in keep]
            nxt = [nxt[i] for i in keep]
        self._reserve_next_slot()
        self.last_pos = self.last_pos + 1
        step_ids = torch.tensor(nxt, dtype=torch.long, device=self.engine.device)[:, None]
        eng = self.engine
        self.logits = eng._logits_last(
            eng._decode_model, step_ids, self.last_pos[:, None], self.cache
        )

    def _remaining_feeds(self) -> int:
        """Most tokens any unfinished row may still feed to the model (one per step)."""
        return max(
            (r.max_new - len(r.tokens) for r in self.active if r.finish_reason is None), default=0
        )

    def _reserve_next_slot(self) -> None:
        """Grow the dynamic cache (doubling, up to what the rows can still use) when full."""
        cache = self.cache
        if cache.seq_len < cache.max_seq_len:
            return
        assert not self.engine.static_cache, "the static cache is allocated in full"
        target = min(2 * cache.max_seq_len, cache.seq_len + self._remaining_feeds())
        _pad_slots(cache, 0, max(target, cache.seq_len + 1) - cache.max_seq_len)

    # ---------------------------------------------------------------- joining
    def can_join(self, req: GenRequest, max_batch_size: int) -> bool:
        """True when ``req`` fits: dynamic cache, room in the batch, and the slots the batch
        may need would not grow past the model's context (a newcomer that would force that
        waits for the next batch instead)."""
        if self.engine.static_cache or self.done or len(self.active) >= max_batch_size:
            return False
        p = len(req.prompt_ids)
        max_new = min(req.config.max_new_tokens, self.engine.context_len - p)
        front = max(0, p - self.cache.seq_len)
        now = self.cache.seq_len + self._remaining_feeds()
        after = self.cache.seq_len + front + max(self._remaining_feeds(), max_new)
        return after <= max(now, self.engine.context_len)

    @torch.inference_mode()
    def join(self, req: GenRequest) -> int:
        """Prefill ``req`` alone and add it as a new row; returns its event index."""
        eng, cache = self.engine, self.cache
        row = self._new_row(req)
        p, dev = len(req.prompt_ids), eng.device
        solo = KVCache(eng.cfg, 1, p, eng.dtype, dev)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=dev)
        pos = torch.arange(p, device=dev)[None]
        logits = eng._logits_last(eng.model, ids, pos, solo)
        _pad_slots(cache, max(0, p - cache.seq_len), 0)
        t, total = cache.seq_len, cache.max_seq_len
        for layer in range(len(cache.k)):
            for store, src in ((cache.k, solo.k), (cache.v, solo.v)):
                t_ = store[layer]
                new = t_.new_zeros(1, t_.shape[1], total, t_.shape[3])
                new[:, :, t - p : t] = src[layer][:, :, :p]
                store[layer] = torch.cat([t_, new], dim=0)
        mask = torch.zeros(1, total, dtype=torch.bool, device=dev)
        mask[:, t - p :] = True
        cache.key_padding_mask = torch.cat([cache.key_padding_mask, mask], dim=0)
        cache.batch_size += 1
        self.sampler.add_row(req.config, req.prompt_ids)
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)], dim=0)
        self.last_pos = torch.cat([self.last_pos, torch.tensor([p - 1], device=dev)])
        self.active.append(row)
        return row.index
