"""CopySpec (arXiv 2502.08923): when the last gamma tokens repeat earlier text, copy what followed.

Unlike pld it matches one longer n-gram (fewer false matches) and copies longer runs, which pays off in
chats and agent loops that re-emit earlier turns verbatim. Its index outlives a request: when the next
request's prompt extends the previous context (a chat's next turn), only the new tokens are indexed; on
divergence the index is cut back to the common prefix rather than rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from leapdecode.checks import check_int
from leapdecode.draft import MAX_EVIDENCE, Draft, match_length
from leapdecode.drafters.base import Drafter, RequestContext, parse_options, register
from leapdecode.sequences import common_prefix


@dataclass(frozen=True)
class CopyOptions:
    gamma: int = 4  # tokens that must match: one more than pld's longest n-gram, for longer confident copies
    max_copy: int = 32  # longest run copied

    def __post_init__(self):
        for name in ("gamma", "max_copy"):
            check_int(f"copy option {name}", getattr(self, name))

    @classmethod
    def parse(cls, options: dict) -> CopyOptions:
        return parse_options(cls, options, "copy")


@register("copy")
class CopySpec(Drafter):
    """Chain draft copied from after the latest earlier occurrence of the last `gamma` tokens."""

    name = "copy"

    def __init__(self, **options):
        self.options = CopyOptions.parse(options)
        self._seq: list[int] = []  # the context indexed so far (kept across requests)
        self._index: dict[tuple[int, ...], list[int]] = {}  # gamma-gram -> ascending starts
        self._starts = 0  # grams starting before this are indexed (all that have a continuation)

    def start(self, ctx: RequestContext) -> None:
        self._sync(ctx.prompt_ids, full_check=True)

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        self._sync(tokens)
        gamma, seq = self.options.gamma, self._seq
        cap = min(self.options.max_copy, max_nodes)
        if cap <= 0 or len(seq) <= gamma:
            return Draft(source=self.name)
        starts = self._index.get(tuple(seq[-gamma:]))
        if not starts:
            return Draft(source=self.name)
        begin = starts[-1] + gamma
        run = gamma + match_length(seq, starts[-1], len(seq) - gamma, MAX_EVIDENCE - gamma)
        return Draft.chain(seq[begin : begin + cap], source=self.name, match_len=run)

    def _sync(self, tokens: Sequence[int], full_check: bool = False) -> None:
        """Make the index describe `tokens`: extend it, after cutting it back where the two diverge.

        Between steps the last indexed token is enough to notice a different sequence; a new request
        compares the whole prefix once.
        """
        n = len(self._seq)
        if full_check or len(tokens) < n or (n and tokens[n - 1] != self._seq[-1]):
            self._truncate(common_prefix(self._seq, tokens))
        self._seq.extend(tokens[len(self._seq) :])
        self._index_new()

    def _index_new(self) -> None:
        """Index the grams that gained a continuation: starts up to len - gamma - 1."""
        gamma, seq, index = self.options.gamma, self._seq, self._index
        for s in range(self._starts, len(seq) - gamma):
            gram = tuple(seq[s : s + gamma])
            starts = index.get(gram)
            if starts is None:
                index[gram] = [s]
            else:
                starts.append(s)
        self._starts = max(self._starts, len(seq) - gamma)

    def _truncate(self, length: int) -> None:
        """Forget tokens from `length` on; grams whose continuation is gone go, newest first."""
        gamma, seq, index = self.options.gamma, self._seq, self._index
        keep = max(length - gamma, 0)  # starts that keep a continuation
        if keep == 0:
            index.clear()
        else:
            for s in range(self._starts - 1, keep - 1, -1):
                gram = tuple(seq[s : s + gamma])
                starts = index[gram]
                starts.pop()  # s is the newest start of its gram: newer ones were popped already
                if not starts:
                    del index[gram]
        self._starts = keep
        del seq[length:]
