"""Streaming text: UTF-8-safe incremental decoding and stop strings."""

from __future__ import annotations

import pytest

from tunelab.infer.text import IncrementalDecoder, StopMatcher, TextStream

TEXTS = [
    "Über café naïve 你好，世界 🙂 — unicode round trips.",
    "def add(a, b):\n    return a + b\n",
    "🙂🙂 emoji 🙂 and 你好",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tiny_tokenizer)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tiny_tokenizer.decode(ids) == text
    # No delta ever shows half a character.
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_are_skipped(tiny_tokenizer):
    ids = tiny_tokenizer("hi<|im_end|>", add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tiny_tokenizer)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "hi"


def test_partial_character_at_the_end_is_flushed(tiny_tokenizer):
    ids = tiny_tokenizer("a🙂", add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tiny_tokenizer)
    out = "".join(dec.push(i) for i in ids[:-1])
    assert "\ufffd" not in out
    assert out + dec.flush() == tiny_tokenizer.decode(ids[:-1])


def _feed_chars(matcher, text):
    out, stopped = "", False
    for ch in text:
        piece, stopped = matcher.feed(ch)
        out += piece
        if stopped:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize(
    "text,stops,expected,stopped",
    [
        ("hello ### world", ["###"], "hello ", True),
        ("hello ## world", ["###"], "hello ## world", False),
        ("abcab", ["abd"], "abcab", False),
        ("x\nUser: hi", ["\nUser:", "\n\n"], "x", True),
        ("aaab", ["aab"], "a", True),
        ("tail #", ["##"], "tail #", False),
    ],
)
def test_stop_strings_char_by_char(text, stops, expected, stopped):
    assert _feed_chars(StopMatcher(stops), text) == (expected, stopped)


def test_stop_string_in_one_delta():
    m = StopMatcher(["STOP", "ST"])
    assert m.feed("aSTOPb") == ("a", True)


def test_text_stream_stops_across_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    ts = TextStream(tiny_tokenizer, stops=["brown"])
    pieces = []
    for i in ids:
        pieces.append(ts.push(i))
        if ts.stopped:
            break
    pieces.append(ts.finish())
    assert ts.stopped and ts.text == "".join(pieces) == "The quick "
