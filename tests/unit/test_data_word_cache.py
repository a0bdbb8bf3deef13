"""The word cache (tunelab/data/word_cache.py) gives exactly the tokenizer's own ids.

Three byte-level BPE shapes are built here with `tokenizers` (GPT-2's ByteLevel regex; Qwen2's
NFC + Split + ByteLevel; Llama 3's Split with ignore_merges) and every one encodes a random
corpus of ASCII, whitespace runs, contractions, digits, CJK, combining marks, emoji, added
tokens and characters assigned after Unicode 3.2, both ways, with equal ids.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    processors,
    trainers,
)
from tokenizers import pre_tokenizers as pre

from tunelab.data import word_cache
from tunelab.data.word_cache import WordCacheEncoder, plan_of

# As transformers' Qwen2Tokenizer and Llama 3's tokenizer.json write them.
QWEN2 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see.",
    "Hello world!!! numbers 123 4567 89, a+b=c. CAPS'S DON'T",
    "你好，世界。这是一个测试。 naïve café résumé Ελληνικά русский",
    "def f(x):\n    return x ** 2  # comment\n\n\tend",
] * 20
POOL = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" " * 12 + "\n\n\t\r\x0b\x0c\x1c\x85\xa0\u3000\u2028")
    + list(".,;:!?'\"()[]{}<>@#$%^&*-_=+/\\|~`")
    + ["'s", "'S", "'ll", "'T", "\u2019s"]
    + list("你好世界中文测试éèüñÅ")
    + ["e\u0301", "A\u030a", "\u212b", "\ufb01"]
    + ["😀", "👍🏽", "★", "€", "²", "½", "٣", "\u0558", "\u088f", "\u1e9e", "\U0001fae8"]
    + SPECIALS
    + ["<|im_end", "|>", "<|"]
)


@pytest.fixture(autouse=True)
def never_skip(monkeypatch):
    """Random text repeats few words, which would send batches to the tokenizer (see the
    last test); these tests are about the cached path, so it stays on."""
    monkeypatch.setattr(word_cache, "MISS_RATIO", 2.0)


def _build(kind: str, added_lstrip: bool = False, bos: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    if kind == "gpt2":
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pattern = QWEN2 if kind == "qwen2" else LLAMA3
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Split(Regex(pattern), behavior="isolated", invert=False),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN, trainer=trainer)
    if added_lstrip:
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    return tok


def _corpus(n: int, seed: int = 0, extra: tuple = ()) -> list[str]:
    rng = random.Random(seed)
    pool = POOL + list(extra)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def _reference(tok: Tokenizer, texts: list[str], special: bool = False) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=special)]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llama3"])
def test_equal_to_the_tokenizer_on_a_random_corpus(kind):
    tok = _build(kind)
    enc = WordCacheEncoder.for_backend(tok)
    assert enc is not None
    texts = _corpus(3000, seed=1)
    for i in range(0, len(texts), 500):  # several batches: the cache is reused
        batch = texts[i : i + 500]
        assert enc.encode_many(batch) == _reference(tok, batch)
    assert enc.enabled
    # Most texts took the cached path; those with post-3.2 characters did not.
    assert enc.num_fast > 0.5 * len(texts) and enc.num_slow > 0
    assert enc.encode_many(["\u0558 new", "plain ascii"]) == _reference(
        tok, ["\u0558 new", "plain ascii"]
    )


def test_added_tokens_are_cut_out_like_the_tokenizer_does():
    tok = _build("qwen2")
    enc = WordCacheEncoder.for_backend(tok)
    texts = [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|><|im_end|><|im_end",
        "x<|endoftext|>y <|im_start|> z",
        "<|im_end|>",
    ]
    before = enc.num_slow
    assert enc.encode_many(texts) == _reference(tok, texts)
    assert enc.num_slow == before  # all on the cached path


def test_added_token_that_strips_spaces_goes_to_the_tokenizer():
    tok = _build("gpt2", added_lstrip=True)
    enc = WordCacheEncoder.for_backend(tok)
    texts = ["a  <mask> b", "no mask here", "<|im_end|> x"]
    assert enc.encode_many(texts) == _reference(tok, texts)
    assert enc.num_slow >= 2  # every text holding any added token


def test_special_tokens_added_around_the_text():
    tok = _build("llama3", bos=True)
    enc = WordCacheEncoder.for_backend(tok)
    assert enc.affixes == ([0], [])
    texts = _corpus(200, seed=2) + [""]
    assert enc.encode_many(texts, add_special_tokens=True) == _reference(tok, texts, True)


def test_small_cache_restarts_and_stays_exact(monkeypatch):
    monkeypatch.setattr(word_cache, "MAX_WORDS", 50)
    tok = _build("qwen2")
    enc = WordCacheEncoder.for_backend(tok)
    texts = _corpus(400, seed=3)
    for i in range(0, len(texts), 40):
        assert enc.encode_many(texts[i : i + 40]) == _reference(tok, texts[i : i + 40])


@pytest.mark.parametrize(
    "change",
    [
        lambda t: setattr(t, "pre_tokenizer", pre.Metaspace()),
        lambda t: setattr(t, "pre_tokenizer", pre.ByteLevel(add_prefix_space=True)),
        lambda t: setattr(t, "normalizer", normalizers.Lowercase()),
        lambda t: setattr(t, "pre_tokenizer", pre.Sequence([pre.Digits(True), pre.ByteLevel()])),
        lambda t: t.enable_truncation(8),
    ],
)
def test_unsupported_shapes_keep_the_tokenizer(change):
    tok = _build("gpt2")
    change(tok)
    assert WordCacheEncoder.for_backend(tok) is None


def test_plan_reads_the_tokenizer_json():
    import json

    assert plan_of(json.loads(_build("gpt2").to_str())) == (word_cache.GPT2_PATTERN, False)
    assert plan_of(json.loads(_build("qwen2").to_str())) == (QWEN2, True)
    cfg = json.loads(_build("gpt2").to_str())
    cfg["model"]["dropout"] = 0.1
    assert "dropout" in plan_of(cfg)


def test_a_disagreement_switches_the_cache_off(monkeypatch):
    tok = _build("gpt2")
    monkeypatch.setattr(WordCacheEncoder, "_word_ids", lambda self, w: [7])
    assert WordCacheEncoder.for_backend(tok) is None  # the probe texts catch it
    monkeypatch.undo()
    enc = WordCacheEncoder.for_backend(tok)
    enc.cache["zzzq"] = [7]  # a wrong entry the probes cannot see
    texts = ["zzzq zzzq", "plain"]
    assert enc.encode_many(texts) == _reference(tok, texts)  # the first batch is checked
    assert not enc.enabled


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("TUNELAB_WORD_CACHE", "0")
    assert WordCacheEncoder.for_backend(_build("gpt2")) is None


def test_preprocess_output_is_byte_identical_with_and_without(tmp_path, monkeypatch):
    from tests.helpers.data import write_jsonl
    from tunelab.cli import main as cli
    from tunelab.demo.tokenizer import build_bpe_tokenizer

    tok_dir = tmp_path / "tok"
    build_bpe_tokenizer(tok_dir, TRAIN, vocab_size=400)
    rng = random.Random(4)
    rows = [
        {
            "instruction": "".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))),
            "input": "".join(rng.choice(POOL) for _ in range(rng.randint(0, 20))),
            "output": "".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))),
        }
        for _ in range(300)
    ]
    inp = write_jsonl(tmp_path / "a.jsonl", rows)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("TUNELAB_WORD_CACHE", flag)
        prefix = tmp_path / f"out{flag}"
        args = ["preprocess", "--input", str(inp), "--tokenizer-name-or-path", str(tok_dir)]
        args += ["--output-prefix", str(prefix), "--handler-name", "alpaca"]
        assert cli([*args, "--prompt-type", "qwen", "--workers", "2"]) == 0
        outs[flag] = {
            f: (tmp_path / f"out{flag}_packed_{f}_document.bin").read_bytes()
            for f in ("input_ids", "labels", "attention_mask")
        }
    assert outs["1"] == outs["0"]


def test_a_pattern_with_gaps_sends_those_texts_to_the_tokenizer():
    tok = _build("gpt2")
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(r"\p{L}+|\s+"), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    enc = WordCacheEncoder.for_backend(tok)
    assert enc is not None and not enc.covering
    texts = ["only letters and spaces", "digits 123 and, punctuation!"] + _corpus(300, seed=5)
    assert enc.encode_many(texts) == _reference(tok, texts)
    assert enc.num_fast >= 1 and enc.num_slow >= 1


def test_text_whose_words_do_not_repeat_goes_to_the_tokenizer_for_a_while(monkeypatch):
    monkeypatch.setattr(word_cache, "MISS_RATIO", 0.5)
    monkeypatch.setattr(word_cache, "JUDGE_AFTER", 0)
    tok = _build("qwen2")
    enc = WordCacheEncoder.for_backend(tok)
    rng = random.Random(6)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    clauses = [
        "".join(rng.choice(han) for _ in range(rng.randint(4, 20))) + "，" for _ in range(4000)
    ]
    batch = ["".join(clauses[i : i + 8]) for i in range(0, 4000, 8)]
    assert enc.encode_many(batch[:100]) == _reference(tok, batch[:100])
    assert enc.skip == word_cache.SKIP_BATCHES  # nearly every clause was new
    fast = enc.num_fast
    assert enc.encode_many(batch[100:200]) == _reference(tok, batch[100:200])
    assert enc.num_fast == fast and enc.skip == word_cache.SKIP_BATCHES - 1
    english = _corpus(50, seed=7)
    enc.skip = 1
    enc.encode_many(english)  # the last skipped batch
    assert enc.encode_many(english) == _reference(tok, english)  # the cache is back
    assert enc.num_fast > fast
