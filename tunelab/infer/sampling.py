"""Generation settings and next-token selection (greedy, temperature, top-k, top-p, penalty).

The processing order matches `transformers` (repetition penalty, then temperature, top-k,
top-p), so a seeded run here and there filters the same distribution. Rows of one batch may
carry different settings: the server batches requests that asked for different sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tunelab.errors import ConfigError


@dataclass
class GenerationConfig:
    """How to continue one prompt. ``temperature == 0`` means greedy (top-k/top-p unused).

    ``stop_token_ids=None`` means the engine's defaults (the model's eos ids and the
    template's end-of-turn token); an explicit list replaces them. ``stop`` holds strings
    that end generation; the returned text never contains them.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> GenerationConfig:
        return dataclasses.replace(self, **changes)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Penalize every token id already in the row (prompt or output), as `transformers` does.

    logits [B, V]; seen [B, V] bool; penalty [B] (1.0 = off). Positive logits are divided and
    negative ones multiplied, so a penalty > 1 always lowers the chosen token's probability.
    """
    pen = penalty[:, None].to(logits.dtype)
    scored = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, scored, logits)


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Scale by temperature and mask (to -inf) tokens outside top-k and the top-p nucleus.

    logits [B, V] float32; temperature [B] (> 0); top_k [B] int (0 = off); top_p [B] (1 = off).
    Ties at the k-th value are kept, like `transformers`' TopKLogitsWarper.
    """
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    neg_inf = torch.finfo(logits.dtype).min
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k < vocab).any()):
        sorted_desc = torch.sort(logits, dim=-1, descending=True).values
        kth = sorted_desc.gather(-1, (k - 1)[:, None])  # [B, 1]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if bool((top_p < 1.0).any()):
        # Ascending sort: drop the low tail whose cumulative mass is <= 1 - top_p, always
        # keeping the most likely token (the `transformers` convention).
        sorted_asc, idx = torch.sort(logits, dim=-1)
        cum = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1.0 - top_p)[:, None]
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, neg_inf)
    return logits


class Sampler:
    """Chooses the next token for each row of a batch, each row with its own settings.

    Each sampling row owns a `torch.Generator` seeded from its config (or from torch's global
    RNG when no seed is given), so a seeded request gives the same tokens whatever it was
    batched with (up to floating-point differences in the logits themselves).
    """

    def __init__(
        self, configs: Sequence[GenerationConfig], vocab_size: int, device: torch.device
    ) -> None:
        self.configs = list(configs)
        self.device = device
        self.vocab_size = vocab_size
        n = len(self.configs)
        self.all_greedy = all(c.greedy for c in self.configs)
        self.greedy = torch.tensor([c.greedy for c in self.configs], device=device)
        self.temperature = torch.tensor(
            [c.temperature if not c.greedy else 1.0 for c in self.configs],
            dtype=torch.float32,
            device=device,
        )
        self.top_k = torch.tensor([c.top_k for c in self.configs], dtype=torch.long, device=device)
        self.top_p = torch.tensor(
            [c.top_p for c in self.configs], dtype=torch.float32, device=device
        )
        self.penalty = torch.tensor(
            [c.repetition_penalty for c in self.configs], dtype=torch.float32, device=device
        )
        self.use_penalty = bool((self.penalty != 1.0).any())
        self.seen = (
            torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            if self.use_penalty
            else None
        )
        self.generators = [self._generator(c) for c in self.configs]

    def _generator(self, c: GenerationConfig) -> torch.Generator | None:
        if c.greedy:
            return None
        g = torch.Generator(device=self.device)
        seed = c.seed if c.seed is not None else int(torch.randint(0, 2**62, ()).item())
        g.manual_seed(seed)
        return g

    def add_row(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> None:
        """Append a row (a request joining a running batch)."""
        dev = self.device
        self.configs.append(config)
        self.generators.append(self._generator(config))
        self.all_greedy = self.all_greedy and config.greedy
        self.greedy = torch.cat([self.greedy, torch.tensor([config.greedy], device=dev)])
        temp = config.temperature if not config.greedy else 1.0
        self.temperature = torch.cat([self.temperature, torch.tensor([temp], device=dev)])
        self.top_k = torch.cat([self.top_k, torch.tensor([config.top_k], device=dev)])
        self.top_p = torch.cat([self.top_p, torch.tensor([config.top_p], device=dev)])
        pen = torch.tensor([config.repetition_penalty], device=dev)
        self.penalty = torch.cat([self.penalty, pen])
        if self.seen is None and config.repetition_penalty != 1.0:
            self.seen = torch.zeros(
                len(self.configs) - 1, self.vocab_size, dtype=torch.bool, device=dev
            )
        if self.seen is not None:
            row = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=dev)
            if prompt_ids:
                row[0, torch.as_tensor(list(prompt_ids), device=dev)] = True
            self.seen = torch.cat([self.seen, row])

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (the engine drops finished sequences from the batch)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        self.configs = [self.configs[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        for name in ("greedy", "temperature", "top_k", "top_p", "penalty"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        if self.seen is not None:
            self.seen = self.seen.index_select(0, idx)

    def observe(self, row_tokens: Sequence[Sequence[int]]) -> None:
        """Record prompt tokens (per row) for the repetition penalty."""
        if self.seen is None:
            return
        for row, toks in enumerate(row_tokens):
            if toks:
                self.seen[row, torch.as_tensor(list(toks), device=self.device)] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (any float dtype) -> next token ids [B] (long)."""
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        if self.all_greedy:
            nxt = logits.argmax(dim=-1)
        else:
            filtered = filter_logits(logits, self.temperature, self.top_k, self.top_p)
            probs = filtered.softmax(dim=-1)
            nxt = logits.argmax(dim=-1)
            for row, g in enumerate(self.generators):
                if g is not None:
                    nxt[row] = torch.multinomial(probs[row], 1, generator=g)[0]
        if self.seen is not None:
            self.seen[torch.arange(len(nxt), device=nxt.device), nxt] = True
        return nxt
