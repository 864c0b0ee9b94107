"""Self-speculative drafters: the target itself, with some sub-layers skipped, drafts for itself.

No second model, no training: the reduced model shares the target's weights and its KV cache (committed
tokens keep the full model's keys/values; drafted tokens write their slots past ``cache.length``, which
the verification forward then overwrites). All variants are lossless because the full target verifies.

- ``swift`` (SWIFT, arXiv 2410.06916): skip a set of attention and MLP sub-layers (first and last block
  kept) chosen on the fly. Once a request has committed ``context_window + 1`` tokens, each proposal
  first scores one candidate skip set by how well the reduced model predicts those committed tokens in
  one parallel forward over the cached context (the target's own outputs are the labels) and keeps it
  when it beats the incumbent. Candidates come from random search, swaps of the incumbent, and every
  ``bayes_interval``-th time a Gaussian-process upper-confidence-bound choice. The best set lives on
  the drafter, so later requests (of the same task) reuse and refine it.
- ``ffn-skip`` (after FFN-SkipLLM): skip the MLP sub-layers of a fixed fraction of middle-to-late blocks.
- ``early-exit`` (as LayerSkip / Kangaroo draft): the first ``exit_layer`` blocks, then the final norm
  and LM head.

Each drafts a chain, stopping after a token whose draft confidence is below ``threshold`` (SWIFT's 0.8).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leapdecode.checks import check_int
from leapdecode.draft import Draft, StepResult
from leapdecode.drafters.base import Drafter, DrafterHost, RequestContext, parse_options, register
from leapdecode.drafters.draft_model import Picker, check_fraction, draft_nodes
from leapdecode.errors import LeapError
from leapdecode.model.runner import Plan, Runner

ATTN, MLP = 0, 1
SubLayer = tuple[int, int]  # (ATTN or MLP, block index)
SkipSet = frozenset  # of SubLayer


def skip_plan(n_layers: int, skip: SkipSet) -> list[tuple[bool, bool]]:
    """The `layers` argument of `Transformer.forward`: (skip_attn, skip_mlp) per block."""
    return [((ATTN, b) in skip, (MLP, b) in skip) for b in range(n_layers)]


def _check_blocks(name: str, option: str, blocks, n_layers: int) -> tuple[int, ...]:
    if not isinstance(blocks, (list, tuple)) or not all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < n_layers for b in blocks
    ):
        raise LeapError(
            f"{name} option {option} must be a list of block indices in [0, {n_layers}), got {blocks!r}"
        )
    return tuple(sorted(set(blocks)))


# ---------------------------------------------------------------- the shared self-drafting loop


class SelfDrafter(Drafter):
    """Drafts a chain with the target's own weights and cache under `self.plan` (set by bind)."""

    name = "self"
    options_type: type  # each self-drafter's options dataclass
    model: Runner  # the target, set by bind
    _picker: Picker  # the request's token picker, set by start

    def __init__(self, **options):
        self.options = parse_options(self.options_type, options, self.name)
        self.plan: list[tuple[bool, bool]] = []
        self.ctx = RequestContext(())

    def bind(self, host: DrafterHost) -> None:
        self.model = host.target
        self.plan = self.initial_plan(self.model.cfg.n_layers)

    def initial_plan(self, n_layers: int) -> list[tuple[bool, bool]]:
        raise NotImplementedError

    def start(self, ctx: RequestContext) -> None:
        if ctx.cache is None:
            raise LeapError(f"{self.name} drafts on the target's cache: the request context has none")
        self.ctx = ctx
        self._picker = Picker(ctx.sampling, salt=0x5E1F)

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        cache = self.ctx.cache
        start = cache.length
        depth = min(self.options.num_draft, max_nodes, cache.max_len - start)
        if depth <= 0 or not tokens:
            return Draft(source=self.name)
        plan = self.plan
        try:
            first = self._run(tokens[-1], plan)
            return draft_nodes(
                first,
                lambda t: self._run(t, plan),
                self._picker,
                max_nodes,
                depth,
                1,
                self.options.threshold,
                self.name,
            )
        finally:
            cache.truncate(start)  # the drafted slots are overwritten by the verification forward

    def _run(self, token: int, plan) -> torch.Tensor:
        """One token through the reduced model at the next cache slot; logits [V] after it."""
        pos = self.ctx.cache.length
        ids = torch.tensor([token], device=self.model.device)  # [1]
        positions = torch.tensor([pos], device=self.model.device)  # [1]
        return self.model.forward(ids, positions, self.ctx.cache, plan=Plan(layers=tuple(plan))).logits[-1]


def _check_chain_options(name: str, num_draft, threshold) -> None:
    check_int(f"{name} option num_draft", num_draft, 1)
    check_fraction(name, "threshold", threshold)


# ---------------------------------------------------------------- early exit and FFN skipping


@dataclass(frozen=True)
class EarlyExitOptions:
    exit_layer: int | None = None  # blocks run by the draft; None = half of them
    num_draft: int = 10
    threshold: float = 0.8

    def __post_init__(self):
        if self.exit_layer is not None:
            check_int("early-exit option exit_layer", self.exit_layer, 1)
        _check_chain_options("early-exit", self.num_draft, self.threshold)


@register("early-exit")
class EarlyExit(SelfDrafter):
    """The first `exit_layer` blocks, then the target's final norm and LM head."""

    name = "early-exit"
    options_type = EarlyExitOptions

    def initial_plan(self, n_layers: int) -> list[tuple[bool, bool]]:
        exit_layer = self.options.exit_layer or max(1, n_layers // 2)
        if exit_layer > n_layers:
            raise LeapError(
                f"early-exit option exit_layer must be in [1, {n_layers}] for this model, got {exit_layer}"
            )
        return [(b >= exit_layer, b >= exit_layer) for b in range(n_layers)]


@dataclass(frozen=True)
class FFNSkipOptions:
    ratio: float = 0.5  # fraction of blocks whose MLP is skipped
    layers: tuple[int, ...] | None = None  # explicit blocks whose MLP is skipped (overrides ratio)
    num_draft: int = 10
    threshold: float = 0.8

    def __post_init__(self):
        check_fraction("ffn-skip", "ratio", self.ratio)
        _check_chain_options("ffn-skip", self.num_draft, self.threshold)


@register("ffn-skip")
class FFNSkip(SelfDrafter):
    """Skips the MLPs of a contiguous run of middle-to-late blocks, ending just before the last block
    (FFN-SkipLLM finds early and final blocks the least redundant)."""

    name = "ffn-skip"
    options_type = FFNSkipOptions

    def initial_plan(self, n_layers: int) -> list[tuple[bool, bool]]:
        if self.options.layers is not None:
            skipped = set(_check_blocks("ffn-skip", "layers", self.options.layers, n_layers))
        else:
            count = round(self.options.ratio * n_layers)
            last = n_layers - 2  # keep the final block
            skipped = set(range(max(0, last - count + 1), last + 1))
        return [(False, b in skipped) for b in range(n_layers)]


# ---------------------------------------------------------------- SWIFT's layer-set search


@dataclass(frozen=True)
class SwiftOptions:
    skip_ratio: float = 0.45  # fraction of the candidate sub-layers skipped (SWIFT's default)
    attn_skip: tuple[int, ...] | None = None  # initial skipped attention blocks (None = SWIFT's odd blocks)
    mlp_skip: tuple[int, ...] | None = None  # initial skipped MLP blocks
    search: bool = True  # optimise the skip set during generation
    context_window: int = 32  # committed tokens each candidate is scored on
    opt_interval: int = 1  # proposals between two candidate evaluations
    max_opt_iter: int = 300  # candidates evaluated in all, across requests
    max_tolerance: int = 100  # stop after this many candidates in a row that did not improve
    max_score: float = 0.95  # stop once the best set predicts more than this fraction of the window
    bayes_interval: int = 25  # every n-th candidate comes from the Gaussian process (0 = never)
    seed: int = 0  # of the search's random choices
    num_draft: int = 25  # SWIFT's max_step_draft
    threshold: float = 0.8

    def __post_init__(self):
        check_fraction("swift", "skip_ratio", self.skip_ratio)
        if (self.attn_skip is None) != (self.mlp_skip is None):
            raise LeapError("swift options attn_skip and mlp_skip must be given together")
        if not isinstance(self.search, bool):
            raise LeapError(f"swift option search must be true or false, got {self.search!r}")
        for name in ("context_window", "opt_interval", "max_opt_iter", "max_tolerance"):
            check_int(f"swift option {name}", getattr(self, name))
        check_int("swift option bayes_interval", self.bayes_interval, 0)
        check_int("swift option seed", self.seed, 0)
        check_fraction("swift", "max_score", self.max_score, closed_low=False)
        _check_chain_options("swift", self.num_draft, self.threshold)


class LayerSearch:
    """Search state over skip sets of `k` sub-layers among blocks 1..L-2 (all blocks when L < 3); lives
    across requests.

    Scores are tuples (fraction of window tokens predicted, -mean KL(target || draft)): the second part
    breaks ties among sets that predict equally often. Scores of different windows are not comparable,
    so each new window re-scores the incumbent first (`needs_rescore`).
    """

    def __init__(self, n_layers: int, ratio: float, initial: SkipSet | None, options: SwiftOptions):
        inner = range(1, n_layers - 1) if n_layers >= 3 else range(n_layers)  # keep the first and last block
        self.universe: list[SubLayer] = [(kind, b) for kind in (ATTN, MLP) for b in inner]
        self.k = int(len(self.universe) * ratio)
        self.best: SkipSet = initial if initial is not None else self._odd_blocks()
        self.best_score: tuple[float, float] | None = None
        self.options = options
        self.iterations = 0
        self.tolerance = 0
        self.done = not options.search or not self.universe
        self.rng = random.Random(options.seed)
        self.observed: list[tuple[SkipSet, float]] = []  # (set, match) for the Gaussian process
        self._tried: set[SkipSet] = set()

    def _odd_blocks(self) -> SkipSet:
        """SWIFT's start: attention and MLP of the odd blocks, trimmed or extended to k sub-layers."""
        order = sorted(self.universe, key=lambda s: (s[1] % 2 == 0, s[1], s[0]))
        return frozenset(order[: self.k])

    @property
    def needs_rescore(self) -> bool:
        return self.best_score is None

    def new_window(self) -> None:
        """A new request: its window must score the incumbent again (once the search is done, the last
        score stays for reports)."""
        if not self.done:
            self.best_score = None
        self._tried = {self.best}

    def set_incumbent_score(self, score: tuple[float, float]) -> None:
        self.best_score = score
        self.observed.append((self.best, score[0]))
        self._stop_if_good(score)

    def candidate(self) -> SkipSet:
        """The next skip set to score (not yet tried on this window when one is left)."""
        use_gp = self.options.bayes_interval and (self.iterations + 1) % self.options.bayes_interval == 0
        for _ in range(32):
            if use_gp and len(self.observed) >= 2:
                cand = self._gp_choice()
            elif self.iterations % 2 == 0:
                cand = frozenset(self.rng.sample(self.universe, self.k))
            else:
                cand = self._swap(self.best, 1 + (self.rng.random() < 0.3))
            if cand not in self._tried:
                break
            use_gp = False
        self._tried.add(cand)
        return cand

    def report(self, cand: SkipSet, score: tuple[float, float]) -> bool:
        """Record a scored candidate; True when it became the incumbent."""
        self.iterations += 1
        self.observed.append((cand, score[0]))
        better = self.best_score is None or score > self.best_score
        if better:
            self.best, self.best_score, self.tolerance = cand, score, 0
            self._stop_if_good(score)
        else:
            self.tolerance += 1
        if self.tolerance >= self.options.max_tolerance or self.iterations >= self.options.max_opt_iter:
            self.done = True
        return better

    def _stop_if_good(self, score) -> None:
        if score[0] > self.options.max_score:
            self.done = True

    def _swap(self, base: SkipSet, n: int) -> SkipSet:
        inside, outside = sorted(base), sorted(set(self.universe) - base)
        if not inside or not outside:
            return base
        n = min(n, len(inside), len(outside))
        out = set(base) - set(self.rng.sample(inside, n))
        return frozenset(out | set(self.rng.sample(outside, n)))

    # -------------------------------------------------- Gaussian-process upper confidence bound

    def _vector(self, s: SkipSet) -> list[float]:
        return [1.0 if u in s else 0.0 for u in self.universe]

    def _gp_choice(self, pool_size: int = 128, kappa: float = 2.5, noise: float = 1e-2) -> SkipSet:
        """Among random sets and single swaps of the incumbent, the one with the highest UCB under a
        GP (RBF kernel on set indicators) fitted to every score so far."""
        pool = [frozenset(self.rng.sample(self.universe, self.k)) for _ in range(pool_size)]
        pool += [self._swap(self.best, 1) for _ in range(pool_size)]
        pool = [p for p in dict.fromkeys(pool) if p not in self._tried] or pool
        x = torch.tensor([self._vector(s) for s, _ in self.observed], dtype=torch.float64)  # [N, d]
        y = torch.tensor([v for _, v in self.observed], dtype=torch.float64)  # [N]
        xs = torch.tensor([self._vector(s) for s in pool], dtype=torch.float64)  # [M, d]
        scale = 2.0 * max(len(self.universe) / 4.0, 1.0)  # 2 l^2: one swap keeps correlation high

        def kernel(a, b):
            return torch.exp(-torch.cdist(a, b).pow(2) / scale)

        chol = torch.linalg.cholesky(kernel(x, x) + noise * torch.eye(len(x), dtype=torch.float64))
        mean = y.mean()
        alpha = torch.cholesky_solve((y - mean)[:, None], chol)  # [N, 1]
        ks = kernel(xs, x)  # [M, N]
        mu = mean + (ks @ alpha)[:, 0]
        v = torch.cholesky_solve(ks.T, chol)  # [N, M]
        var = (1.0 - (ks * v.T).sum(-1)).clamp_min(0.0)
        return pool[int(torch.argmax(mu + kappa * var.sqrt()))]


@register("swift")
class Swift(SelfDrafter):
    """SWIFT self-speculation with on-the-fly layer-set optimisation; see the module docstring."""

    name = "swift"
    options_type = SwiftOptions
    wants_logits = True

    search: LayerSearch  # the skip-set search, set by bind

    def __init__(self, **options):
        super().__init__(**options)
        self._n_layers = 0
        self._prompt_len = 0
        self._ref: list[torch.Tensor] = []  # target logits at the window's inputs, [V] each
        self._proposals = 0

    def bind(self, host: DrafterHost) -> None:
        n = host.target.cfg.n_layers
        initial = None
        if self.options.attn_skip is not None:
            initial = frozenset(
                [(ATTN, b) for b in _check_blocks("swift", "attn_skip", self.options.attn_skip, n)]
                + [(MLP, b) for b in _check_blocks("swift", "mlp_skip", self.options.mlp_skip, n)]
            )
        self._n_layers = n
        self.search = LayerSearch(n, self.options.skip_ratio, initial, self.options)
        super().bind(host)

    def initial_plan(self, n_layers: int) -> list[tuple[bool, bool]]:
        return skip_plan(n_layers, self.search.best)

    @property
    def skip_layers(self) -> dict[str, list[int]]:
        """The current skip set, as block indices per sub-layer kind."""
        best = self.search.best
        return {
            "attn": sorted(b for k, b in best if k == ATTN),
            "mlp": sorted(b for k, b in best if k == MLP),
        }

    # -------------------------------------------------- per request

    def start(self, ctx: RequestContext) -> None:
        super().start(ctx)
        self._prompt_len = len(ctx.prompt_ids)
        self._ref = []
        self._proposals = 0
        self.search.new_window()

    def observe(self, step: StepResult) -> None:
        need = self.options.context_window - len(self._ref)
        if self.search.done or need <= 0:
            return
        rows = [0] + [1 + i for i in step.accepted]  # logits at the root and at each accepted node
        self._ref += [row.detach().clone() for row in step.logits[rows[:need]]]

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        self._proposals += 1
        if self._window_ready() and (
            self._proposals % self.options.opt_interval == 0 or self.search.needs_rescore
        ):
            self._optimise_once(tokens)
        return super().propose(tokens, max_nodes)

    def _window_ready(self) -> bool:
        w = self.options.context_window
        cache = self.ctx.cache
        return not self.search.done and len(self._ref) >= w and cache.length + w <= cache.max_len

    def _optimise_once(self, tokens: Sequence[int]) -> None:
        search = self.search
        if search.needs_rescore:
            search.set_incumbent_score(self.score(search.best, tokens))
            return
        cand = search.candidate()
        if search.report(cand, self.score(cand, tokens)):
            self.plan = skip_plan(self._n_layers, search.best)

    def score(self, skip: SkipSet, tokens: Sequence[int]) -> tuple[float, float]:
        """(fraction of the window's next tokens the reduced model predicts like the target, -mean KL).

        The window is the first `context_window` generated tokens; one forward over them attends to the
        cached prompt and, causally, to each other (the cache's copies of the window are masked out), and
        writes only slots past `cache.length`, so the committed cache is untouched.
        """
        cache, p, w = self.ctx.cache, self._prompt_len, self.options.context_window
        n, dev = cache.length, self.model.device
        ids = torch.tensor(list(tokens[p : p + w]), device=dev)  # [W]
        positions = torch.arange(p, p + w, device=dev)  # [W]
        mask = torch.zeros(w, n + w, dtype=torch.bool, device=dev)  # [W, n + W]
        mask[:, :p] = True
        mask[:, n:] = torch.ones(w, w, dtype=torch.bool, device=dev).tril()
        plan = Plan(layers=tuple(skip_plan(self._n_layers, skip)), advance=False)
        logits = self.model.forward(ids, positions, cache, mask, plan).logits.to(torch.float64)  # [W, V]
        ref = torch.stack(self._ref[:w]).to(torch.float64)  # [W, V]
        match = (logits.argmax(-1) == ref.argmax(-1)).double().mean().item()
        ref_logp = F.log_softmax(ref, -1)
        kl = (ref_logp.exp() * (ref_logp - F.log_softmax(logits, -1))).sum(-1).mean().item()
        return match, -kl if math.isfinite(kl) else -math.inf
