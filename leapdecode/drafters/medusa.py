"""Medusa: k heads on the target's last hidden state, each guessing one more token ahead (arXiv
2401.10774, Medusa-1: the target frozen).

Head i (0-based) is a residual block on the final-normed hidden state h of the newest committed row,
``h + SiLU(W_i h + b_i)``, read out through the target's own output layer over the trimmed vocabulary;
it guesses the token i + 2 places after that row (the target's own bonus token is the first). The
output layer is the target's, not a copy per head, which keeps the shipped heads small.

Greedy requests get a tree from the products of the heads' top-k probabilities: the `nodes` paths with
the highest products (a product never rises along a path, so they form a tree). Sampled requests get a
chain with `topk` independent draws per depth from the heads' distributions, with their rows.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leapdecode.checks import check_int
from leapdecode.draft import Draft, StepResult
from leapdecode.drafters.base import Drafter, DrafterHost, RequestContext, parse_options, register
from leapdecode.drafters.draft_model import Picker, draft_nodes
from leapdecode.drafters.trained import (
    SIZES,
    HeadVocab,
    Sizer,
    TargetParts,
    bundled_path,
    head_config,
    load_head,
    on_kernels,
)
from leapdecode.errors import LeapError
from leapdecode.model.llama import RMSNorm


@dataclass(frozen=True)
class MedusaConfig:
    dim: int
    heads: int = 4


class MedusaHeads(nn.Module):
    """h [S, D] (after the final norm) -> [K, S, D]: each head's input to the output layer."""

    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        self.cfg = cfg
        blocks = [nn.Linear(cfg.dim, cfg.dim) for _ in range(cfg.heads)]
        for b in blocks:  # zero: every head starts as the target's own next-token guess
            nn.init.zeros_(b.weight)
            nn.init.zeros_(b.bias)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([h + F.silu(b(h)) for b in self.blocks])  # [K, S, D]


@dataclass(frozen=True)
class MedusaOptions:
    path: str | None = None  # head file (default: the one shipped for the bundled model)
    nodes: int = 32  # most draft nodes per step
    topk: int = 8  # candidates per head
    size: str = "cost"  # as eagle's: "cost" sizes the tree by the measured verification cost, or "fixed"

    def __post_init__(self):
        if self.size not in SIZES:
            raise LeapError(f"medusa option size must be one of {', '.join(SIZES)}, got {self.size!r}")
        check_int("medusa option nodes", self.nodes, 1)
        check_int("medusa option topk", self.topk, 1)


def best_paths(logp: list[list[float]], budget: int) -> tuple[list[tuple[int, ...]], list[float]]:
    """The `budget` best paths (i_1, ..., i_d) by the sum of logp[depth][i] (each row sorted, best
    first), in order: lazy k-best enumeration, every path's parent popped before it."""
    heap: list[tuple[float, tuple[int, ...]]] = [(-logp[0][0], (0,))]
    paths: list[tuple[int, ...]] = []
    scores: list[float] = []
    while heap and len(paths) < budget:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        scores.append(-neg)
        d = len(path) - 1
        if path[-1] + 1 < len(logp[d]):  # the next sibling
            heapq.heappush(
                heap, (neg + logp[d][path[-1]] - logp[d][path[-1] + 1], path[:-1] + (path[-1] + 1,))
            )
        if d + 1 < len(logp):  # the first child
            heapq.heappush(heap, (neg - logp[d + 1][0], path + (0,)))
    return paths, scores


@register("medusa")
class MedusaDrafter(Drafter):
    name = "medusa"
    wants_hidden = True
    uses_cost = True

    def __init__(self, **options):
        self.options = parse_options(MedusaOptions, options, self.name)

    def bind(self, host: DrafterHost) -> None:
        head = load_head(self.options.path or bundled_path(self.name), self.name)
        TargetParts(host.target).check(head, self.name)
        self.cfg = head_config(MedusaConfig, head.config)
        self.dtype = host.target.dtype
        self.heads = MedusaHeads(self.cfg).to(self.dtype)
        self.heads.load_state_dict(head.tensors)
        self.heads.requires_grad_(False)
        on_kernels(self.heads, host.target)
        self.norm = RMSNorm(head.norm.to(self.dtype), host.target.cfg.norm_eps)
        self.vocab = HeadVocab(host.target, head.vocab)
        self.vocab_size = host.target.cfg.vocab_size
        self.sizer = Sizer(self.options.size, host)

    def start(self, ctx: RequestContext) -> None:
        self.hidden: torch.Tensor | None = None  # [D] the newest committed row's state
        self.vocab.reset(ctx.prompt_ids)
        self.picker = Picker(ctx.sampling, salt=ctx.seq_id)
        self.sizer.remember([], None)

    def observe(self, step: StepResult) -> None:
        self.sizer.learn(step, self.name)
        if step.hidden is not None:
            self.hidden = step.hidden[-1].to(self.dtype)

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        t0 = time.perf_counter()
        self.sizer.remember([], None)
        budget = min(max_nodes, self.options.nodes)
        if self.hidden is None or budget <= 0:
            return Draft()
        z = self.heads(self.norm(self.hidden[None]))[:, 0]  # [K, D]
        logits = self.vocab(z).to(self.dtype)  # [K, N]
        if not self.picker.greedy:
            return self._chain(logits, budget)
        top = torch.topk(torch.log_softmax(logits.float(), -1), min(self.options.topk, logits.shape[1]), -1)
        paths, scores = best_paths(top.values.tolist(), budget)
        probs = [math.exp(s) for s in scores]
        n = self.sizer.choose(probs, len(tokens), time.perf_counter() - t0)
        ids = self.vocab.ids[top.indices]  # [K, k]
        self.sizer.remember(probs[:n], (int(ids[0, 0]), probs[0]))  # path (0,): head 0's best
        paths, probs = paths[:n], probs[:n]
        index = {p: i for i, p in enumerate(paths)}
        tokens = [int(ids[len(p) - 1, p[-1]]) for p in paths]
        parents = [index[p[:-1]] if len(p) > 1 else -1 for p in paths]
        return Draft(tokens, parents, source=self.name, scores=probs)

    def _chain(self, logits: torch.Tensor, budget: int) -> Draft:
        """Sampling: `topk` independent draws per head's distribution, the chain continuing from the first."""
        full = torch.full((logits.shape[0], self.vocab_size), float("-inf"), dtype=logits.dtype)
        full[:, self.vocab.ids] = logits  # [K, V]
        depth = iter(range(1, logits.shape[0]))
        k = min(self.options.topk, budget)
        return draft_nodes(
            full[0], lambda _t: full[next(depth)], self.picker, budget, len(full), k, 0.0, self.name
        )
