"""The contract between drafting and verifying.

Terms, defined once:
- The *root* is the newest token of the sequence whose key/value is not yet in the cache (the last
  accepted or bonus token). Every verification forward starts with it.
- A *draft* is a tree of proposed tokens below the root: ``token_ids[i]`` with parent ``parents[i]``
  (-1 = child of the root; otherwise an earlier node, so ``parents[i] < i``). A chain of n tokens has
  ``parents == [-1, 0, 1, ..., n - 2]``. An empty draft is plain decoding.
- ``probs`` (optional, ``[n, V]``): row i is the draft distribution that node i's token was drawn from
  (siblings drawn from one distribution share the same row). Drafts without it are treated as
  deterministic proposals.
- ``scores`` (optional) and ``match_len`` are the drafter's own evidence, for `auto` to learn from:
  node i's estimated chance that its whole path is accepted, and the length of the context suffix the
  draft was matched on (0 = not a match-based draft). Verification never reads them.
- After one verification forward, the *accepted* nodes are a root-to-leaf path of draft nodes whose
  tokens the target agrees with, and the *bonus* token is the target's own token after the last accepted
  node (or after the root when nothing is accepted). One step therefore commits ``len(accepted) + 1``
  tokens; "mean accepted tokens per step" counts that bonus token too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Draft:
    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # [n, V]
    source: str = ""  # which drafter proposed it (for statistics)
    scores: list[float] | None = None  # [n] the drafter's estimate of each node's path acceptance
    match_len: int = 0  # tokens of context the proposal was matched on

    def __post_init__(self):
        if len(self.token_ids) != len(self.parents):
            raise ValueError(f"token_ids ({len(self.token_ids)}) and parents ({len(self.parents)}) differ")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"parents[{i}] = {p}: a parent must be -1 or an earlier node")
        if self.probs is not None and self.probs.shape[0] != len(self.token_ids):
            raise ValueError(f"probs has {self.probs.shape[0]} rows for {len(self.token_ids)} nodes")
        if self.scores is not None and len(self.scores) != len(self.token_ids):
            raise ValueError(f"scores has {len(self.scores)} values for {len(self.token_ids)} nodes")

    def __len__(self) -> int:
        return len(self.token_ids)

    @staticmethod
    def chain(
        token_ids: list[int], probs: torch.Tensor | None = None, source: str = "", match_len: int = 0
    ) -> Draft:
        return Draft(list(token_ids), list(range(-1, len(token_ids) - 1)), probs, source, match_len=match_len)

    def is_chain(self) -> bool:
        """Whether every node is the child of the one before it (an empty draft too)."""
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for a child of the root."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1 = the root), in proposal order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node`, inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def truncated(self, max_nodes: int) -> Draft:
        """The first `max_nodes` nodes (parents precede children, so this stays a tree)."""
        if len(self) <= max_nodes:
            return self
        probs = None if self.probs is None else self.probs[:max_nodes]
        scores = None if self.scores is None else self.scores[:max_nodes]
        return Draft(
            self.token_ids[:max_nodes], self.parents[:max_nodes], probs, self.source, scores, self.match_len
        )


@dataclass(frozen=True)
class StepResult:
    """What one verification step produced, for drafters that learn from it.

    tokens: the forward's input ids, ``[root] + draft.token_ids``; logits: ``[1 + n, V]`` target logits at
    those inputs; accepted: accepted node indices (a root-to-node path); bonus: the target's token after
    it; forward_s: seconds of the verification forward itself; hidden: when the drafter asked for them
    (`Drafter.wants_hidden`), the target's hidden states (the final norm's input) ``[1 + len(accepted), D]``
    at the root and the accepted nodes, in path order: the committed rows' features, for trained heads.

    A drafter that wants hidden states also observes the prefill, as a step with an empty draft whose
    ``tokens`` are the prompt rows the forward computed and ``hidden`` their states ``[P, D]``."""

    draft: Draft
    tokens: list[int]
    logits: torch.Tensor
    accepted: list[int]
    bonus: int
    forward_s: float = 0.0
    hidden: torch.Tensor | None = None  # [1 + len(accepted), D] (prefill: [P, D])

    @property
    def committed(self) -> list[int]:
        """Tokens appended to the sequence by this step (accepted draft tokens, then the bonus)."""
        return [self.draft.token_ids[i] for i in self.accepted] + [self.bonus]


def tree_inputs(draft: Draft, root_token: int, n_cached: int, device=None):
    """Inputs of one verification forward over [root] + draft nodes.

    Returns tokens [S], positions [S] (rope position = n_cached + depth) and a boolean attention mask
    [S, n_cached + S] (True = may attend): every row sees the whole cache, the root, its ancestors and
    itself. For a chain that is the causal mask, returned as None (what the model takes for causal), so
    a chain is verified without building or scanning a mask; its attention is the same arithmetic.
    """
    s = len(draft) + 1
    tokens = torch.tensor([root_token] + list(draft.token_ids), dtype=torch.long, device=device)  # [S]
    if draft.is_chain():
        return tokens, torch.arange(n_cached, n_cached + s, device=device), None
    depth = torch.tensor([0] + draft.depths(), dtype=torch.long, device=device)  # [S]
    positions = n_cached + depth  # [S]
    tree = torch.zeros(s, s, dtype=torch.bool)  # [S, S]
    tree[:, 0] = True
    for i, p in enumerate(draft.parents):
        row = i + 1
        if p >= 0:
            tree[row] = tree[p + 1]
        tree[row, row] = True
    tree[0, 0] = True
    mask = torch.cat([torch.ones(s, n_cached, dtype=torch.bool), tree], dim=1)  # [S, n_cached + S]
    return tokens, positions, mask.to(device)


MAX_EVIDENCE = 32  # longest repeated run a drafter measures for `match_len`


def match_length(seq: Sequence[int], a: int, b: int, limit: int) -> int:
    """How many tokens before positions a and b of `seq` agree (a < b), up to `limit`: the length of a
    repeated run ending just before a and just before b."""
    n = 0
    while n < limit and a - n > 0 and seq[a - n - 1] == seq[b - n - 1]:
        n += 1
    return n
