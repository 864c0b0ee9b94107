"""Batched decoding: the torch runner's ragged batched forward equals one forward per sequence, lanes
and rounds (parked forwards, cancellation, chunked prefill), and `leap serve --batch` answering each
request exactly as it would alone (tiny float64 models; the native backend bit for bit)."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
import torch
from conftest import tiny_config, tiny_engine_for

from leapdecode.costmodel import CostCurve, CostModel
from leapdecode.draft import Draft, tree_inputs
from leapdecode.drafters import available
from leapdecode.engine import GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.model.linear import LinearSpec, available_backends
from leapdecode.model.runner import LAST, BatchItem, Plan, forward_each
from leapdecode.server import BackgroundServer, ServerConfig, build_app
from leapdecode.server.batching import (
    BatchingRunner,
    Cancelled,
    Lane,
    RoundLoad,
    SharedCost,
    batching_engine,
    run_round,
)

DRAFTERS = [d for d in ("none", "pld", "suffix", "recycling") if d in available()]


def runner_pair(seed: int = 0):
    return tiny_engine_for(seed=seed).model, tiny_engine_for(seed=seed).model


def primed(runner, tokens: list[int], size: int = 128):
    cache = runner.new_cache(size)
    if tokens:
        runner.forward(torch.tensor(tokens), torch.arange(len(tokens)), cache)
    return cache


def items_for(runner, rng: torch.Generator) -> list[BatchItem]:
    """Ragged items: a prompt, one-token steps after different contexts, a draft tree, hidden states."""
    items = []
    for n, s in [(0, 9), (5, 1), (12, 1), (3, 4)]:
        cache = primed(runner, torch.randint(0, 64, (n,), generator=rng).tolist())
        tokens = torch.randint(0, 64, (s,), generator=rng)
        plan = LAST if s == 9 else Plan(hidden=s == 4)
        items.append(BatchItem(tokens, torch.arange(n, n + s), cache, None, plan))
    cache = primed(runner, [1, 2, 3])
    tokens, positions, mask = tree_inputs(Draft([4, 5, 6], [-1, -1, 0]), 7, 3, "cpu")
    items.append(BatchItem(tokens, positions, cache, mask))
    skip = Plan(layers=((True, False),) + ((False, False),) * (runner.cfg.n_layers - 1))  # runs alone
    items.append(BatchItem(torch.tensor([3, 4]), torch.arange(2), runner.new_cache(8), None, skip))
    return items


def test_torch_batched_forward_equals_one_forward_per_sequence():
    batched, alone = runner_pair()
    a = items_for(batched, torch.Generator().manual_seed(1))
    b = items_for(alone, torch.Generator().manual_seed(1))
    for x, y, ia, ib in zip(batched.forward_batch(a), forward_each(alone, b), a, b):
        torch.testing.assert_close(x.logits, y.logits, rtol=0, atol=1e-12)
        assert (x.hidden is None) == (y.hidden is None)
        if x.hidden is not None:
            torch.testing.assert_close(x.hidden, y.hidden, rtol=0, atol=1e-12)
        assert ia.cache.length == ib.cache.length
        torch.testing.assert_close(ia.cache.k, ib.cache.k, rtol=0, atol=1e-12)


def test_a_full_context_fails_the_batch_before_any_row_is_written():
    runner, _ = runner_pair()
    full = runner.new_cache(4)
    ok = runner.new_cache(8)
    items = [
        BatchItem(torch.arange(3), torch.arange(3), ok),
        BatchItem(torch.arange(5), torch.arange(5), full),
    ]
    with pytest.raises(LeapError, match="context full"):
        runner.forward_batch(items)
    assert ok.length == 0


# ---------------------------------------------------------------- lanes and rounds


class Recorder:
    """A runner that records the rows of every batched forward (and runs them batched)."""

    def __init__(self, runner):
        self.runner, self.batches = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward_batch(self, items):
        self.batches.append([len(i.tokens) for i in items])
        return self.runner.forward_batch(items)


def test_lanes_park_their_forwards_and_share_a_round():
    runner = Recorder(tiny_engine_for(seed=1).model)
    proxy = BatchingRunner(runner, chunk=4)
    seen: dict[str, object] = {}

    def body(name: str, n: int):
        cache = runner.new_cache(32)
        try:
            for t in range(n):
                proxy.forward(torch.tensor([t]), torch.tensor([t]), cache)
            seen[name] = cache.length
        except Cancelled:
            seen[name] = "cancelled"

    lanes = [Lane(lambda n=n: body(f"l{n}", n), f"test-{n}") for n in (1, 3, 5)]
    rounds = 0
    while not all(lane.done for lane in lanes):
        run_round(
            [lane for lane in lanes if not lane.done],
            runner,
            lambda lane, r=rounds: lane is lanes[2] and r >= 2,
        )
        rounds += 1
    assert runner.batches == [[1, 1, 1], [1, 1], [1]]  # the cancelled lane's rows left in round 3
    assert seen == {"l1": 1, "l3": 3, "l5": "cancelled"}


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_result():
    runner, reference = runner_pair(seed=3)
    recorder = Recorder(runner)
    proxy = BatchingRunner(recorder, chunk=4)
    prompt = torch.randint(0, 64, (11,), generator=torch.Generator().manual_seed(0))
    out: dict[str, object] = {}

    def body():
        cache = runner.new_cache(16)
        out["out"] = proxy.forward(prompt, torch.arange(11), cache, plan=Plan(hidden=True))
        out["cache"] = cache

    lane = Lane(body, "test-chunks")
    while not lane.done:
        run_round([lane], recorder, lambda _: False)
    assert recorder.batches == [[4], [4], [3]]
    ref_cache = reference.new_cache(16)
    ref = reference.forward(prompt, torch.arange(11), ref_cache, plan=Plan(hidden=True))
    torch.testing.assert_close(out["out"].logits, ref.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["out"].hidden, ref.hidden, rtol=0, atol=1e-12)
    assert out["cache"].length == 11


NATIVE = pytest.mark.skipif(
    "native" not in available_backends(), reason="the native backend needs AVX2+FMA+F16C and a C++ compiler"
)


@NATIVE
@pytest.mark.parametrize(
    "quant,acts", [("int8", "int8"), ("int4", "int8"), ("int4", "float32"), ("none", "float32")]
)
def test_native_batched_forward_is_bit_for_bit_one_forward_per_sequence(quant, acts):
    """One kernel call over ragged sequences (a prompt, one-token steps after different contexts, a draft
    tree with its mask, hidden states; a plan that skips blocks runs alone) gives every sequence exactly
    the logits, hidden states and cache of its own forward."""
    cfg = tiny_config(dim=64, inter=128, vocab=96, layers=3)
    spec = LinearSpec("native", quant, acts)
    batched, alone = (tiny_engine_for(cfg, seed=3, dtype=torch.float32, spec=spec).model for _ in range(2))
    a = items_for(batched, torch.Generator().manual_seed(2))
    b = items_for(alone, torch.Generator().manual_seed(2))
    for x, y, ia, ib in zip(batched.forward_batch(a), forward_each(alone, b), a, b):
        assert torch.equal(x.logits, y.logits)
        assert (x.hidden is None) == (y.hidden is None)
        assert x.hidden is None or torch.equal(x.hidden, y.hidden)
        assert ia.cache.length == ib.cache.length
        assert torch.equal(ia.cache.k, ib.cache.k) and torch.equal(ia.cache.v, ib.cache.v)


@NATIVE
def test_one_row_sequences_with_long_contexts_batch_bit_for_bit():
    """Alone, a one-row step splits a long context's keys into blocks across threads; in a batch each
    sequence's row is one task. Both give the same bits."""
    cfg = tiny_config(dim=64, inter=128, vocab=96, layers=2)
    spec = LinearSpec("native", "int8", "int8")
    batched, alone = (tiny_engine_for(cfg, seed=4, dtype=torch.float32, spec=spec).model for _ in range(2))

    def items(runner):
        rng, out = torch.Generator().manual_seed(5), []
        for n in (300, 5, 450, 129):
            cache = primed(runner, torch.randint(0, 96, (n,), generator=rng).tolist(), size=500)
            out.append(
                BatchItem(torch.randint(0, 96, (1,), generator=rng), torch.tensor([n]), cache, None, LAST)
            )
        return out

    for x, y in zip(batched.forward_batch(items(batched)), forward_each(alone, items(alone))):
        assert torch.equal(x.logits, y.logits)


@NATIVE
def test_a_native_batch_refuses_two_rows_sets_on_one_cache():
    runner = tiny_engine_for(
        tiny_config(dim=64, inter=128, vocab=96),
        dtype=torch.float32,
        spec=LinearSpec("native", "int8", "int8"),
    ).model
    cache = runner.new_cache(8)
    item = BatchItem(torch.tensor([1]), torch.tensor([0]), cache)
    with pytest.raises(LeapError, match="distinct caches"):
        runner.forward_batch([item, item])
    assert cache.length == 0


@NATIVE
def test_native_batched_generation_is_bit_for_bit_generation_alone():
    """Batched kernel calls and chunked prefill change no bit: greedy generations run in lanes, three at
    a time, equal generations alone in float32."""
    cfg = tiny_config(dim=64, inter=128, vocab=96, layers=3)
    spec = LinearSpec("native", "int8", "int8")
    engine = tiny_engine_for(cfg, seed=5, dtype=torch.float32, spec=spec)
    lanes_engine = batching_engine(engine, chunk=5)
    prompts = [[1, 2, 3, 4, 1, 2, 3] * 3, [7, 8, 9], [5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 11, 12]]
    config = GenerationConfig(max_new_tokens=20, drafter="pld")
    results: dict[int, list[int]] = {}
    lanes = [
        Lane(lambda i=i, p=p: results.__setitem__(i, lanes_engine.generate(p, config).token_ids), f"n{i}")
        for i, p in enumerate(prompts)
    ]
    while not all(lane.done for lane in lanes):
        run_round([lane for lane in lanes if not lane.done], engine.model, lambda _: False)
    assert [results[i] for i in range(3)] == [engine.generate(p, config).token_ids for p in prompts]


# ---------------------------------------------------------------- the server


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_batched_server_answers_each_request_as_it_would_alone():
    engine, cold = tiny_engine_for(seed=6), tiny_engine_for(seed=6)
    recorder = Recorder(engine.model)
    engine.model = recorder  # the scheduler's rounds go through it
    prompts = [[(7 * i + 3 * k) % 64 for k in range(5 + 3 * i)] for i in range(8)]
    jobs = [(p, DRAFTERS[i % len(DRAFTERS)]) for i, p in enumerate(prompts)]
    config = ServerConfig(drafter="none", max_concurrency=8, batching=True, prefill_chunk=6)
    answers: dict[int, str] = {}
    with BackgroundServer(build_app(engine, config)) as srv:

        def client(i: int):
            prompt, drafter = jobs[i]
            body = {"model": "tiny-6", "prompt": prompt, "max_tokens": 24, "temperature": 0}
            answers[i] = post(srv.url, body | {"leap": {"drafter": drafter}})["choices"][0]["text"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i, (prompt, drafter) in enumerate(jobs):
        ref = cold.generate(prompt, GenerationConfig(max_new_tokens=24, drafter=drafter))
        assert answers[i] == ref.text, (i, drafter)
    assert max(map(len, recorder.batches)) > 1  # rounds did share forwards


class Faulty:
    """A runner whose forwards fail on token 99 (a batched forward containing it fails as a whole)."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward(self, tokens, *args, **kwargs):
        if 99 in tokens.tolist():
            raise RuntimeError("simulated fault")
        return self.runner.forward(tokens, *args, **kwargs)

    def forward_batch(self, items):
        if any(99 in i.tokens.tolist() for i in items):
            raise RuntimeError("simulated fault")
        return self.runner.forward_batch(items)


def test_a_forward_that_fails_costs_only_its_own_lane():
    runner = Faulty(tiny_engine_for(seed=1).model)
    proxy = BatchingRunner(runner)
    seen: dict[str, object] = {}

    def body(name: str, token: int):
        try:
            seen[name] = proxy.forward(
                torch.tensor([token]), torch.tensor([0]), runner.new_cache(4)
            ).logits.shape
        except RuntimeError as exc:
            seen[name] = str(exc)

    lanes = [Lane(lambda: body("good", 5), "good"), Lane(lambda: body("bad", 99), "bad")]
    while not all(lane.done for lane in lanes):
        run_round([lane for lane in lanes if not lane.done], runner, lambda _: False)
    assert seen == {"good": torch.Size([1, 64]), "bad": "simulated fault"}


# ---------------------------------------------------------------- speculation under load


def test_a_lane_weighs_its_rows_by_its_share_of_the_round():
    """Alone, a lane sees the measured curve. In a round of 8 one-row lanes it pays an eighth of the
    8-row forward plus the marginal cost of its extra rows on top of the others' rows."""
    curve = CostModel((256,), (CostCurve((1, 8, 16), (1.0, 2.0, 4.0)),))
    load = RoundLoad()
    cost = SharedCost(lambda: curve, load)
    assert cost(4) == curve(4)  # not in a lane, nobody else: the curve
    seen: dict[str, float] = {}

    def body():
        seen["k1"], seen["k5"] = cost(1), cost(5)

    lanes = [Lane(body if i == 0 else (lambda: None), f"l{i}") for i in range(8)]
    for lane in lanes:
        lane.rows = 1
    load.note(lanes)
    lanes[0].resume()
    assert seen["k1"] == pytest.approx(2.0 / 8)
    assert seen["k5"] == pytest.approx(2.0 / 8 + curve(12) - curve(8))
    for lane in lanes[1:]:
        lane.resume()
