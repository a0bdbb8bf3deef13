"""Exact, faster text -> ids for byte-level BPE tokenizers: a cache of per-word ids.

A byte-level BPE tokenizer (GPT-2, Qwen2/2.5/3, Llama 3, DeepSeek-style single-regex ones)
first splits text with one regex into pre-tokens ("words"), then runs BPE on each word on its
own: a word's ids never depend on its neighbours. Most words of a corpus repeat, so this
encoder splits the text with the same regex (the ``regex`` module speaks the same dialect),
looks each word up in a dict, and hands only words it has never seen to the tokenizer's own
BPE model. The Rust pipeline spends about 1.5 us a word on its regex engine, offsets and
per-token strings; the lookup costs a small fraction of that (numbers in docs/benchmarks.md).

It never guesses. It is used only for tokenizers of exactly these shapes (read from the
backend's own ``tokenizer.json``): a BPE model without dropout; no normalizer or NFC; a
``ByteLevel`` pre-tokenizer with its GPT-2 regex, or one ``Split(Regex, Isolated)`` followed by
``ByteLevel(use_regex=false)``; no prefix space. Anything else returns ``None`` and the caller
keeps the tokenizer's own batch call. Within a supported tokenizer, a text goes through the
tokenizer itself when:
- it contains an added token that strips spaces, matches whole words only or is matched
  after normalization (other added tokens are cut out first, leftmost-longest, as the
  tokenizer does);
- it holds a character whose class (letter, number, space or other) may differ between
  Unicode versions: the Rust regex engine and the ``regex`` module carry different versions
  and disagree on about 17,000 recently assigned code points (checked over all of them: on
  none that ``_stable`` accepts);
- the regex does not cover the whole text (a pattern with gaps).
At construction both ways encode a probe set, and the first texts of the first batch are
encoded both ways too; any difference switches the cache off for good (with a warning).
Set ``TUNELAB_WORD_CACHE=0`` to switch it off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
import weakref
from itertools import chain, filterfalse

logger = logging.getLogger(__name__)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# Every character is a letter, a number, white space or other, and these patterns match a
# run of each class at any position, so their pre-tokens always cover the whole text; other
# patterns are checked text by text.
COVERING_PATTERNS = (GPT2_PATTERN, QWEN2_PATTERN, LLAMA3_PATTERN)
MAX_WORDS = 200_000  # cached words per process (~240 B each: ~50 MB); restarts when full
VERIFY_FIRST = 64  # texts of the first batch also encoded by the tokenizer and compared
# Text whose words rarely repeat (Chinese: a "word" is a whole clause between punctuation) gains
# nothing from the cache and pays its bookkeeping (measured 8% slower): after a batch where
# more than MISS_RATIO of the words were new, SKIP_BATCHES batches go straight to the tokenizer.
# The ratio is judged only once the cache holds JUDGE_AFTER words: a cold cache misses a lot.
MISS_RATIO = 0.5
SKIP_BATCHES = 20
JUDGE_AFTER = 20_000
PROBES = (
    "",
    "Hello world! It's 2024, isn't it? They'll say I'd, you've, we're.",
    "  leading spaces, trailing   \n\n  newlines\r\n\ttabs\t\t and \x0b\x0c odd spaces  ",
    "numbers 1 12 123 1234 12345 3.14159 -7 1e10 0x1F",
    "CAPS'S 'T 'RE punctuation!!! ... ??? --- ((nested)) [x] {y} <z> @#$%^&*",
    "中文文本：你好，世界！这是一个测试。",
    "naïve café résumé Ünïcödé Ελληνικά русский עברית العربية हिन्दी",
    "e\u0301 combining, A\u030a, \u212b angstrom, \ufb01 ligature",
    "emoji 😀👍🏽 and symbols ✓ ★ € £ ¥ ² ½ ٣",
    "\u00a0non-breaking\u3000ideographic\u2028line\u2029para\u0085nel\x1c\x1d",
    "code: def f(x):\n    return x ** 2  # comment\n\n\n",
)


def _byte_chars() -> str:
    """The 256 printable characters byte-level BPE uses for bytes 0..255 (GPT-2's table)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return "".join(chars[b] for b in range(256))


def _stable(c: str) -> bool:
    """Whether every regex engine since Unicode 3.2 puts ``c`` in the same class.

    The split regexes only ask letter (L), number (N) or white space (Z and a few controls).
    A letter, number, space or control must be one since Unicode 3.2; any other assigned
    character (symbols, emoji, marks, punctuation) must not have been one then (it may have
    been unassigned: that is "other" too). Unassigned characters may be letters to a newer
    engine, so they are never stable.
    """
    cat = unicodedata.category(c)
    if cat in ("Cn", "Cs"):
        return False
    old = unicodedata.ucd_3_2_0.category(c)
    if cat[0] in "LNZ" or cat == "Cc":
        return old == cat
    return old[0] not in "LNZ" and old != "Cc"


def plan_of(cfg: dict) -> tuple[str, bool] | str:
    """(split regex, NFC?) for a supported ``tokenizer.json``, or why it is not supported."""
    model = cfg.get("model") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')} is not BPE"
    if model.get("dropout"):
        return "BPE dropout is random"
    norm = cfg.get("normalizer")
    kinds: list = []
    if norm is not None:
        subs = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        kinds = [n.get("type") for n in subs]
        if any(k != "NFC" for k in kinds):
            return f"normalizer {kinds}"
    pre = cfg.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return "the pre-tokenizer does not end in ByteLevel without a prefix space"
    use_regex = steps[-1].get("use_regex", True)
    if len(steps) == 1 and use_regex:
        return GPT2_PATTERN, bool(kinds)
    split = steps[0]
    if (
        len(steps) == 2
        and not use_regex
        and split.get("type") == "Split"
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and "Regex" in (split.get("pattern") or {})
    ):
        return split["pattern"]["Regex"], bool(kinds)
    return f"pre-tokenizer {[s.get('type') for s in steps]}"


class WordCacheEncoder:
    """``encode_many(texts)`` equal to ``backend.encode_batch(texts)`` ids, faster."""

    def __init__(self, backend, pattern: str, nfc: bool):
        import regex

        self.backend = backend
        self.model = backend.model
        compiled = regex.compile(pattern)
        if compiled.groups:
            raise ValueError("the split regex has capturing groups")
        self.split = compiled.findall
        self.covering = pattern in COVERING_PATTERNS
        self.nfc = nfc
        tokens = [t for t in backend.get_added_tokens_decoder().values() if t.content]
        added = sorted({t.content for t in tokens}, key=len, reverse=True)
        alternation = "|".join(map(re.escape, added))
        self.has_added = re.compile(alternation).search if added else None
        # Added tokens are cut out before the regex runs, leftmost-longest, as the tokenizer
        # does. Done here only when no token strips spaces, matches whole words only or is
        # matched after normalization; otherwise a text holding one goes to the tokenizer.
        simple = not getattr(backend, "encode_special_tokens", False) and all(
            not (t.lstrip or t.rstrip or t.single_word or (t.normalized and nfc)) for t in tokens
        )
        self.split_added = re.compile(f"({alternation})").split if added and simple else None
        self.added_ids = {c: [backend.token_to_id(c)] for c in added}
        if any(ids[0] is None for ids in self.added_ids.values()):
            self.split_added = None
        self.bytemap = str.maketrans(dict(enumerate(_byte_chars())))
        self.cache: dict[str, list[int]] = dict(self.added_ids)
        self.safe: set[str] = set()
        self.unsafe: set[str] = set()
        self.enabled = True
        self.verified = False
        self.num_fast = 0
        self.num_slow = 0
        self.skip = 0  # batches left to send straight to the tokenizer
        self.affixes = self._special_affixes()

    @classmethod
    def for_backend(cls, backend) -> WordCacheEncoder | None:
        """The encoder for a ``tokenizers.Tokenizer``, or None where it cannot be exact."""
        if os.environ.get("TUNELAB_WORD_CACHE", "1").lower() in ("0", "false", "no", "off"):
            return None
        if backend.truncation is not None or backend.padding is not None:
            return None
        try:
            plan = plan_of(json.loads(backend.to_str()))
            if isinstance(plan, str):
                logger.debug("word cache off: %s", plan)
                return None
            enc = cls(backend, *plan)
        except Exception as e:  # noqa: BLE001 - an unsupported pattern or tokenizer
            logger.debug("word cache off: %s", e)
            return None
        probes = list(PROBES)
        if enc._encode_fast(probes) != enc._fallback(probes, False):
            logger.warning("word cache off: it disagrees with the tokenizer on the probe texts")
            return None
        return enc

    # ---- pieces ---------------------------------------------------------------------------
    def _special_affixes(self) -> tuple[list[int], list[int]] | None:
        """(ids before, ids after) the text that add_special_tokens=True adds, if constant."""
        b = self.backend
        found = None
        for probe in ("hello world", "x", ""):
            full = b.encode(probe, add_special_tokens=True).ids
            body = b.encode(probe, add_special_tokens=False).ids
            if not body:  # where an empty body sits is ambiguous: check the known cut
                return found if found and full == found[0] + found[1] else None
            for start in range(len(full) - len(body) + 1):
                if full[start : start + len(body)] == body:
                    cut = (full[:start], full[start + len(body) :])
                    break
            else:
                return None
            if found is not None and cut != found:
                return None
            found = cut
        return found

    def _word_ids(self, word: str) -> list[int]:
        mapped = word.encode("utf-8").decode("latin-1").translate(self.bytemap)
        return [t.id for t in self.model.tokenize(mapped)]

    def _words(self, text: str) -> list[str] | None:
        """The pre-tokens of ``text``, or None when the tokenizer must encode it."""
        if not text.isascii():
            chars = set(text)
            if not chars <= self.safe:
                new = chars - self.safe
                if not new.isdisjoint(self.unsafe):
                    return None
                for c in new:
                    (self.safe if _stable(c) else self.unsafe).add(c)
                if not chars <= self.safe:
                    return None
        if self.has_added is None or not self.has_added(text):
            return self._segment_words(text)
        if self.split_added is None:
            return None
        words: list[str] = []
        for j, part in enumerate(self.split_added(text)):
            if j % 2:
                words.append(part)  # an added token: its id is in the cache
            elif part:
                seg = self._segment_words(part)
                if seg is None:
                    return None
                words += seg
        return words

    def _segment_words(self, text: str) -> list[str] | None:
        """Normalize and split a text that holds no added token."""
        if self.nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            if self.has_added is not None and self.has_added(text):
                return None  # normalization made an added token's text: rare, be safe
        words = self.split(text)
        if not self.covering and len("".join(words)) != len(text):
            return None  # the regex left gaps
        return words

    def _encode_fast(self, texts: list[str]) -> list[list[int]]:
        out: list = [None] * len(texts)
        fast_at, fast_words, slow_at = [], [], []
        for i, t in enumerate(texts):
            words = self._words(t)
            if words is None:
                slow_at.append(i)
            else:
                fast_at.append(i)
                fast_words.append(words)
        cache = self.cache
        every = list(chain.from_iterable(fast_words))
        missing = set(filterfalse(cache.__contains__, every))
        if len(cache) >= JUDGE_AFTER and len(missing) > MISS_RATIO * len(every):
            self.skip = SKIP_BATCHES
        if len(cache) + len(missing) > MAX_WORDS:
            cache.clear()
            cache.update(self.added_ids)
            missing = set(filterfalse(cache.__contains__, every))
        for w in missing:
            cache[w] = self._word_ids(w)
        get = cache.__getitem__
        for i, words in zip(fast_at, fast_words):
            out[i] = list(chain.from_iterable(map(get, words)))
        for i, ids in zip(slow_at, self._fallback([texts[i] for i in slow_at], False)):
            out[i] = ids
        self.num_fast += len(fast_at)
        self.num_slow += len(slow_at)
        return out

    # ---- public ---------------------------------------------------------------------------
    def encode_many(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        if not self.enabled:
            return self._fallback(texts, add_special_tokens)
        if add_special_tokens and self.affixes is None:
            return self._fallback(texts, True)
        if self.skip > 0 and self.verified:
            self.skip -= 1
            return self._fallback(texts, add_special_tokens)
        out = self._encode_fast(texts)
        if not self.verified:
            self.verified = True
            head = list(texts[:VERIFY_FIRST])
            if out[: len(head)] != self._fallback(head, False):
                self.enabled = False
                logger.warning(
                    "word cache off: it disagrees with the tokenizer on this data; encoding "
                    "with the tokenizer itself (please report the tokenizer)"
                )
                return self._fallback(texts, add_special_tokens)
        if add_special_tokens:
            before, after = self.affixes
            out = [[*before, *ids, *after] for ids in out]
        return out

    def _fallback(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return backend_ids(self.backend, texts, add_special_tokens)


def backend_ids(backend, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The ids of ``texts`` from a ``tokenizers.Tokenizer``'s own batch call."""
    if not texts:
        return []
    # The "fast" batch call skips character offsets, which nothing here uses.
    fn = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in fn(texts, add_special_tokens=add_special_tokens)]


_FOR_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def word_cache_for(tokenizer) -> WordCacheEncoder | None:
    """The (per-process, per-tokenizer) encoder of an HF fast tokenizer, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return _FOR_TOKENIZER[tokenizer]
    except (KeyError, TypeError):
        pass
    enc = WordCacheEncoder.for_backend(backend)
    try:
        _FOR_TOKENIZER[tokenizer] = enc
    except TypeError:
        pass
    return enc
