"""Token ids -> streamed text, with stop strings that may span several tokens."""

from __future__ import annotations

from leapdecode.model.tokenizer import Tokenizer


class TextStream:
    """Decodes a growing list of ids; emits only text that cannot be the start of a stop string.

    `push(ids)` returns (new text piece, stopped). After a stop, `text` ends just before the stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, ids: list[int]) -> tuple[str, bool]:
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut]), True
        return self._emit(full[:len(full) - self._held_back(full)]), False

    def flush(self) -> str:
        """The rest of the text once generation ends without a stop string."""
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text):]
        self.text = upto if len(upto) > len(self.text) else self.text
        return piece

    def _stop_at(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Length of the longest tail of `full` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:k]):
                    best = k
                    break
        return best
