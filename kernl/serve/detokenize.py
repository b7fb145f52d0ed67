"""Token ids to text as they come, for streaming: each new token's text, and stop strings.

Decoding the whole completion at every token costs O(n²); decoding from a few tokens back does not, but a
token's text can depend on the tokens before it (a leading space dropped at the start of a text, a character
split over two byte tokens). So, as vLLM does, two texts are decoded from the same earlier offset, without and
with the new tokens, and the difference is the new text; a text that ends in an incomplete character (U+FFFD)
waits for the next token.

Stop strings: the text is cut before the first stop string, which ends the completion; text that could still be
the start of one is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    """add(token) -> new text; finish() -> the rest. stopped tells whether a stop string ended the text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # decode from here...
        self.read = 0  # ...the text up to here is already in self.text
        self.text = ""  # every text decoded so far
        self.sent = 0  # how much of self.text was returned
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that token adds and that can be sent now (empty while it is incomplete or held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and after.startswith(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text not sent yet, when the completion ends (complete or not)."""
        if not self.stopped and self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix : self.read])
            after = self.tokenizer.decode(self.ids[self.prefix :])
            self.text += after[len(before) :] if after.startswith(before) else after
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            # A stop string may end in the text sent before: look from hold characters back.
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final or not self.stop else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out
