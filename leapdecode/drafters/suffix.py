"""SuffixDecoding (arXiv 2411.04975): tree drafts from suffix matches in this and earlier requests.

Two indexes answer "what followed the longest suffix of the context, and how often": one over the current
request (prompt + output so far), one over the outputs of earlier requests (kept on the instance, oldest
evicted past a node budget). Each is a bounded-depth suffix trie (every position p inserts its next
`depth` tokens, each node counting the windows through it) with lazy tails: a window seen once is not
spelled out node by node but points into its sequence, and is split one node at a time only when another
window walks into it. Memory is therefore O(tokens + repeated substrings) instead of O(tokens x depth).

From the matched node the draft grows best-first by path probability (the product of child count /
sum of sibling counts), keeping nodes above `min_prob`, at most ``min(max_nodes, factor * match length,
max_spec)`` of them; of the two indexes the draft with the larger expected accepted length wins.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from leapdecode.draft import Draft, StepResult
from leapdecode.drafters.base import Drafter, RequestContext, parse_options, register
from leapdecode.errors import LeapError


@dataclass(frozen=True)
class SuffixOptions:
    max_depth: int = 32  # longest suffix matched; the tries hold max_depth + max_spec tokens per window
    max_spec: int = 32  # most nodes in one draft
    factor: float = (
        1.0  # draft nodes per matched token: short matches are weak evidence (ArcticInference's default)
    )
    min_prob: float = 0.1  # drop nodes whose estimated path probability is lower
    max_global_nodes: int = 300_000  # global trie budget (~230 B a node, so ~70 MB); oldest outputs go first

    def __post_init__(self):
        for name in ("max_depth", "max_spec", "max_global_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LeapError(f"suffix option {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor > 0:
            raise LeapError(f"suffix option factor must be a number > 0, got {self.factor!r}")
        if (
            isinstance(self.min_prob, bool)
            or not isinstance(self.min_prob, (int, float))
            or not 0 <= self.min_prob <= 1
        ):
            raise LeapError(f"suffix option min_prob must be a number in [0, 1], got {self.min_prob!r}")

    @classmethod
    def parse(cls, options: dict) -> SuffixOptions:
        return parse_options(cls, options, "suffix")


class _Node:
    """A trie node. A *tail* node (seq is not None) stands for exactly one window, which goes on as
    ``seq[pos:min(lim, len(seq))]`` below it; that span grows with `seq` while the request runs."""

    __slots__ = ("count", "kids", "lim", "pos", "seq")

    def __init__(self, seq: list[int] | None = None, pos: int = 0, lim: int = 0):
        self.count = 1  # windows through this node
        self.kids: dict[int, _Node] | None = None
        self.seq, self.pos, self.lim = seq, pos, lim


# A place in a trie: (node, k) is k tokens into node's tail (k = 0: at the node itself).
_Loc = tuple[_Node, int]


class _Trie:
    """Bounded-depth suffix trie with lazy tails (see the module docstring)."""

    def __init__(self, depth: int):
        self.depth = depth
        self.root = _Node()
        self.nodes = 1

    def step(self, node: _Node, token: int, seq: list[int], nxt: int, lim: int) -> _Node | None:
        """Move one window from explicit `node` along `token` (= seq[nxt - 1]).

        Returns the explicit child it reached, or None when it ended in a new tail (its own from then on).
        """
        kids = node.kids
        if kids is None:
            kids = node.kids = {}
        child = kids.get(token)
        if child is None:
            kids[token] = _Node(seq, nxt, lim)
            self.nodes += 1
            return None
        if child.seq is not None:
            self._split(child)
        child.count += 1
        return child

    def _split(self, node: _Node) -> None:
        """Spell out the first token of a tail: another window is about to go through `node`."""
        seq, pos = node.seq, node.pos
        node.seq = None
        if seq is not None and pos < min(node.lim, len(seq)):
            node.kids = {seq[pos]: _Node(seq, pos + 1, node.lim)}
            self.nodes += 1

    def insert(self, seq: list[int]) -> None:
        """Insert every window of a finished sequence."""
        for p in range(len(seq)):
            node: _Node | None = self.root
            lim = p + self.depth
            for i in range(p, min(lim, len(seq))):
                assert node is not None
                node = self.step(node, seq[i], seq, i + 1, lim)
                if node is None:
                    break

    def remove(self, seq: list[int]) -> None:
        """Undo `insert(seq)`: a node only `seq`'s window goes through is dropped with its chain."""
        for p in range(len(seq)):
            node = self.root
            for i in range(p, min(p + self.depth, len(seq))):
                kids = node.kids
                assert kids is not None  # the window was inserted
                child = kids[seq[i]]
                if child.count == 1:
                    del kids[seq[i]]
                    self.nodes -= _chain_length(child)
                    break
                child.count -= 1
                node = child

    def locate(self, pattern: Sequence[int]) -> _Loc | None:
        """Where `pattern` ends in the trie, or None when it is not there."""
        node: _Node | None = self.root
        for i, token in enumerate(pattern):
            assert node is not None
            if node.seq is not None:  # inside a tail: compare the rest with it
                rest = len(pattern) - i
                end = node.pos + rest
                if end <= min(node.lim, len(node.seq)) and node.seq[node.pos : end] == list(pattern[i:]):
                    return node, rest
                return None
            node = node.kids.get(token) if node.kids else None
            if node is None:
                return None
        assert node is not None
        return node, 0

    @staticmethod
    def continuations(loc: _Loc) -> list[tuple[int, float, _Loc]]:
        """(token, probability, place after it) for each token seen after `loc`."""
        node, k = loc
        if node.seq is not None:
            i = node.pos + k
            return [(node.seq[i], 1.0, (node, k + 1))] if i < min(node.lim, len(node.seq)) else []
        if not node.kids:
            return []
        total = sum(kid.count for kid in node.kids.values())
        return [(token, kid.count / total, (kid, 0)) for token, kid in node.kids.items()]


def _chain_length(first: _Node) -> int:
    """Explicit nodes in a single-window chain (each has at most one child)."""
    n, node = 1, first
    while node.kids:
        n += 1
        node = next(iter(node.kids.values()))
    return n


class _LiveIndex:
    """The per-request trie over a growing sequence, with the places every recent window ends.

    `active` holds (start, node) for windows of the last `depth` positions that end at an explicit node,
    i.e. whose text occurred before; the others end in their own tails and grow for free.
    """

    def __init__(self, depth: int):
        self.trie = _Trie(depth)
        self.seq: list[int] = []
        self.active: list[tuple[int, _Node]] = []  # ascending start

    def append(self, tokens: Sequence[int]) -> None:
        trie, seq, depth = self.trie, self.seq, self.trie.depth
        for token in tokens:
            seq.append(token)
            n = len(seq)
            active = []
            for start, node in self.active + [(n - 1, trie.root)]:
                child = trie.step(node, token, seq, n, start + depth)
                if child is not None and n - start < depth:
                    active.append((start, child))
            self.active = active

    def match(self, max_len: int) -> tuple[int, _Loc] | None:
        """The longest suffix (<= max_len tokens) that occurred before with a continuation."""
        n = len(self.seq)
        for start, node in self.active:
            if n - start <= max_len and node.kids:
                return n - start, (node, 0)
        return None


@register("suffix")
class SuffixDecoding(Drafter):
    """Tree drafts from the per-request and the global suffix tries."""

    name = "suffix"

    def __init__(self, **options):
        self.options = SuffixOptions.parse(options)
        depth = self.options.max_depth + self.options.max_spec
        self.global_trie = _Trie(depth)
        self.outputs: deque[list[int]] = deque()  # in the global trie, oldest first
        self._live = _LiveIndex(depth)
        self._prompt_len = 0
        self._proposed_len = -1  # len(live seq) at the last propose, so observe appends once

    def start(self, ctx: RequestContext) -> None:
        self._live = _LiveIndex(self._live.trie.depth)
        self._live.append(ctx.prompt_ids)
        self._prompt_len = len(ctx.prompt_ids)

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        self._sync(tokens)
        self._proposed_len = len(self._live.seq)
        if max_nodes <= 0:  # in step with the text, nothing to propose
            return Draft(source=self.name)
        best: tuple[list[int], list[int], list[float], float] = ([], [], [], 0.0)
        best_len = 0
        for hit in (self._live.match(self.options.max_depth), self._global_match()):
            if hit is not None:
                found = self._expand(hit[1], self._budget(hit[0], max_nodes))
                if found[3] > best[3]:
                    best, best_len = found, hit[0]
        return Draft(best[0], best[1], source=self.name, scores=best[2], match_len=best_len)

    def observe(self, step: StepResult) -> None:
        """Append the committed tokens, so that `stop` sees the whole output (no propose follows the last)."""
        seq = self._live.seq
        if len(seq) == self._proposed_len and seq and step.tokens and step.tokens[0] == seq[-1]:
            self._live.append(step.committed)
        self._proposed_len = -1

    def stop(self) -> None:
        """Move this request's output into the global trie, evicting the oldest outputs past the budget."""
        output = self._live.seq[self._prompt_len :]
        self._live = _LiveIndex(self._live.trie.depth)
        self._prompt_len = 0
        if output:
            self.outputs.append(output)
            self.global_trie.insert(output)
        while self.outputs and self.global_trie.nodes > self.options.max_global_nodes:
            self.global_trie.remove(self.outputs.popleft())

    def _sync(self, tokens: Sequence[int]) -> None:
        seq = self._live.seq
        n = len(seq)
        if len(tokens) < n or (n and tokens[n - 1] != seq[-1]):  # another sequence: rebuild
            self._live = _LiveIndex(self._live.trie.depth)
            self._prompt_len = min(self._prompt_len, len(tokens))
            n = 0
        self._live.append(tokens[n:])

    def _global_match(self) -> tuple[int, _Loc] | None:
        """Longest suffix (<= max_depth) of the context found in the global trie with a continuation."""
        seq, trie = self._live.seq, self.global_trie
        if not trie.root.kids:
            return None
        for length in range(min(self.options.max_depth, len(seq)), 0, -1):
            loc = trie.locate(seq[len(seq) - length :])
            if loc is not None and trie.continuations(loc):
                return length, loc
        return None

    def _budget(self, match_len: int, max_nodes: int) -> int:
        return min(max_nodes, int(self.options.factor * match_len), self.options.max_spec)

    def _expand(self, loc: _Loc, budget: int) -> tuple[list[int], list[int], list[float], float]:
        """Best-first growth by path probability; returns (token_ids, parents, path probabilities,
        expected accepted)."""
        token_ids: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        score = 0.0
        min_prob = self.options.min_prob
        order = itertools.count()  # tie-break: first seen first
        heap: list = []

        def push(at: _Loc, parent: int, prob: float) -> None:
            for token, p, nxt in _Trie.continuations(at):
                if prob * p >= min_prob:
                    heapq.heappush(heap, (-prob * p, next(order), token, parent, nxt))

        if budget > 0:
            push(loc, -1, 1.0)
        while heap and len(token_ids) < budget:
            neg, _, token, parent, nxt = heapq.heappop(heap)
            parents.append(parent)
            token_ids.append(token)
            probs.append(-neg)
            score -= neg
            push(nxt, len(token_ids) - 1, -neg)
        return token_ids, parents, probs, score
