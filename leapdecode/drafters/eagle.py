"""EAGLE: a one-layer head that drafts from the target's own features (arXiv 2401.15077; the dynamic
tree of EAGLE-2, arXiv 2406.16858).

The head reads, for each committed token, the pair [feature of that position, embedding of the next
token] (an fc from 2D to D, then one Llama decoder layer with its own small KV cache) and predicts the
next position's feature, which the target's own output layer reads (its final norm, then its LM head
over the trimmed vocabulary). Drafting feeds predicted features back in, one batched forward per depth.

Greedy requests get the EAGLE-2 dynamic tree: the `topk` children of each expanded node, scored by
cumulative log-probability; at each depth the `topk` best new nodes are expanded; the best `nodes` of
all (a score never rises along a path, so the best are a tree) are proposed. Sampled requests get a
chain with `topk` independent draws per depth from the head's distribution, with their rows (exact
rejection sampling needs untouched draws, which reranking would not give).

The target verifies every token, so the head only decides how many are accepted, never the output.
"""

from __future__ import annotations

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
from leapdecode.drafters.draft_model import Picker, check_fraction, draft_nodes
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


@dataclass(frozen=True)
class EagleConfig:
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    inter: int
    eps: float = 1e-5
    rope_theta: float = 10000.0


class RMS(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D]
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [hd/2]
    freqs = torch.outer(positions.to(torch.float64), inv)  # [S, hd/2]
    emb = torch.cat([freqs, freqs], -1)  # [S, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [H, S, hd]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class EagleLayer(nn.Module):
    """fc([feature, embedding]) -> one Llama decoder layer -> predicted next feature (all [S, D])."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        d, h, kv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.fc = nn.Linear(2 * d, d)
        self.attn_norm, self.mlp_norm = RMS(d, cfg.eps), RMS(d, cfg.eps)
        self.wqkv = nn.Linear(d, (h + 2 * kv) * hd, bias=False)
        self.wo = nn.Linear(h * hd, d, bias=False)
        self.w13 = nn.Linear(d, 2 * cfg.inter, bias=False)
        self.w2 = nn.Linear(cfg.inter, d, bias=False)

    def project(self, feat: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor):
        """The residual input x [S, D] and rotated q [H, S, hd], k, v [Hkv, S, hd] of new rows."""
        c = self.cfg
        x = self.fc(torch.cat([feat, emb], -1))  # [S, D]
        q, k, v = self.wqkv(self.attn_norm(x)).split(
            [c.n_heads * c.head_dim, *[c.n_kv_heads * c.head_dim] * 2], -1
        )
        cos, sin = rope(positions, c.head_dim, c.rope_theta, x.dtype)  # [S, hd]
        q = rotate(q.view(-1, c.n_heads, c.head_dim).transpose(0, 1), cos, sin)  # [H, S, hd]
        k = rotate(k.view(-1, c.n_kv_heads, c.head_dim).transpose(0, 1), cos, sin)  # [Hkv, S, hd]
        v = v.view(-1, c.n_kv_heads, c.head_dim).transpose(0, 1)  # [Hkv, S, hd]
        return x, q, k, v

    def finish(self, x, q, keys, values, mask) -> torch.Tensor:
        """Attention of q [H, S, hd] over keys/values [Hkv, T, hd] (mask bool [S, T]), then the MLP."""
        c = self.cfg
        y = F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, enable_gqa=c.n_heads != c.n_kv_heads
        )[0]  # [H, S, hd]
        x = x + self.wo(y.transpose(0, 1).reshape(-1, c.n_heads * c.head_dim))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, -1)
        return x + self.w2(F.silu(gate) * up)  # [S, D]


@dataclass(frozen=True)
class EagleOptions:
    path: str | None = None  # head file (default: the one shipped for the bundled model)
    nodes: int = 32  # most draft nodes per step
    depth: int = 6  # deepest draft
    topk: int = 8  # children per expanded node, and nodes expanded per depth
    # "cost": verify the best N nodes, N maximising expected tokens per second on this machine's measured
    # verification cost (see `trained.Sizer`); "fixed": all `nodes`
    size: str = "cost"
    min_prob: float = 0.02  # stop deepening once no new node's path probability reaches this

    def __post_init__(self):
        if self.size not in SIZES:
            raise LeapError(f"eagle option size must be one of {', '.join(SIZES)}, got {self.size!r}")
        check_fraction("eagle", "min_prob", self.min_prob)
        check_int("eagle option nodes", self.nodes, 1)
        check_int("eagle option depth", self.depth, 1)
        check_int("eagle option topk", self.topk, 1)


class EagleCache:
    """The head's own keys and values [Hkv, T, hd] of committed pairs, grown by doubling."""

    def __init__(self, kv_heads: int, head_dim: int, dtype):
        self.k = torch.empty(kv_heads, 256, head_dim, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.n = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:  # [Hkv, m, hd]
        m = k.shape[1]
        if self.n + m > self.k.shape[1]:
            grow = max(2 * self.k.shape[1], self.n + m)
            self.k = torch.cat(
                [self.k[:, : self.n], self.k.new_empty(self.k.shape[0], grow - self.n, self.k.shape[2])], 1
            )
            self.v = torch.cat(
                [self.v[:, : self.n], self.v.new_empty(self.v.shape[0], grow - self.n, self.v.shape[2])], 1
            )
        self.k[:, self.n : self.n + m], self.v[:, self.n : self.n + m] = k, v
        self.n += m


def committed_rows(step: StepResult) -> list[int]:
    """The tokens of the rows whose states `step.hidden` holds: the root and accepted nodes, or the prompt."""
    head = step.tokens[: len(step.tokens) - len(step.draft)]
    return head + [step.draft.token_ids[i] for i in step.accepted]


@register("eagle")
class EagleDrafter(Drafter):
    name = "eagle"
    wants_hidden = True
    uses_cost = True

    def __init__(self, **options):
        self.options = parse_options(EagleOptions, options, self.name)
        self.ctx = RequestContext(())

    def bind(self, host: DrafterHost) -> None:
        head = load_head(self.options.path or bundled_path(self.name), self.name)
        self.parts = TargetParts(host.target)
        self.parts.check(head, self.name)
        self.cfg = head_config(EagleConfig, head.config)
        self.dtype = host.target.dtype
        self.layer = EagleLayer(self.cfg).to(self.dtype)
        self.layer.load_state_dict(head.tensors)
        self.layer.requires_grad_(False)
        on_kernels(self.layer, host.target)
        self.norm = RMS(self.cfg.dim, self.cfg.eps).to(self.dtype)
        self.norm.weight.data.copy_(head.norm)
        self.norm.requires_grad_(False)
        self.vocab = HeadVocab(host.target, head.vocab)
        self.vocab_size = host.target.cfg.vocab_size
        self.sizer = Sizer(self.options.size, host)

    def start(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.cache = EagleCache(self.cfg.n_kv_heads, self.cfg.head_dim, self.dtype)
        self.last: torch.Tensor | None = None  # [D] predicted feature after the newest committed pair
        self.vocab.reset(ctx.prompt_ids)
        self.table = self.parts.embed(self.vocab.ids).to(self.dtype)  # [N, D]: the drafted tokens'
        self.slot = torch.full((self.vocab_size,), -1, dtype=torch.long)  # id -> row of the table
        self.slot[self.vocab.ids] = torch.arange(len(self.vocab.ids))
        self.picker = Picker(ctx.sampling, salt=ctx.seq_id)
        self.sizer.remember([], None)

    @torch.inference_mode()
    def observe(self, step: StepResult) -> None:
        self.sizer.learn(step, self.name)
        if step.hidden is None:
            return
        rows = committed_rows(step)
        nexts = (rows[1:] + [step.bonus])[-len(step.hidden) :]
        feats = step.hidden.to(self.dtype)  # [m, D]
        m, n = len(nexts), self.cache.n
        x, q, k, v = self.layer.project(feats, self.embed(nexts), torch.arange(n, n + m))
        self.cache.append(k, v)
        mask = torch.ones(m, n + m, dtype=torch.bool).tril(n)  # [m, n + m] causal
        out = self.layer.finish(x, q, self.cache.k[:, : n + m], self.cache.v[:, : n + m], mask)
        self.last = out[-1]

    def embed(self, ids: Sequence[int]) -> torch.Tensor:  # -> [m, D]
        """From the request's table when every id is in the head's vocabulary (drafted tokens always
        are), else from the target."""
        t = torch.tensor(list(ids), dtype=torch.long)
        slots = self.slot[t]
        if bool((slots >= 0).all()):
            return self.table[slots]
        return self.parts.embed(t).to(self.dtype)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:  # [m, D] predicted features -> [m, N]
        return self.vocab(self.norm(feats)).to(self.dtype)

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        self.t0 = time.perf_counter()
        self.sizer.remember([], None)
        budget = min(max_nodes, self.options.nodes)
        if self.last is None or budget <= 0:
            return Draft()
        if self.picker.greedy:
            return self._tree(budget)
        return self._chain(budget)

    def _expand(self, feats, ids, depth, ancestors, tree_k, tree_v):
        """One forward over nodes at `depth` (pairs [parent's predicted feature, own embedding]); each
        row attends to the committed pairs, its expanded ancestors and itself. Returns [m, D]."""
        n, m = self.cache.n, len(ids)
        x, q, k, v = self.layer.project(feats, self.embed(ids), torch.full((m,), n + depth - 1))
        keys = torch.cat([self.cache.k[:, :n], *tree_k, k], 1)
        values = torch.cat([self.cache.v[:, :n], *tree_v, v], 1)
        mask = torch.cat([torch.ones(m, n, dtype=torch.bool), ancestors, torch.eye(m, dtype=torch.bool)], 1)
        tree_k.append(k)
        tree_v.append(v)
        return self.layer.finish(x, q, keys, values, mask)

    def _tree(self, budget: int) -> Draft:
        """EAGLE-2: expand the best `topk` new nodes per depth, then keep the best `budget` of all."""
        k, ids = self.options.topk, self.vocab.ids
        assert self.last is not None  # checked by propose
        logp = torch.log_softmax(self.logits(self.last[None]).float(), -1)[0]  # [N]
        top = torch.topk(logp, min(k, len(logp)))
        tokens = ids[top.indices].tolist()
        scores, parents = top.values.tolist(), [-1] * len(tokens)
        frontier, parent_feats = list(range(len(tokens))), self.last[None].expand(len(tokens), -1)
        expanded: list[int] = []  # node index of each row of the tree keys, in order
        tree_k: list[torch.Tensor] = []
        tree_v: list[torch.Tensor] = []
        floor = math.log(self.options.min_prob) if self.options.min_prob > 0 else -math.inf
        for depth in range(1, self.options.depth):
            if max(scores[f] for f in frontier) < floor:
                break
            anc = torch.tensor(
                [[self._is_ancestor(e, f, parents) for e in expanded] for f in frontier], dtype=torch.bool
            ).view(len(frontier), len(expanded))
            out = self._expand(parent_feats, [tokens[f] for f in frontier], depth, anc, tree_k, tree_v)
            expanded += frontier
            logp = torch.log_softmax(self.logits(out).float(), -1)  # [m, N]
            top = torch.topk(logp, min(k, logp.shape[1]), dim=-1)
            cand = []
            for row, f in enumerate(frontier):
                for val, idx in zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True):
                    cand.append((scores[f] + val, int(ids[idx]), f, row))
            cand.sort(key=lambda c: -c[0])
            first = len(tokens)
            for score, tok, parent, _ in cand:
                tokens.append(tok)
                scores.append(score)
                parents.append(parent)
            keep = cand[:k]
            frontier = list(range(first, first + len(keep)))
            parent_feats = out[[c[3] for c in keep]]
        return self._best(tokens, parents, scores, budget)

    @staticmethod
    def _is_ancestor(a: int, node: int, parents: list[int]) -> bool:
        p = parents[node]
        while p >= 0:
            if p == a:
                return True
            p = parents[p]
        return False

    def _best(self, tokens, parents, scores, budget) -> Draft:
        """The `budget` best nodes (by score, shallower first on ties: a tree), renumbered in order."""
        depth = Draft(tokens, parents).depths()
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], depth[i]))[:budget]
        spent = time.perf_counter() - self.t0
        n = self.sizer.choose([math.exp(scores[i]) for i in order], self.cache.n, spent)
        best = sorted(order[:n])
        guess = (tokens[order[0]], math.exp(scores[order[0]])) if order else None  # a root's child
        self.sizer.remember([math.exp(scores[i]) for i in best], guess)
        new = {old: i for i, old in enumerate(best)}
        return Draft(
            [tokens[i] for i in best], [new.get(parents[i], -1) for i in best], source=self.name,
            scores=[math.exp(scores[i]) for i in best],
        )  # fmt: skip

    def _full(self, logits: torch.Tensor) -> torch.Tensor:  # [N] -> [V], -inf outside the head's ids
        out = torch.full((self.vocab_size,), float("-inf"), dtype=logits.dtype)
        out[self.vocab.ids] = logits
        return out

    def _chain(self, budget: int) -> Draft:
        """Sampling: `topk` independent draws per depth, the chain continuing from the first."""
        assert self.last is not None
        feat = [self.last[None]]  # the newest chain node's predicted feature [1, D]
        tree_k: list[torch.Tensor] = []
        tree_v: list[torch.Tensor] = []

        def step(token: int) -> torch.Tensor:
            anc = torch.ones(1, len(tree_k), dtype=torch.bool)  # a chain: every earlier node
            feat[0] = self._expand(feat[0], [token], len(tree_k) + 1, anc, tree_k, tree_v)
            return self._full(self.logits(feat[0])[0])

        first = self._full(self.logits(self.last[None])[0])
        k = min(self.options.topk, budget)
        return draft_nodes(first, step, self.picker, budget, self.options.depth, k, 0.0, self.name)
