"""The inference engine: a loaded model + tokenizer, prompts, stops, and batched generation.

Prompts of different lengths are left-padded into one batch (`KVCache` masks the padding and
gives each row its own positions); every row has its own sampling settings and stop rules.
The decode loop lives in `batch.RunningBatch` (rows leave when finished, new requests may
join); `iterate` runs one batch and yields one list of `TokenEvent` per decode step, and
`generate`, `stream` and `complete` are thin layers over it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.infer.sampling import GenerationConfig
from tunelab.infer.text import TextStream

log = logging.getLogger(__name__)


class ContextLengthError(TunelabError):
    """A prompt does not fit the model's context."""


@dataclass
class GenRequest:
    """One sequence to generate. ``cancelled()`` is polled once per decode step."""

    prompt_ids: list[int]
    config: GenerationConfig
    cancelled: Callable[[], bool] | None = None


@dataclass
class TokenEvent:
    """What one decode step produced for request ``index``.

    ``token_id`` is None when the step ended the row without a visible token (a stop token id,
    a cancel). ``text`` is the new text (may be '' while a character is incomplete or a stop
    string is being matched). ``finish_reason`` is "stop", "length" or "cancelled" on the
    row's last event.
    """

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int


@dataclass
class _Row:
    index: int
    request: GenRequest
    stream: TextStream
    stop_ids: frozenset[int]
    max_new: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Engine:
    """A loaded model + tokenizer ready to generate. Build with `Engine.from_pretrained`."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        model_cfg,
        *,
        device: torch.device,
        dtype: torch.dtype,
        prompt_type: str | None = None,
        hf_chat_template: bool = False,
        enable_thinking: bool | None = None,
        defaults: GenerationConfig | None = None,
        eos_token_ids: Sequence[int] = (),
        max_batch_size: int = 16,
        compile: bool = False,
        static_cache: bool | None = None,
        name: str = "model",
    ) -> None:
        if prompt_type and hf_chat_template:
            raise TunelabError(
                "--prompt-type and --hf-chat-template are mutually exclusive: "
                "use the one you trained with"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model_cfg
        self.device = device
        self.dtype = dtype
        self.prompt_type = prompt_type
        self.hf_chat_template = hf_chat_template
        self.enable_thinking = enable_thinking
        self.defaults = defaults or GenerationConfig()
        self.max_batch_size = max_batch_size
        self.name = name
        self.context_len = int(model_cfg.max_position_embeddings)
        self.vocab_size = int(model_cfg.vocab_size)
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.template_stop_ids: frozenset[int] = frozenset()
        if prompt_type or hf_chat_template:
            from tunelab.data.templates import stop_token_ids

            self.template_stop_ids = frozenset(
                stop_token_ids(
                    tokenizer, prompt_type=prompt_type, hf_chat_template=hf_chat_template
                )
            )
        # The compiled decode step needs fixed shapes: a static cache, and finished rows stay
        # in the batch (dropping them would change the batch size).
        self.static_cache = compile if static_cache is None else static_cache
        self._decode_model = torch.compile(model) if compile else model

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        adapter: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        prompt_type: str | None = None,
        hf_chat_template: bool = False,
        *,
        enable_thinking: bool | None = None,
        compile: bool = False,
        static_cache: bool | None = None,
        max_batch_size: int = 16,
        name: str | None = None,
    ) -> Engine:
        """Load an HF directory, a tunelab ``step-N`` checkpoint, optionally + a LoRA adapter."""
        from tunelab.infer.loading import load_for_inference

        loaded = load_for_inference(model_dir, adapter=adapter, dtype=dtype, device=device)
        return cls(
            loaded.model,
            loaded.tokenizer,
            loaded.model_cfg,
            device=loaded.device,
            dtype=loaded.dtype,
            prompt_type=prompt_type,
            hf_chat_template=hf_chat_template,
            enable_thinking=enable_thinking,
            defaults=loaded.defaults,
            eos_token_ids=loaded.eos_token_ids,
            max_batch_size=max_batch_size,
            compile=compile,
            static_cache=static_cache,
            name=name or Path(model_dir).name,
        )

    # ---------------------------------------------------------------- prompts
    @property
    def uses_template(self) -> bool:
        return bool(self.prompt_type or self.hf_chat_template)

    def encode_text(self, text: str) -> list[int]:
        """A raw prompt, with the tokenizer's own special tokens (e.g. Llama's BOS)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(
        self, messages: list[dict], system: str | None = None, tools: list | None = None
    ) -> list[int]:
        """The prompt ids preprocess makes for this conversation, ending where the reply starts."""
        from tunelab.data.templates import render_generation_prompt

        if not self.uses_template:
            raise TunelabError(
                "chat prompts need a template: pass --prompt-type NAME (the one used in "
                "preprocess) or --hf-chat-template"
            )
        return list(
            render_generation_prompt(
                self.tokenizer,
                messages,
                system=system,
                prompt_type=self.prompt_type,
                hf_chat_template=self.hf_chat_template,
                enable_thinking=self.enable_thinking,
                tools=tools,
            )
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stop_ids_for(self, config: GenerationConfig) -> frozenset[int]:
        if config.stop_token_ids is not None:
            return frozenset(int(i) for i in config.stop_token_ids)
        if config.ignore_eos:
            return frozenset()
        return self.eos_token_ids | self.template_stop_ids

    def check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int | None = None) -> None:
        """Raise `ContextLengthError` / `TunelabError` for a prompt that cannot be generated."""
        n = len(prompt_ids)
        if n == 0:
            raise TunelabError("the prompt is empty (0 tokens)")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise TunelabError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if n >= self.context_len:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the model's context is {self.context_len} "
                "tokens (including the reply); shorten the prompt"
            )
        if max_new_tokens is not None and n + max_new_tokens > self.context_len:
            raise ContextLengthError(
                f"the model's context is {self.context_len} tokens, but {n + max_new_tokens} "
                f"were requested ({n} in the prompt, {max_new_tokens} to generate); shorten "
                "the prompt or ask for fewer new tokens"
            )

    # ---------------------------------------------------------------- the core loop
    def _logits_last(self, model, input_ids, position_ids, cache) -> torch.Tensor:
        """Logits of the last position only (never [B, S, vocab] for a long prompt)."""
        hidden = model(input_ids, position_ids, cache=cache, return_hidden=True)
        last = hidden[:, -1]
        head = getattr(self.model, "lm_head", None)
        if head is not None:
            return head(last)
        return torch.nn.functional.linear(last, self.model.model.embed_tokens.weight)

    @torch.inference_mode()
    def iterate(self, requests: Sequence[GenRequest]) -> Iterator[list[TokenEvent]]:
        """Generate all ``requests`` as one batch; yield the events of each decode step."""
        from tunelab.infer.batch import RunningBatch

        if not requests:
            return
        batch = RunningBatch(self, requests)
        while True:
            yield batch.sample()
            if batch.done:
                return
            batch.forward()

    def _advance(self, r: _Row, tok: int) -> TokenEvent:
        """Apply one sampled token to a row; set its finish reason when it ends."""
        req = r.request
        if req.cancelled is not None and req.cancelled():
            r.finish_reason = "cancelled"
            return TokenEvent(r.index, None, "", "cancelled")
        if tok in r.stop_ids:
            r.finish_reason = "stop"
            text = r.stream.finish()
            return TokenEvent(r.index, None, text, "stop")
        r.tokens.append(tok)
        text = r.stream.push(tok)
        if r.stream.stopped:
            r.finish_reason = "stop"
        elif len(r.tokens) >= r.max_new:
            text += r.stream.finish()
            r.finish_reason = "stop" if r.stream.stopped else "length"
        return TokenEvent(r.index, tok, text, r.finish_reason)

    # ---------------------------------------------------------------- conveniences
    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        configs: GenerationConfig | Sequence[GenerationConfig],
    ) -> list[Completion]:
        """Generate every prompt (in batches of ``max_batch_size``); results in input order."""
        if isinstance(configs, GenerationConfig):
            configs = [configs] * len(prompts)
        out: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = [
                GenRequest(list(p), c)
                for p, c in zip(
                    prompts[start : start + self.max_batch_size],
                    configs[start : start + self.max_batch_size],
                )
            ]
            tokens: list[list[int]] = [[] for _ in chunk]
            texts = [""] * len(chunk)
            reasons = ["length"] * len(chunk)
            for events in self.iterate(chunk):
                for ev in events:
                    if ev.token_id is not None:
                        tokens[ev.index].append(ev.token_id)
                    texts[ev.index] += ev.text
                    if ev.finish_reason:
                        reasons[ev.index] = ev.finish_reason
            out.extend(
                Completion(t, s, f, len(req.prompt_ids))
                for t, s, f, req in zip(tokens, texts, reasons, chunk)
            )
        return out

    def generate(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None
    ) -> list[list[int]]:
        """New token ids for each prompt (stop token ids excluded)."""
        return [c.token_ids for c in self.complete(prompts, config or self.defaults)]

    def stream(
        self, prompt_ids: Sequence[int], config: GenerationConfig | None = None
    ) -> Iterator[int]:
        """Yield each new token id of one prompt as soon as it is sampled."""
        for events in self.iterate([GenRequest(list(prompt_ids), config or self.defaults)]):
            for ev in events:
                if ev.token_id is not None:
                    yield ev.token_id

    def stream_text(
        self, prompt_ids: Sequence[int], config: GenerationConfig | None = None
    ) -> Iterator[str]:
        """Yield text deltas of one prompt (UTF-8 safe, stop strings removed)."""
        for events in self.iterate([GenRequest(list(prompt_ids), config or self.defaults)]):
            for ev in events:
                if ev.text:
                    yield ev.text
