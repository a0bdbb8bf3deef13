"""Token-by-token text for streaming: UTF-8-safe incremental decoding and stop strings.

Byte-level BPE splits one character over several tokens, and SentencePiece tokenizers drop a
leading space when a window is decoded alone. `IncrementalDecoder` therefore decodes a short
window that starts before the new tokens and emits only the difference, holding text back
while it ends in an incomplete character (U+FFFD). `StopMatcher` holds back any tail that
could still grow into a stop string, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of generated token ids into text deltas."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes ('' while a character is partial)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back (a partial character at the end is emitted as U+FFFD)."""
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopMatcher:
    """Cuts a text stream at the first stop string, never emitting any part of it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return delta, False
        buf = self._pending + delta
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class TextStream:
    """Decoder + stop strings for one generated sequence; accumulates the final text."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the text delta. After a stop string, `stopped` is True."""
        if self.stopped:
            return ""
        out, self.stopped = self.matcher.feed(self.decoder.push(token_id))
        self.text += out
        return out

    def finish(self) -> str:
        """Flush held-back text at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        out, self.stopped = self.matcher.feed(self.decoder.flush())
        if not self.stopped:
            out += self.matcher.flush()
        self.text += out
        return out
