"""`auto`: merging of proposals, cost-based tree size, acceptance statistics, defaults."""

from __future__ import annotations

import pytest
import torch

from leapdecode.costmodel import CostCurve, CostModel
from leapdecode.draft import Draft
from leapdecode.drafters import DrafterHost, StepResult, make_drafter
from leapdecode.drafters.auto import AcceptanceStats, Auto, AutoOptions, evidence
from leapdecode.errors import LeapError


class FixedDrafter:
    name = "fixed"

    def __init__(self, draft):
        self.draft = draft
        self.observed = 0

    def propose(self, tokens, max_nodes):
        return self.draft

    def observe(self, step):
        self.observed += 1

    def start(self, ctx):
        pass

    def stop(self):
        pass


def fake_host(curve, options=None, make=None) -> DrafterHost:
    """A host whose verification cost is `curve` (no model behind it)."""
    return DrafterHost(target=None, options=options or {}, cost=lambda: curve, make=make)


FLAT = CostCurve((1, 64), (1.0, 1.0))  # verification is free: every proposal pays
STEEP = CostCurve((1, 2, 64), (1.0, 2.0, 64.0))  # cost linear in tokens: nothing pays


def auto_with(sources: dict, curve: CostCurve) -> Auto:
    a = Auto(sources=tuple(sources))
    a.host, a.sources = fake_host(curve), sources
    return a


def test_merges_shared_prefixes_into_one_trie():
    a = auto_with(
        {"x": FixedDrafter(Draft.chain([5, 6, 7])), "y": FixedDrafter(Draft([5, 9], [-1, 0]))}, FLAT
    )
    d = a.propose([1, 2, 3], 16)
    assert d.token_ids == [5, 6, 7, 9] and d.parents == [-1, 0, 1, 0]
    assert a._last[0].origins == {
        "x": (0, (0, -1)),
        "y": (0, (0, -1)),
    }  # rank 0, shortest-match bin, no scores


def test_cost_decides_the_tree_size():
    sources = {"x": FixedDrafter(Draft.chain([5, 6, 7]))}
    assert len(auto_with(sources, FLAT).propose([1], 16)) == 3
    assert len(auto_with(sources, STEEP).propose([1], 16)) == 0


def test_budget_is_respected_and_keeps_a_tree():
    a = auto_with({"x": FixedDrafter(Draft([1, 2, 3, 4, 5], [-1, 0, 0, 1, -1]))}, FLAT)
    d = a.propose([0], 3)
    assert len(d) == 3
    Draft(d.token_ids, d.parents)  # validates the parents


def test_observe_updates_statistics_and_forwards_to_sources():
    src = FixedDrafter(Draft.chain([5, 6]))
    a = auto_with({"x": src}, FLAT)
    before = a.stats.rate("x", 1, 0)
    draft = a.propose([1], 8)
    step = StepResult(draft, [1, 5, 6], torch.zeros(3, 10), accepted=[0], bonus=3)
    a.observe(step)
    assert a.stats.rate("x", 1, 0) > before  # depth 1 accepted
    assert a.stats.rate("x", 2, 0) < a.stats.rate("x", 1, 0)  # depth 2 was reachable and rejected
    assert src.observed == 1


def test_deep_nodes_borrow_the_acceptance_of_the_level_above():
    s = AcceptanceStats(prior_rate=0.3, prior_weight=2.0, memory=400)
    for _ in range(50):
        for depth in (1, 2, 3):
            s.update("x", depth, 0, True, (4, -1))  # a long match: always right so far
    assert s.rate("x", 3, 0, (4, -1)) > 0.9
    assert s.rate("x", 9, 0, (4, -1)) > 0.9  # never observed that deep: leans on depth 3, not on 0.3
    assert s.rate("x", 9, 0, (0, -1)) < s.rate("x", 9, 0, (4, -1))  # an unseen bin: the coarser estimate
    assert s.rate("y", 5, 0) == pytest.approx(0.3)  # nothing known: the prior all the way down


def test_acceptance_stats_forget_old_evidence():
    s = AcceptanceStats(prior_rate=0.3, prior_weight=2.0, memory=10)
    for _ in range(50):
        s.update("x", 1, 0, False)
    assert s.counts[("x", 1, 0)][1] <= 10
    assert s.key("x", 99, 9) == ("x", 12, 4)


@pytest.mark.parametrize(
    "match_len,scores,expected",
    [
        (0, None, (0, -1)),
        (2, None, (0, -1)),
        (3, None, (1, -1)),
        (8, None, (2, -1)),
        (16, None, (3, -1)),
        (17, None, (4, -1)),
        (5, [0.1], (2, 0)),
        (5, [0.5], (2, 1)),
        (5, [0.9], (2, 2)),
        (5, [1.0], (2, 3)),
    ],
)
def test_evidence_bins(match_len, scores, expected):
    assert evidence(Draft([4], [-1], scores=scores, match_len=match_len), 0) == expected


def test_evidence_learns_which_matches_to_verify():
    """A source whose long matches are always right and short ones always wrong: after some steps auto
    verifies the long-match proposals and skips the short-match ones."""
    curve = CostCurve((1, 2, 64), (1.0, 1.2, 40.0))  # one draft token pays when accepted 20% of the time
    src = FixedDrafter(Draft.chain([5], match_len=20))
    a = auto_with({"x": src}, curve)
    for long_match in [True, False] * 20:
        src.draft = Draft.chain([5], match_len=20 if long_match else 1)
        d = a.propose([1], 8)
        if len(d):
            a.observe(StepResult(d, [1, 5], torch.zeros(2, 10), accepted=[0] if long_match else [], bonus=3))
    src.draft = Draft.chain([5], match_len=20)
    assert len(a.propose([1], 8)) == 1
    src.draft = Draft.chain([5], match_len=1)
    assert len(a.propose([1], 8)) == 0
    assert a.stats.rate("x", 1, 0, (4, -1)) > 0.8 and a.stats.rate("x", 1, 0, (0, -1)) < 0.2


def test_defaults_and_validation():
    opts = AutoOptions()
    assert opts.sources == ("suffix", "copy") and opts.max_nodes == 64
    assert isinstance(make_drafter("auto"), Auto)
    for bad in (
        {"sources": ()},
        {"sources": ("auto",)},
        {"max_nodes": 0},
        {"prior_rate": 1.5},
        {"costly": -1},
        {"probe_every": 0},
        {"warmup": -1},
    ):
        with pytest.raises(LeapError):
            Auto(**bad)
    with pytest.raises(LeapError, match="unknown auto option"):
        Auto(colour="red")


def test_cost_curve_interpolates_and_extrapolates():
    c = CostCurve((1, 4, 8), (1.0, 2.0, 4.0))
    assert c(1) == 1.0 and c(2) == pytest.approx(4 / 3) and c(6) == 3.0 and c(16) == 8.0
    assert c.relative() == {1: 1.0, 4: 2.0, 8: 4.0}
    with pytest.raises(ValueError):
        CostCurve((4, 1), (1.0, 2.0))


def test_cost_model_is_linear_in_the_context():
    m = CostModel((100, 1100), (CostCurve((1, 8), (1.0, 2.0)), CostCurve((1, 8), (2.0, 10.0))))
    assert m(8) == 2.0  # no context: the shortest one
    assert m(8, 100) == 2.0 and m(8, 1100) == 10.0 and m(8, 600) == pytest.approx(6.0)
    assert m(8, 2100) == pytest.approx(18.0)  # extrapolated: attention keeps growing with the context
    assert m(8, 0) == pytest.approx(1.2) and m(1, -(10**6)) == 0.5  # floored at half the shortest curve
    assert m.relative(1100) == {1: 1.0, 8: 5.0}
    with pytest.raises(ValueError):
        CostModel((5, 1), (CostCurve((1,), (1.0,)), CostCurve((1,), (1.0,))))


def test_measured_model_on_a_tiny_model(tiny_engine):
    model = tiny_engine.cost_curve()
    assert (
        len(model.contexts) == 2 and model.contexts[0] < model.contexts[1] < tiny_engine.model.cfg.max_seq_len
    )
    for curve in model.curves:
        assert curve.ks[0] == 1 and all(b >= a for a, b in zip(curve.seconds, curve.seconds[1:]))
    assert tiny_engine.cost_curve() is model  # measured once


def test_auto_sizes_trees_by_the_cost_at_the_current_context():
    short = CostCurve((1, 2, 64), (1.0, 1.1, 64.0))  # a draft token costs 10% at a short context
    long = CostCurve((1, 2, 64), (1.0, 3.0, 200.0))  # and 3x at a long one
    src = FixedDrafter(Draft.chain([5], match_len=3))
    a = auto_with({"x": src}, CostModel((10, 1000), (short, long)))
    assert len(a.propose([1] * 10, 8)) == 1
    assert len(a.propose([1] * 1000, 8)) == 0


def test_saved_curve_is_reused_only_for_the_same_code(tiny_engine, tmp_path, monkeypatch):
    from leapdecode import costmodel

    describe = {"model": "tiny", "threads": 1}
    first = costmodel.cached(tiny_engine.model, describe, tmp_path)
    saved = list(tmp_path.glob("cost-*.json"))
    assert len(saved) == 1 and costmodel.cached(tiny_engine.model, describe, tmp_path) == first
    monkeypatch.setattr(costmodel, "code_fingerprint", lambda: "other code")
    costmodel.cached(tiny_engine.model, describe, tmp_path)
    assert len(list(tmp_path.glob("cost-*.json"))) == 2  # a code change measures again


class FakeClock:
    """`time` for the auto module: only a SlowDrafter's proposing advances it, so the costs auto measures
    are exact whatever else runs on the machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    import leapdecode.drafters.auto as auto_module

    fake = FakeClock()
    monkeypatch.setattr(auto_module, "time", fake)
    return fake


class SlowDrafter(FixedDrafter):
    """A source whose proposing takes `seconds` of the fake clock, like a draft model."""

    def __init__(self, draft, clock: FakeClock, seconds=0.002):
        super().__init__(draft)
        self.seconds, self.calls, self.clock = seconds, 0, clock
        self.empty_calls = 0  # calls with no budget: keeping up with the text only

    def propose(self, tokens, max_nodes):
        self.calls += 1
        if max_nodes == 0:
            self.empty_calls += 1
            return Draft()
        self.clock.now += self.seconds
        return self.draft


FLAT_MS = CostCurve((1, 64), (0.001, 0.001))  # a 1 ms forward whatever its size


def run_steps(a: Auto, n: int, right: set[int]) -> None:
    """n steps in which exactly the depth-1 nodes whose token is in `right` (and their chains) are
    accepted."""
    for _ in range(n):
        d = a.propose([1], 16)
        accepted, path = [], -1
        for i, (tok, parent) in enumerate(zip(d.token_ids, d.parents)):
            if parent == path and tok in right:
                accepted.append(i)
                path = i
        a.observe(StepResult(d, [1] + d.token_ids, torch.zeros(1 + len(d), 10), accepted=accepted, bonus=3))


def test_a_costly_source_that_does_not_pay_rests_and_is_probed(clock):
    slow = SlowDrafter(Draft.chain([7, 8]), clock)  # never right
    a = auto_with({"x": FixedDrafter(Draft.chain([5])), "slow": slow}, FLAT_MS)
    run_steps(a, 64, right={5})
    assert a.gain["slow"] < 0
    # its first proposals, then a try now and then, not every step
    assert slow.calls <= a.options.warmup + 64 // a.options.probe_every + 1


def test_a_costly_source_that_pays_keeps_proposing(clock):
    slow = SlowDrafter(Draft.chain([5, 6, 7]), clock, seconds=0.001)  # always right, as dear as a forward
    a = auto_with({"slow": slow}, FLAT_MS)
    run_steps(a, 40, right={5, 6, 7})
    assert slow.calls == 40 and a.gain["slow"] > 0


def test_lookups_that_find_nothing_worth_verifying_rest_and_are_probed(clock):
    wrong = SlowDrafter(Draft.chain([7, 8]), clock, seconds=0.00005)  # cheap (not costly), never right
    a = auto_with({"wrong": wrong}, FLAT_MS)
    run_steps(a, 200, right=set())
    assert a._worth is not None and a._worth * a._step_s() < a.draft_s["wrong"]
    proposing = wrong.calls - wrong.empty_calls  # calls with a budget (resting ones pass 0)
    assert 200 // a.options.probe_every <= proposing < 100


def test_lookups_that_pay_run_every_step(clock):
    right = SlowDrafter(Draft.chain([5, 6]), clock, seconds=0.00005)
    a = auto_with({"right": right}, FLAT_MS)
    run_steps(a, 200, right={5, 6})
    assert right.calls - right.empty_calls == 200


def test_a_configured_draft_model_joins_the_default_sources():
    def host(options):
        return fake_host(FLAT, options, make=lambda name: FixedDrafter(Draft()))

    a = Auto()
    a.bind(host({"draft-model": {"path": "d.gguf"}}))
    assert list(a.sources) == ["suffix", "copy", "draft-model"]
    b = Auto(sources=("suffix",))
    b.bind(host({"draft-model": {"path": "d.gguf"}}))
    assert list(b.sources) == ["suffix"]  # sources given explicitly are kept as given
    c = Auto()
    c.bind(host({}))
    assert list(c.sources) == ["suffix", "copy"]


def test_a_saved_curve_is_keyed_by_the_kernels_thread_count(monkeypatch):
    """Steps run torch on one thread around the kernels; the key must name the kernels' count."""
    from conftest import tiny_engine_for

    from leapdecode import engine as engine_module
    from leapdecode.model.linear import LinearSpec, available_backends

    if "native" not in available_backends():
        pytest.skip("the native backend needs AVX2+FMA+F16C and a C++ compiler")
    engine = tiny_engine_for(dtype=torch.float32, spec=LinearSpec("native", "none", "float32"))
    keys = []
    flat = CostModel((1, 2), (CostCurve((1,), (1.0,)), CostCurve((1,), (1.0,))))
    monkeypatch.setattr(
        engine_module, "cached_cost", lambda model, key, folder, notify: keys.append(key) or flat
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert engine.cost_curve() is flat
    finally:
        torch.set_num_threads(before)
    assert keys[0]["threads"] == 2 and keys[0]["backend"] == "native/none/float32"


def test_measuring_runs_no_prefill_and_keeps_to_its_budget(tiny_engine):
    from leapdecode import costmodel

    model, calls = tiny_engine.model, []

    class Counting:
        cfg, device = model.cfg, model.device

        def new_cache(self, n):
            return model.new_cache(n)

        def forward(self, x, pos, cache):
            calls.append(x.shape[0])
            assert cache.length == 100  # the random context is in place, never prefilled
            return model.forward(x, pos, cache)

    curve = costmodel.measure(Counting(), ks=(1, 2, 4), context=100, repeats=3, budget_s=0.0)
    assert calls == [1, 2, 4] and len(curve.seconds) == 3  # one timing per k once the budget is spent
    calls.clear()
    costmodel.measure(Counting(), ks=(1, 2), context=100, repeats=3, budget_s=10.0)
    assert calls == [1, 1, 1, 2, 2, 2]
