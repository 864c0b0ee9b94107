"""Acceptance of a draft tree from the target's logits: pure (no model, no cache, no I/O).

``accept(draft, logits, params, generator) -> (accepted, bonus)`` where ``logits[0]`` are the target's
logits at the root and ``logits[1 + i]`` at draft node i (see `leapdecode.draft` for the terms).

- Greedy: follow the child whose token is the target's argmax, as deep as it goes; the bonus is the
  argmax where no child matches. The committed tokens equal plain greedy decoding by construction.
- Sampling, drafts without probabilities (n-gram, suffix, recycling): at each node draw x from the target
  distribution p and move to the child whose token is x; the first x with no such child is the bonus.
  Every committed token is a draw from p given its prefix, so the output distribution is the target's.
- Sampling, drafts with probabilities: recursive rejection sampling (SpecInfer's multi-round form; for a
  chain it is Leviathan/Chen speculative sampling). Child k, drawn from q_k, is accepted with probability
  min(1, p(x)/q_k(x)); on rejection p becomes normalize(max(p - q_k, 0)) and the next child is tried;
  when all children are rejected the bonus is drawn from the residual p. This is exact when each child
  was drawn independently from its own row of ``draft.probs``.
"""

from __future__ import annotations

import torch

from leapdecode.draft import Draft
from leapdecode.sampling import SamplingParams, sample, target_probs


def accept(
    draft: Draft, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """logits: [1 + n, V]. Returns (accepted node indices from the root down, bonus token)."""
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"logits have {logits.shape[0]} rows for a draft of {len(draft)} nodes")
    if params.greedy:
        return accept_greedy(draft, logits)
    if generator is None:
        raise ValueError("sampling needs a torch.Generator")
    return _accept_sampled(draft, logits, params, generator)


def _children_by_token(draft: Draft) -> dict[int, dict[int, int]]:
    """parent -> {token: first child with that token}."""
    out: dict[int, dict[int, int]] = {}
    for i, (tok, parent) in enumerate(zip(draft.token_ids, draft.parents)):
        out.setdefault(parent, {}).setdefault(tok, i)
    return out


def accept_greedy(draft: Draft, logits: torch.Tensor) -> tuple[list[int], int]:
    best = logits.argmax(-1).tolist()  # [1 + n]
    children = _children_by_token(draft)
    path: list[int] = []
    node = -1
    while True:
        token = best[node + 1]
        child = children.get(node, {}).get(token)
        if child is None:
            return path, token
        path.append(child)
        node = child


def _accept_sampled(
    draft: Draft, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[list[int], int]:
    children = _children_by_token(draft)
    path: list[int] = []
    node = -1
    while True:
        p = target_probs(logits[node + 1].cpu(), params)  # [V] float64
        kids = children.get(node, {})
        if not kids:
            return path, sample(p, generator)
        if draft.probs is None:
            token = sample(p, generator)
            child = kids.get(token)
            if child is None:
                return path, token
        else:
            # duplicate tokens among i.i.d. siblings each take a round: no de-duplication here
            child, p = _rejection_round(draft, draft.children(node), p, generator)
            if child is None:
                return path, sample(p, generator)
        path.append(child)
        node = child


def _rejection_round(
    draft: Draft, kids: list[int], p: torch.Tensor, generator: torch.Generator
) -> tuple[int | None, torch.Tensor]:
    """Try each child in turn; returns (accepted child or None, residual distribution)."""
    assert draft.probs is not None  # only drafts with probabilities are rejection-sampled
    for kid in kids:
        q = draft.probs[kid].to(torch.float64).cpu()  # [V]
        x = draft.token_ids[kid]
        u = torch.rand((), dtype=torch.float64, generator=generator).item()
        if q[x] > 0 and u * q[x] < p[x]:  # u < p(x)/q(x), without dividing
            return kid, p
        residual = (p - q).clamp_min(0.0)
        total = residual.sum()
        if total <= 0:  # p == q up to rounding: rejection had probability zero
            continue
        p = residual / total
    return None, p
