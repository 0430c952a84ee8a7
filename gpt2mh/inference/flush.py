"""One stream's text as its tokens arrive: the part that is stable, emitted as soon as it is.

Rule (`stream`, the server): the text is re-decoded at each token and everything stable is emitted —
every complete character at once, Japanese included (no waiting for a space or a kanji as
transformers' TextStreamer does); only a trailing U+FFFD (a character whose bytes have not all come)
or a trailing whitespace run (the next token may continue it) waits. An end-of-stream token is not
text."""
from __future__ import annotations

from typing import Sequence


class TextFlush:
    def __init__(self, tokenizer, eos_ids: Sequence[int]):
        self.tokenizer, self.eos_ids = tokenizer, tuple(eos_ids)
        self.ids: list[int] = []
        self.sent = ""  # the text emitted so far

    def push(self, token: int) -> str:
        """The new stable text after `token` ("" if none)."""
        done = token in self.eos_ids
        if not done:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return self._emit((text if done else text.rstrip()).rstrip("\ufffd"))

    def finish(self, text: str) -> str:
        """The rest of `text`, the stream's final text (whitespace or U+FFFD held back at the end)."""
        return self._emit(text)

    def _emit(self, stable: str) -> str:
        if stable.startswith(self.sent) and len(stable) > len(self.sent):
            new, self.sent = stable[len(self.sent):], stable
            return new
        return ""
