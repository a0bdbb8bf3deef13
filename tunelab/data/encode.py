"""Conversation -> ``input_ids`` + ``labels`` with per-turn loss masking (labels not shifted).

Masking rules: prompt-side tokens (system, user, observation/tool, template glue) get -100;
every assistant / function-call turn is supervised, including the token that ends it (eos or
the template's end-of-turn token); ``train_on_prompt`` supervises everything, ``mask_history``
only the last answer; a message with ``train: false`` is never supervised.

Two renderers: a ``--prompt-type`` template (``templates.py``), or ``--hf-chat-template``, which
renders with the tokenizer's own Jinja chat_template. The latter finds each turn's tokens from
*message boundaries*: it renders the conversation cut after each message (and with the
generation prompt before each answer); consecutive renders must extend each other, and each
difference is tokenized on its own. No string is ever searched for in the rendered text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from tunelab.data.formats import (
    ANSWER_ROLES,
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    Conversation,
    Message,
    PairwiseSample,
)
from tunelab.data.templates import Template, get_template, token_id
from tunelab.data.word_cache import backend_ids, word_cache_for
from tunelab.errors import ConfigError, DataError

IGNORE_INDEX = -100
_HF_ROLE = {ASSISTANT: "assistant", FUNCTION: "assistant", OBSERVATION: "tool", "user": "user"}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens before the last answer: what generation is given

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def tokenize_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Batched text -> ids: through the word cache where it applies, else the fast backend's
    batch call, else the (slow) tokenizer itself."""
    if not texts:
        return []
    words = word_cache_for(tokenizer)
    if words is not None:
        return words.encode_many(texts, add_special_tokens)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend_ids(backend, texts, add_special_tokens)
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


class _TokenizeFn:
    """Batched text -> ids without special tokens, and the ids of constant template text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.const_cache: dict[str, list[int]] = {}

    def many(self, texts: list[str]) -> list[list[int]]:
        return tokenize_batch(self.tokenizer, texts, add_special_tokens=False)


class Encoder:
    """Encodes conversations for one tokenizer and one rendering choice; batch-friendly."""

    def __init__(
        self,
        tokenizer,
        prompt_type: str | None = None,
        hf_chat_template: bool = False,
        enable_thinking: bool | None = None,
        train_on_prompt: bool = False,
        mask_history: bool = False,
        append_eod: bool = False,
    ):
        if prompt_type and hf_chat_template:
            raise ConfigError("--prompt-type and --hf-chat-template exclude each other; pick one")
        if not prompt_type and not hf_chat_template:
            raise ConfigError(
                "instruction data needs a template: pass --prompt-type NAME or --hf-chat-template"
            )
        self.tokenizer = tokenizer
        self.tok = _TokenizeFn(tokenizer)
        self.template: Template | None = get_template(prompt_type) if prompt_type else None
        self.hf = hf_chat_template
        if self.hf and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "--hf-chat-template: the tokenizer has no chat_template; use --prompt-type"
            )
        self.enable_thinking = enable_thinking
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.append_eod = append_eod
        self.num_history_unsupervised = 0  # hf conversations where only the last turn could split
        if self.template is not None:
            eos = self.template.eos_token(tokenizer)
            if eos is None:
                raise ConfigError(f"--prompt-type {prompt_type}: the tokenizer has no eos token")
            self.eos_id = token_id(tokenizer, eos, self.template.name)
            self._special = {("eos",): self.eos_id}
            bos = tokenizer.bos_token_id
            self._special[("bos",)] = bos  # None: dropped, like a tokenizer without BOS
        else:
            self.eos_id = tokenizer.eos_token_id
        self.eod_id = self.eos_id

    # ---- supervision --------------------------------------------------------------------
    def _trained(self, msg: Message, t: int, last: int) -> bool:
        return msg.train and (not self.mask_history or t == last)

    # ---- prompt-type path -----------------------------------------------------------------
    def _ids_of(self, elements, table: dict[str, list[int]]) -> list[int]:
        out: list[int] = []
        for e in elements:
            kind = e[0]
            if kind == "text":
                out += table[e[1]]
            elif kind == "const":
                out += self.tok.const_cache[e[1]]
            elif kind == "token":
                out.append(token_id(self.tokenizer, e[1], self.template.name))
            else:
                tid = self._special[e]
                if tid is not None:
                    out.append(tid)
        return out

    def _template_pairs(self, convs: list[Conversation]) -> list[list[tuple]]:
        """Render and tokenize many conversations with one batched tokenizer call."""
        rendered = [self.template.render(c, self.enable_thinking) for c in convs]
        texts: dict[str, None] = {}
        consts: dict[str, None] = {}
        for pairs in rendered:
            for src, tgt, _ in pairs:
                for e in (*src, *tgt):
                    if e[0] == "text":
                        texts[e[1]] = None
                    elif e[0] == "const" and e[1] not in self.tok.const_cache:
                        consts[e[1]] = None
        for s, ids in zip(consts, self.tok.many(list(consts))):
            self.tok.const_cache[s] = ids
        table = dict(zip(texts, self.tok.many(list(texts))))
        return [
            [(self._ids_of(src, table), self._ids_of(tgt, table), msg) for src, tgt, msg in pairs]
            for pairs in rendered
        ]

    def _assemble(self, pairs: list[tuple]) -> Encoded:
        ids: list[int] = []
        labels: list[int] = []
        last = len(pairs) - 1
        efficient = self.template is not None and self.template.efficient_eos
        prompt_len = 0
        prev_trained = False
        for t, (src, tgt, msg) in enumerate(pairs):
            trained = self._trained(msg, t, last)
            src_labels = list(src) if self.train_on_prompt else [IGNORE_INDEX] * len(src)
            if efficient and t > 0 and src and prev_trained:
                # The previous answer's eos is learned at the first token after it.
                src_labels[0] = self.eos_id
            ids += src
            labels += src_labels
            if t == last:
                prompt_len = len(ids)
            ids += tgt
            labels += list(tgt) if trained else [IGNORE_INDEX] * len(tgt)
            prev_trained = trained
        if efficient:
            ids.append(self.eos_id)
            labels.append(self.eos_id if prev_trained else IGNORE_INDEX)
        if self.append_eod and self.eod_id is not None:
            ids.append(self.eod_id)
            labels.append(self.eod_id if prev_trained else IGNORE_INDEX)
        return Encoded(ids, labels, prompt_len)

    # ---- hf chat_template path ------------------------------------------------------------
    def _hf_render(self, msgs: list[dict], generation: bool, tools) -> str:
        kwargs = {}
        if tools:
            kwargs["tools"] = tools
        if self.enable_thinking is not None:
            kwargs["enable_thinking"] = self.enable_thinking
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation, **kwargs
        )

    def _hf_boundaries(self, conv: Conversation, upto: int, final_generation: bool):
        """Rendered prefixes: (text, answer index or None) for messages[:upto]."""
        base = [{"role": "system", "content": conv.system}] if conv.system else []
        hf = [{"role": _HF_ROLE[m.role], "content": m.content} for m in conv.messages]
        tools = None
        if conv.tools:
            try:
                tools = json.loads(conv.tools)
            except json.JSONDecodeError:
                tools = None
            if isinstance(tools, dict):
                tools = [tools]
        marks: list[tuple[str, int | None]] = []
        for j in range(upto):
            if conv.messages[j].role in ANSWER_ROLES:
                marks.append((self._hf_render(base + hf[:j], True, tools), None))
                marks.append((self._hf_render(base + hf[: j + 1], False, tools), j))
            else:
                marks.append((self._hf_render(base + hf[: j + 1], False, tools), None))
        if final_generation:
            marks.append((self._hf_render(base + hf[:upto], True, tools), None))
        return marks, base, hf, tools

    @staticmethod
    def _chain_ok(texts: list[str]) -> bool:
        return all(b.startswith(a) for a, b in zip(texts, texts[1:]))

    def _hf_pieces(self, conv: Conversation, generation: bool) -> list[tuple[str, int | None]]:
        """Text pieces in order, each tagged with the answer index it belongs to (or None)."""
        n = len(conv.messages)
        upto = n if not generation else n - 1  # generation: the final answer is a placeholder
        marks, base, hf, tools = self._hf_boundaries(conv, upto, generation)
        texts = [""] + [m[0] for m in marks]
        if self._chain_ok(texts):
            return [(b[len(a) :], m[1]) for a, b, m in zip(texts, texts[1:], marks)]
        # The template re-renders earlier turns (e.g. drops old reasoning): only the prompt
        # before the last answer and that answer can be told apart.
        if generation:
            return [(self._hf_render(base + hf[:upto], True, tools), None)]
        prompt = self._hf_render(base + hf[: n - 1], True, tools)
        full = self._hf_render(base + hf, False, tools)
        if not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat_template does not render the prompt as a prefix of the "
                "conversation, so turns cannot be masked; use --prompt-type"
            )
        self.num_history_unsupervised += 1
        return [(prompt, None), (full[len(prompt) :], n - 1)]

    def _encode_hf(self, conv: Conversation) -> Encoded:
        try:
            pieces = self._hf_pieces(conv, generation=False)
        except DataError:
            raise
        except Exception as e:  # jinja errors raised by the model's own template
            raise DataError(f"the tokenizer's chat_template failed on this row: {e}") from None
        toks = self.tok.many([p[0] for p in pieces])
        ids: list[int] = []
        labels: list[int] = []
        last_answer = len(conv.messages) - 1
        answers = [j for j, m in enumerate(conv.messages) if m.role in ANSWER_ROLES]
        turn_of = {j: t for t, j in enumerate(answers)}
        prompt_len = 0
        for (_, owner), piece in zip(pieces, toks):
            if owner is None:
                labels += list(piece) if self.train_on_prompt else [IGNORE_INDEX] * len(piece)
            else:
                if owner == last_answer:
                    prompt_len = len(ids)
                msg = conv.messages[owner]
                trained = self._trained(msg, turn_of[owner], len(answers) - 1)
                labels += list(piece) if trained else [IGNORE_INDEX] * len(piece)
            ids += piece
        if self.append_eod and self.eod_id is not None:
            ids.append(self.eod_id)
            labels.append(self.eod_id if conv.messages[-1].train else IGNORE_INDEX)
        return Encoded(ids, labels, prompt_len)

    # ---- public -------------------------------------------------------------------------
    def encode_batch(self, convs: list[Conversation]) -> list[Encoded]:
        if self.template is not None:
            return [self._assemble(p) for p in self._template_pairs(convs)]
        return [self._encode_hf(c) for c in convs]

    def encode(self, conv: Conversation) -> Encoded:
        return self.encode_batch([conv])[0]

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """Ids of everything before the final answer of ``conv`` (its content is ignored)."""
        if self.template is not None:
            pairs = self._template_pairs([conv])[0]
            out: list[int] = []
            for src, tgt, _ in pairs[:-1]:
                out += src + tgt
            return out + pairs[-1][0]
        try:
            pieces = self._hf_pieces(conv, generation=True)
        except Exception as e:
            raise ConfigError(f"the tokenizer's chat_template failed: {e}") from None
        return [i for ids in self.tok.many([p[0] for p in pieces]) for i in ids]

    def encode_pairwise(self, samples: list[PairwiseSample]) -> list[tuple[Encoded, Encoded]]:
        """Prompt + chosen and prompt + rejected, each a full conversation encoding."""
        convs: list[Conversation] = []
        for s in samples:
            for ans in (s.chosen, s.rejected):
                convs.append(
                    Conversation([*s.prompt.messages, ans], s.prompt.system, s.prompt.tools)
                )
        enc = self.encode_batch(convs)
        return [(enc[2 * i], enc[2 * i + 1]) for i in range(len(samples))]


def encode_pretrain(
    tokenizer,
    texts: list[str],
    append_eod: bool,
    pad_to_multiple_of: int = 1,
    pad_id: int | None = None,
) -> list[np.ndarray]:
    """Pretraining text -> ids with the tokenizer's own special tokens (BOS for Llama-like)."""
    all_ids = tokenize_batch(tokenizer, texts, add_special_tokens=True)
    eod = tokenizer.eos_token_id
    out = []
    for ids in all_ids:
        if not ids:
            out.append(np.zeros(0, np.int64))
            continue
        arr = list(ids)
        if pad_to_multiple_of > 1:
            # As MindSpeed: pad to the next multiple (a full extra block when already a
            # multiple), leaving room for the eod when it is appended.
            total = (len(arr) // pad_to_multiple_of + 1) * pad_to_multiple_of
            n_pad = total - len(arr) - (1 if append_eod else 0)
            arr += [pad_id] * n_pad
        if append_eod and eod is not None:
            arr.append(eod)
        out.append(np.asarray(arr, dtype=np.int64))
    return out
