"""One stream's text as its tokens arrive: the part that is stable, emitted as soon as it is.

Rule (`stream`, the server): the text is re-decoded at each token and everything stable is emitted —
every complete character at once, Japanese included (no waiting for a space or a kanji as
transformers' TextStreamer does); only a trailing U+FFFD (a character whose bytes have not all come)
or a trailing whitespace run (the next token may continue it) waits, and with stop strings a tail
that may still become one. The stream's last token (end-of-stream, its max_new_tokens, a stop
string) flushes everything; the text is cut before the first stop string, which is never sent. An
end-of-stream token is not text."""
from __future__ import annotations

from typing import Sequence


class TextFlush:
    def __init__(self, tokenizer, eos_ids: Sequence[int], max_new_tokens: int, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.eos_ids, self.max_new = tokenizer, tuple(eos_ids), max_new_tokens
        self.stops = tuple(stop_strings)
        self.ids: list[int] = []
        self.sent = ""  # the text emitted so far

    def push(self, token: int) -> str:
        """The new stable text after `token` ("" if none)."""
        done = token in self.eos_ids
        if not done:
            self.ids.append(token)
        done = done or len(self.ids) >= self.max_new  # its last token: flush everything
        text = self.tokenizer.decode(self.ids)
        stops = self.stops
        stable = cut_stop(text, stops) if done or _has(text, stops) else hold_stop(text.rstrip(), stops)
        return self.emit(stable.rstrip("\ufffd"))

    def emit(self, stable: str) -> str:
        """What `stable` adds to the text sent so far ("" unless it extends it)."""
        if stable.startswith(self.sent) and len(stable) > len(self.sent):
            new, self.sent = stable[len(self.sent):], stable
            return new
        return ""


def _has(text: str, stops) -> bool:
    return any(x in text for x in stops)


def cut_stop(text: str, stops) -> str:
    """The text before its first stop string, as OpenAI's and vLLM's `stop`: the stream ended at the
    token that completed it (transformers returns the ids with it, which `generate` does too)."""
    at = [text.find(x) for x in stops if x in text]
    return text[: min(at)] if at else text


def hold_stop(text: str, stops) -> str:
    """A growing text without its tail that may still become a stop string (streaming holds it back)."""
    keep = len(text)
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), 0, -1):
            if x.startswith(text[len(text) - k:]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]
