"""Prompt lookup decoding: when the last n tokens occurred before, propose what followed them.

Model-free and cheap, it pays off whenever the output quotes its context (summaries, code edits, RAG).
The index maps every n-gram (min_ngram <= n <= max_ngram) that has a continuation to its latest start
position, and grows with the sequence, so a step costs O(new tokens) rather than a rescan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from leapdecode.checks import check_int
from leapdecode.draft import MAX_EVIDENCE, Draft, match_length
from leapdecode.drafters.base import Drafter, RequestContext, parse_options, register
from leapdecode.errors import LeapError


@dataclass(frozen=True)
class PLDOptions:
    max_ngram: int = 3  # longest n-gram matched first: longer matches predict better
    min_ngram: int = 1  # shortest n-gram tried before giving up
    num_draft: int = 10  # longest chain proposed

    def __post_init__(self):
        for name in ("max_ngram", "min_ngram", "num_draft"):
            check_int(f"pld option {name}", getattr(self, name))
        if self.min_ngram > self.max_ngram:
            raise LeapError(
                f"pld option min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})"
            )

    @classmethod
    def parse(cls, options: dict) -> PLDOptions:
        return parse_options(cls, options, "pld")


@register("pld")
class PromptLookup(Drafter):
    """Chain draft copied from after the latest earlier occurrence of the longest matching suffix n-gram."""

    name = "pld"

    def __init__(self, **options):
        self.options = PLDOptions.parse(options)
        self._reset()

    def _reset(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> latest start with a continuation
        self._len = 0  # len(tokens) at the last sync
        self._last = -1  # tokens[self._len - 1] at the last sync, to detect a different sequence

    def start(self, ctx: RequestContext) -> None:
        self._reset()

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        self._sync(tokens)
        cap = min(self.options.num_draft, max_nodes)
        n_tokens = len(tokens)
        if cap <= 0:
            return Draft(source=self.name)
        for n in range(min(self.options.max_ngram, n_tokens - 1), self.options.min_ngram - 1, -1):
            start = self._index.get(tuple(tokens[n_tokens - n :]))
            if start is not None:
                run = n + match_length(tokens, start, n_tokens - n, MAX_EVIDENCE - n)
                return Draft.chain(list(tokens[start + n : start + n + cap]), source=self.name, match_len=run)
        return Draft(source=self.name)

    def _sync(self, tokens: Sequence[int]) -> None:
        """Index the n-grams ending at positions [old end, len - 2]: the ones that now have a continuation.

        A shorter sequence, or a different token where the last one was, means another sequence: rebuild.
        """
        n_tokens = len(tokens)
        if n_tokens < self._len or (self._len and tokens[self._len - 1] != self._last):
            self._reset()
        lo, hi = self.options.min_ngram, self.options.max_ngram
        index = self._index
        for end in range(max(self._len - 1, 0), n_tokens - 1):  # n-grams ending at `end`
            for n in range(lo, min(hi, end + 1) + 1):
                index[tuple(tokens[end + 1 - n : end + 1])] = end + 1 - n
        self._len = n_tokens
        self._last = tokens[-1] if n_tokens else -1
