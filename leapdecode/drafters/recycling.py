"""Token Recycling (arXiv 2408.08696): reuse the target's own top-k candidates as a next-token table.

Every verification forward computes logits at the root and at each draft node; their top-k tokens are
good guesses for what follows those tokens next time. They are stored in an adjacency matrix
``[vocab, k]`` (row t = the top-k seen after token t, -1 = never seen) that lives as long as the drafter,
so it keeps learning across requests. A draft is a static tree template filled in from the matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leapdecode.checks import check_int
from leapdecode.draft import Draft, StepResult
from leapdecode.drafters.base import Drafter, parse_options, register
from leapdecode.errors import LeapError

#: Default branching per depth; see `widths_template`. Gives 50 nodes, 6 deep.
DEFAULT_WIDTHS = (8, 4, 2, 1, 1, 1)


def widths_template(widths: Sequence[int]) -> list[tuple[int, int]]:
    """A tree template from per-depth widths, as (parent, rank) pairs, parent -1 = the root.

    A node at depth d (the root is 0) whose own rank is r gets ``widths[d] - r`` children of ranks
    0, 1, ...: a lower-ranked candidate is less likely accepted, so its subtree is smaller. Nodes are
    ordered by the cost ``depth + sum of ranks on the path``, a proxy for how unlikely the path is,
    so truncating the draft keeps the likeliest nodes (and parents still precede children).
    """
    nodes: list[tuple[int, int, int]] = []  # (cost, parent, rank) in breadth-first generation order
    frontier = [(-1, 0, 0)]  # (node, own rank, path cost); the root counts as rank 0, cost 0
    for width in widths:
        nxt = []
        for parent, own_rank, cost in frontier:
            for rank in range(max(width - own_rank, 0)):
                nodes.append((cost + 1 + rank, parent, rank))
                nxt.append((len(nodes) - 1, rank, cost + 1 + rank))
        frontier = nxt
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i][0], i))
    new_index = {old: new for new, old in enumerate(order)}
    return [(-1 if nodes[i][1] < 0 else new_index[nodes[i][1]], nodes[i][2]) for i in order]


@dataclass(frozen=True)
class RecyclingOptions:
    k: int = 8  # candidates kept per token (the matrix width)
    widths: tuple[int, ...] | None = None  # see widths_template; None = DEFAULT_WIDTHS capped at k
    template: tuple[tuple[int, int], ...] | None = None  # explicit (parent, rank) pairs; overrides widths

    def __post_init__(self):
        check_int("recycling option k", self.k)
        if self.widths is None:
            object.__setattr__(self, "widths", tuple(min(w, self.k) for w in DEFAULT_WIDTHS))
        widths = tuple(self.widths) if isinstance(self.widths, (list, tuple)) else None
        if not widths or any(
            isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= self.k for w in widths
        ):
            raise LeapError(
                f"recycling option widths must be a non-empty list of integers in [0, k={self.k}],"
                f" got {self.widths!r}"
            )
        object.__setattr__(self, "widths", widths)
        if self.template is not None:
            object.__setattr__(self, "template", self._checked_template(self.template))

    def _checked_template(self, template) -> tuple[tuple[int, int], ...]:
        try:
            pairs = tuple((int(p), int(r)) for p, r in template)
        except (TypeError, ValueError):
            raise LeapError("recycling option template must be a list of (parent, rank) pairs") from None
        for i, (parent, rank) in enumerate(pairs):
            if not -1 <= parent < i or not 0 <= rank < self.k:
                raise LeapError(
                    f"recycling option template[{i}] = ({parent}, {rank}): the parent must be -1"
                    f" or an earlier node and the rank in [0, k={self.k})"
                )
        return pairs

    @classmethod
    def parse(cls, options: dict) -> RecyclingOptions:
        return parse_options(cls, options, "recycling")


@register("recycling")
class TokenRecycling(Drafter):
    """Tree draft from a static template whose node tokens come from the adjacency matrix."""

    name = "recycling"
    wants_logits = True

    def __init__(self, **options):
        self.options = RecyclingOptions.parse(options)
        tmpl = self.options.template
        self.template: list[tuple[int, int]] = (
            list(tmpl) if tmpl is not None else widths_template(self.options.widths)
        )
        self.matrix: torch.Tensor | None = None  # [vocab, k] long, made at the first logits seen

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        matrix = self.matrix
        if matrix is None or not tokens or max_nodes <= 0 or not 0 <= tokens[-1] < matrix.shape[0]:
            return Draft(source=self.name)
        rows: dict[int, list[int]] = {}  # token -> its matrix row, fetched once
        token_ids: list[int] = []
        parents: list[int] = []
        placed: list[int | None] = []  # template node -> draft node (None: not proposed)
        siblings: set[tuple[int, int]] = set()  # (draft parent, token) already proposed
        for parent, rank in self.template:
            if len(token_ids) >= max_nodes:
                break
            node = None
            at = -1 if parent < 0 else placed[parent]
            if at is not None:
                above = tokens[-1] if at < 0 else token_ids[at]
                row = rows.get(above)
                if row is None:
                    row = rows[above] = matrix[above].tolist()
                token = row[rank]
                if token >= 0 and (at, token) not in siblings:
                    siblings.add((at, token))
                    node = len(token_ids)
                    token_ids.append(token)
                    parents.append(at)
            placed.append(node)
        return Draft(token_ids, parents, source=self.name)

    def observe(self, step: StepResult) -> None:
        """Row ``tokens[i]`` := top-k of ``logits[i]`` for every forward input (a repeated token: its
        last)."""
        logits = step.logits
        if logits is None or logits.numel() == 0:
            return
        vocab = logits.shape[-1]
        if self.matrix is None or self.matrix.shape[0] != vocab:
            self.matrix = torch.full((vocab, self.options.k), -1, dtype=torch.long)
        latest: dict[int, int] = {}  # token -> last input position holding it
        for i, token in enumerate(step.tokens[: logits.shape[0]]):
            if 0 <= token < vocab:
                latest[token] = i
        if not latest:
            return
        k = min(self.options.k, vocab)
        top = torch.topk(logits, k, dim=-1).indices.cpu()  # [S, k]; no gather of the big logits first
        self.matrix[torch.tensor(list(latest.keys())), :k] = top[torch.tensor(list(latest.values()))]
