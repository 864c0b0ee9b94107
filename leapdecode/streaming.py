"""Token ids -> streamed text, with stop strings that may span several tokens."""

from __future__ import annotations

from leapdecode.model.tokenizer import Tokenizer


class TextStream:
    """Decodes a growing list of ids; emits only text that cannot be the start of a stop string.

    `push(ids)` returns (new text piece, stopped). After a stop, `text` ends just before the stop string.

    Each push decodes a short window, not every id so far (which would make a generation's decoding
    quadratic in its length): the window starts at `_start`, where the push before last settled, and the
    new text is what the window decodes to beyond the text of its settled ids (`_start` to `_read`).
    This gives what the full decode gives for byte-level and SentencePiece tokenizers alike, since both
    decodes start at the same token (whatever its leading-space rule, it applies to both).
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False
        self._decoded = ""  # the text of ids[:_read]
        self._start = self._read = 0

    def _decode_new(self) -> str:
        """The whole text so far, decoding only the window; unchanged while it ends in a partial
        UTF-8 sequence (wait for the next token)."""
        settled, window = self._window()
        if window.endswith("\ufffd") or len(window) < len(settled):
            return self._decoded
        self._decoded += window[len(settled) :]
        self._start, self._read = self._read, len(self.ids)
        return self._decoded

    def push(self, ids: list[int]) -> tuple[str, bool]:
        self.ids.extend(ids)
        before = len(self._decoded)
        full = self._decode_new()
        if len(full) == before and ids:  # nothing decodable yet
            return "", False
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut]), True
        return self._emit(full[: len(full) - self._held_back(full)]), False

    def flush(self) -> str:
        """The rest of the text once generation ends without a stop string (a trailing partial UTF-8
        sequence included, as the full decode writes it)."""
        if self.stopped:
            return ""
        settled, window = self._window()
        return self._emit(self._decoded + window[len(settled) :])

    def _window(self) -> tuple[str, str]:
        """The text of the settled ids of the window, and of the whole window."""
        return self.tokenizer.decode(self.ids[self._start : self._read]), self.tokenizer.decode(
            self.ids[self._start :]
        )

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text) :]
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
