"""`auto`: one tree per step from several drafters, sized by expected tokens per second.

Every source drafter proposes; the proposals are merged into one token trie. Each node's chance of being
accepted given its parent is estimated from this drafter's own history, per (source, depth, sibling
rank) and, finer, per the source's evidence (the length of the context match the draft came from and the
source's own score of the node): a long match is accepted far more often than a one-token match, so
the evidence decides whether a proposal is worth verifying. A node's path probability is the product
along its path, and the expected tokens a tree commits is
1 (the bonus) plus the sum of its nodes' path probabilities. Taking nodes by decreasing path probability
always gives a valid tree, so the tree size N is chosen to maximise

    (1 + sum of the N best path probabilities) / (cost(1 + N) + overhead)

with `cost` the measured time of a forward of 1 + N tokens after the current context on this machine
(`leapdecode.costmodel`) and `overhead` this drafter's measured time per step outside the forward
(drafting, acceptance, bookkeeping), which fewer, larger steps pay less often.
When no proposal is worth its cost, N = 0: the step is plain decoding, and speculation cost only the
drafters' lookups. When the trees chosen lately were expected to save less time per step than the
lookups take (as in a large served batch, where an extra row costs about what a step does), the lookups
rest too, tried again every `probe_every` steps. The merged draft carries no probabilities, so
verification treats it as a deterministic proposal, which is exact under sampling too.

A source whose proposing is itself costly (a draft model: one forward per drafted token) is called only
while it pays: on each step that calls it, the best tree's expected rate is compared with the best tree
without its nodes and without its drafting time; when the average gain turns negative the source rests,
and is tried again every `probe_every` steps. With a draft model configured on the host, `auto`
includes it among its default sources; so it does a configured eagle head (drafter options for
"eagle"; it reads the target's hidden states, so `auto` asks for them when a source does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from leapdecode.draft import Draft, StepResult
from leapdecode.drafters.base import Drafter, DrafterHost, RequestContext, parse_options, register
from leapdecode.errors import LeapError

MAX_DEPTH_KEY, MAX_RANK_KEY = 12, 4
MATCH_BINS = (2, 4, 8, 16)  # match lengths up to each bound share a bin; longer ones the last
SCORE_BINS = (0.3, 0.6, 0.95)  # a source's own node score (its estimated path probability)


def evidence(draft: Draft, node: int) -> tuple[int, int]:
    """(match-length bin, score bin) of a draft node; score bin -1 when the source gives no scores."""
    mbin = next((i for i, bound in enumerate(MATCH_BINS) if draft.match_len <= bound), len(MATCH_BINS))
    if draft.scores is None:
        return mbin, -1
    score = draft.scores[node]
    return mbin, next((i for i, bound in enumerate(SCORE_BINS) if score < bound), len(SCORE_BINS))


@dataclass(frozen=True)
class AutoOptions:
    # measured (BENCHMARKS.md): recycling's wide trees cost more to verify than they return on a 2-core
    # CPU, and pld adds drafting time but little the suffix index does not already find
    sources: tuple[str, ...] = ("suffix", "copy")
    max_nodes: int = 64  # largest tree considered
    prior_rate: float = 0.3  # acceptance rate assumed before any evidence (explores every source)
    prior_weight: float = 2.0  # how many observations the prior is worth
    memory: int = 400  # observations per key before old evidence is halved (adapts to new tasks)
    costly: float = 0.1  # a source drafting longer than this share of a one-token forward is gated
    probe_every: int = 16  # steps between tries of a resting costly source
    warmup: int = 8  # proposals a costly source always makes first, so its acceptance is known

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources or "auto" in self.sources:
            raise LeapError("auto option sources must name at least one drafter other than auto")
        if not 1 <= self.max_nodes <= 512:
            raise LeapError(f"auto option max_nodes must be in [1, 512], got {self.max_nodes}")
        if not 0.0 < self.prior_rate < 1.0 or self.prior_weight <= 0 or self.memory < 10:
            raise LeapError("auto options: prior_rate in (0, 1), prior_weight > 0, memory >= 10")
        if self.costly < 0 or self.probe_every < 1 or self.warmup < 0:
            raise LeapError("auto options: costly >= 0, probe_every >= 1 and warmup >= 0")


@dataclass
class AcceptanceStats:
    """Acceptance counts of nodes whose parent was accepted, per (source, depth, sibling rank) and per
    (source, depth, rank, evidence). An estimate with few observations leans on its prior: the same
    estimate one level up (acceptance deep in a long match resembles acceptance just above it), and at
    depth 1 the estimate without evidence, then `prior_rate`."""

    prior_rate: float
    prior_weight: float
    memory: int
    counts: dict[tuple, list[float]] = field(default_factory=dict)

    @staticmethod
    def key(source: str, depth: int, rank: int) -> tuple[str, int, int]:
        return source, min(depth, MAX_DEPTH_KEY), min(rank, MAX_RANK_KEY)

    def rate(self, source: str, depth: int, rank: int, ev: tuple[int, int] | None = None) -> float:
        depth = min(depth, MAX_DEPTH_KEY)
        if ev is None:
            prior = self.prior_rate if depth <= 1 else self.rate(source, depth - 1, rank)
            key: tuple = self.key(source, depth, rank)
        else:
            prior = self.rate(source, depth, rank) if depth <= 1 else self.rate(source, depth - 1, rank, ev)
            key = (*self.key(source, depth, rank), *ev)
        hits, tries = self.counts.get(key, (0.0, 0.0))
        return (hits + prior * self.prior_weight) / (tries + self.prior_weight)

    def update(
        self, source: str, depth: int, rank: int, accepted: bool, ev: tuple[int, int] | None = None
    ) -> None:
        coarse = self.key(source, depth, rank)
        for key in (coarse, (*coarse, *ev)) if ev is not None else (coarse,):
            c = self.counts.setdefault(key, [0.0, 0.0])
            c[0] += accepted
            c[1] += 1
            if c[1] > self.memory:
                c[0], c[1] = c[0] / 2, c[1] / 2


@dataclass
class _Node:
    token: int
    parent: int
    depth: int
    # source -> (sibling rank in that source's draft, evidence of that source for this node)
    origins: dict[str, tuple[int, tuple[int, int]]] = field(default_factory=dict)
    prob: float = 0.0  # estimated probability that the whole path to this node is accepted


@register("auto")
class Auto(Drafter):
    name = "auto"
    wants_logits = True
    uses_cost = True

    def __init__(self, **options):
        self.options = parse_options(AutoOptions, options, "auto")
        self._default_sources = "sources" not in options
        self.stats = AcceptanceStats(self.options.prior_rate, self.options.prior_weight, self.options.memory)
        self.sources: dict[str, Drafter] = {}
        self.host: DrafterHost | None = None
        self._last: list[_Node] = []
        self.draft_s: dict[str, float] = {}  # moving average of each source's proposing time
        self.gain: dict[str, float] = {}  # costly source -> moving average of its relative gain in rate
        self._rested: dict[str, int] = {}  # costly source -> steps since it last proposed
        self._calls: dict[str, int] = {}  # source -> proposals made
        self._spent = 0.0  # moving average, as `overhead`, of costly sources' time per step
        self.overhead = 0.0  # moving average of a step's time outside the verification forward
        self._proposed_at = 0.0  # when the current step's proposal began
        self._proposing = False
        self._worth: float | None = None  # see `_note_worth`
        self._resting = 0  # steps since the lookups last ran, while they rest

    def bind(self, host: DrafterHost) -> None:
        if host.make is None:
            raise LeapError("auto needs a host that makes its source drafters")
        self.host = host
        names = list(self.options.sources)
        if self._default_sources and "draft-model" in host.options:
            names.append("draft-model")  # a draft model was configured: let it prove itself
        self.sources = {name: host.make(name) for name in names}
        if self._default_sources:
            self.sources |= self._trained(host)
        self.wants_hidden = any(getattr(d, "wants_hidden", False) for d in self.sources.values())

    @staticmethod
    def _trained(host: DrafterHost) -> dict[str, Drafter]:
        """The eagle head when the host configures it (drafter options for "eagle"): a costly source like
        the draft model, called while it pays. Not by default: the shipped head is undertrained, and a
        resting head still reads every step's states (measured: auto with it took 1.5x the time of auto
        without it on the bundled model)."""
        if host.target is None or host.make is None or "eagle" not in host.options:
            return {}
        try:
            return {"eagle": host.make("eagle")}
        except LeapError:  # no head for this model
            return {}

    def start(self, ctx: RequestContext) -> None:
        self._proposing = False  # until the first proposal, steps are the prefill's (for trained heads)
        for d in self.sources.values():
            d.start(ctx)

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        self._proposed_at, self._proposing = time.perf_counter(), True
        if self._rests():
            for name in self._lookups():
                self.sources[name].propose(tokens, 0)  # keeps its index in step with the text
            self._last = []
            return Draft(source=self.name)
        budget = min(max_nodes, self.options.max_nodes)
        called = [name for name in self.sources if self._should_call(name)]
        nodes = self._merge(tokens, budget, called)
        costly = [name for name in called if self._is_costly(name)]
        for name in costly:
            self._weigh(name, nodes, budget, len(tokens))
        self._spent += 0.05 * (sum(self.draft_s[name] for name in costly) - self._spent)
        chosen = self._choose(nodes, budget, len(tokens))
        self._last = chosen
        return Draft([n.token for n in chosen], [n.parent for n in chosen], source=self.name)

    # ------------------------------------------------------------ resting

    def _rests(self) -> bool:
        """Whether this step skips the cheap sources (`_lookups`): when the trees made lately were
        expected to save less time per step than those lookups take (in a large batch, where an extra row
        costs about what a step does, no tree pays and the lookups are the only cost left). Tried every
        `probe_every` steps, so that text that starts to repeat is found again."""
        lookups = sum(self.draft_s.get(name, 0.0) for name in self._lookups())
        if self._worth is None or self._worth * self._step_s() >= lookups:
            self._resting = 0
            return False
        self._resting += 1
        if self._resting >= self.options.probe_every:
            self._resting = 0
            return False
        return True

    def _lookups(self) -> list[str]:
        """The sources that cost little per call (costly ones rest on their own gain, below)."""
        return [name for name in self.sources if not self._is_costly(name)]

    def _step_s(self) -> float:
        return self._one_token_s() + self.overhead

    def _note_worth(self, gain: float) -> None:
        """Moving average of the chosen tree's expected gain in tokens per second over plain decoding."""
        self._worth = gain if self._worth is None else self._worth + 0.1 * (gain - self._worth)

    # ------------------------------------------------------------ costly sources

    def _curve(self):
        """The measured cost of verifying k tokens; without a host, one unit per token."""
        if self.host is None or self.host.cost is None:
            return lambda k, context=None: float(k)
        return self.host.cost()

    def _one_token_s(self) -> float:
        return self._curve()(1)

    def _is_costly(self, name: str) -> bool:
        return self.draft_s.get(name, 0.0) > self.options.costly * self._one_token_s()

    def _should_call(self, name: str) -> bool:
        warming = self._calls.get(name, 0) < self.options.warmup
        if warming or not self._is_costly(name) or self.gain.get(name, 0.0) >= 0.0:
            self._rested[name] = 0
            return True
        self._rested[name] = self._rested.get(name, 0) + 1
        if self._rested[name] >= self.options.probe_every:
            self._rested[name] = 0
            return True
        return False

    def _weigh(self, name: str, nodes: list[_Node], budget: int, context: int) -> None:
        """Update the source's gain: best expected rate with it over the best without it."""
        base = max(0.0, self.overhead - self._spent)  # the rest of a step
        depths = [n.depth for n in nodes]
        with_it = self._best(self._probs(nodes), depths, budget, context, base + self.draft_s[name])[1]
        without = self._best(self._probs(nodes, exclude=name), depths, budget, context, base)[1]
        g = with_it / without - 1.0
        self.gain[name] = g if name not in self.gain else self.gain[name] + 0.2 * (g - self.gain[name])

    # ------------------------------------------------------------ the tree

    def _merge(self, tokens: Sequence[int], budget: int, called: Sequence[str]) -> list[_Node]:
        nodes: list[_Node] = []
        where: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
        for name in called:
            t0 = time.perf_counter()
            draft = self.sources[name].propose(tokens, budget).truncated(budget) if budget else Draft()
            took = time.perf_counter() - t0
            self._calls[name] = self._calls.get(name, 0) + 1
            self.draft_s[name] = self.draft_s.get(name, took) + 0.1 * (took - self.draft_s.get(name, took))
            mapped: list[int] = []
            seen: dict[int, int] = {}
            for i, (tok, parent) in enumerate(zip(draft.token_ids, draft.parents)):
                mparent = -1 if parent < 0 else mapped[parent]
                rank = seen.get(parent, 0)
                seen[parent] = rank + 1
                key = (mparent, tok)
                if key not in where:
                    depth = 1 if mparent < 0 else nodes[mparent].depth + 1
                    where[key] = len(nodes)
                    nodes.append(_Node(tok, mparent, depth))
                node = nodes[where[key]]
                node.origins.setdefault(name, (rank, evidence(draft, i)))
                mapped.append(where[key])
        for node, prob in zip(nodes, self._probs(nodes)):
            node.prob = prob
        return nodes

    def _probs(self, nodes: list[_Node], exclude: str | None = None) -> list[float]:
        """Path probabilities (parents precede children); 0 for nodes only `exclude` proposed."""
        probs: list[float] = []
        for node in nodes:
            rates = [
                self.stats.rate(s, node.depth, r, ev) for s, (r, ev) in node.origins.items() if s != exclude
            ]
            probs.append(max(rates, default=0.0) * (1.0 if node.parent < 0 else probs[node.parent]))
        return probs

    def _best(
        self, probs: list[float], depths: list[int], budget: int, context: int, extra: float
    ) -> tuple[list[int], float]:
        """(indices of the best-N nodes by path probability, their expected tokens per second), N
        maximising that rate; `extra` is paid once per step whatever its size."""
        order = sorted(range(len(probs)), key=lambda i: (-probs[i], depths[i], i))[:budget]
        curve = self._curve()
        best_n, best_rate, expected = 0, 1.0 / (curve(1, context) + extra), 1.0
        for n, i in enumerate(order, start=1):
            if probs[i] <= 0.0:
                break
            expected += probs[i]
            rate = expected / (curve(1 + n, context) + extra)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return order[:best_n], best_rate

    def _choose(self, nodes: list[_Node], budget: int, context: int) -> list[_Node]:
        """The best-N nodes by path probability, N maximising expected tokens per second."""
        best, rate = self._best(
            [n.prob for n in nodes], [n.depth for n in nodes], budget, context, self.overhead
        )
        self._note_worth(rate * (self._curve()(1, context) + self.overhead) - 1.0)
        keep = sorted(best)  # original order keeps parents first
        index = {old: new for new, old in enumerate(keep)}
        return [
            _Node(
                nodes[i].token,
                -1 if nodes[i].parent < 0 else index[nodes[i].parent],
                nodes[i].depth,
                nodes[i].origins,
                nodes[i].prob,
            )
            for i in keep
        ]

    def observe(self, step: StepResult) -> None:
        if not self._proposing:  # the prefill, for sources that read hidden states
            for d in self.sources.values():
                d.observe(step)
            return
        took = time.perf_counter() - self._proposed_at - step.forward_s
        self.overhead += 0.05 * (took - self.overhead)
        accepted = set(step.accepted)
        for i, node in enumerate(self._last):
            if node.parent < 0 or node.parent in accepted:  # the node was reachable this step
                for source, (rank, ev) in node.origins.items():
                    self.stats.update(source, node.depth, rank, i in accepted, ev)
        self._last = []
        for d in self.sources.values():
            d.observe(step)

    def stop(self) -> None:
        for d in self.sources.values():
            d.stop()
