"""Self-speculative drafters (swift, ffn-skip, early-exit): lossless greedy decoding on random float64
models, exact sampling, the skip plans, cache hygiene and SWIFT's on-the-fly skip-set search."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import char_tokenizer, random_state, tiny_config, tiny_engine_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_draft_model_sampling import assert_matches_exact

import leapdecode.drafters.swift  # noqa: F401  (registers the self-drafters)
from leapdecode.drafters import RequestContext, make_drafter
from leapdecode.drafters.swift import (
    ATTN,
    MLP,
    EarlyExit,
    FFNSkip,
    LayerSearch,
    Swift,
    SwiftOptions,
    skip_plan,
)
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.model.loader import build_model
from leapdecode.model.torch_runner import TorchRunner
from leapdecode.model.weights import StateSource
from leapdecode.sampling import SamplingParams

N_LAYERS = 6
SELF_DRAFTERS = ("swift", "ffn-skip", "early-exit")


def engine_with_identities(seed: int, attn_zero=(), mlp_zero=(), layers=N_LAYERS, vocab=64) -> Engine:
    """A random float64 model whose listed sub-layers add exactly zero (o_proj / down_proj zeroed)."""
    cfg = tiny_config(vocab=vocab, layers=layers)
    state = random_state(cfg, seed)
    for b in attn_zero:
        state[f"model.layers.{b}.self_attn.o_proj.weight"].zero_()
    for b in mlp_zero:
        state[f"model.layers.{b}.mlp.down_proj.weight"].zero_()
    runner = TorchRunner(build_model(StateSource(state, cfg), torch.float64))
    return Engine(runner, char_tokenizer(vocab), name=f"tiny-{seed}")


@functools.cache
def cached_engine(seed: int, zeroed: tuple[tuple[int, ...], tuple[int, ...]]) -> Engine:
    return engine_with_identities(seed, *zeroed)


def plain(engine: Engine, prompt, n: int, sampling: SamplingParams | None = None) -> list[int]:
    cfg = GenerationConfig(max_new_tokens=n, drafter="none", sampling=sampling or SamplingParams())
    return engine.generate(prompt, cfg).token_ids


def run(engine: Engine, drafter, prompt, n: int, sampling: SamplingParams | None = None, max_draft: int = 64):
    cfg = GenerationConfig(
        max_new_tokens=n, drafter=drafter.name, sampling=sampling or SamplingParams(), max_draft=max_draft
    )
    return engine.generate(prompt, cfg, drafter=drafter)


def bound(engine: Engine, name: str, **options):
    d = make_drafter(name, **options)
    d.bind(engine.host)
    return d


# ---------------------------------------------------------------- lossless greedy decoding

drafter_options = st.one_of(
    st.tuples(
        st.just("swift"),
        st.fixed_dictionaries(
            {
                "context_window": st.integers(2, 8),
                "skip_ratio": st.sampled_from([0.25, 0.45, 0.75]),
                "threshold": st.sampled_from([0.0, 0.3, 0.8]),
                "num_draft": st.integers(1, 8),
                "bayes_interval": st.sampled_from([0, 2, 5]),
                "max_score": st.just(1.0),
                "seed": st.integers(0, 3),
            }
        ),
    ),
    st.tuples(
        st.just("ffn-skip"),
        st.fixed_dictionaries(
            {
                "ratio": st.sampled_from([0.0, 0.3, 0.5, 1.0]),
                "threshold": st.sampled_from([0.0, 0.5]),
                "num_draft": st.integers(1, 8),
            }
        ),
    ),
    st.tuples(
        st.just("early-exit"),
        st.fixed_dictionaries(
            {
                "exit_layer": st.integers(1, N_LAYERS),
                "threshold": st.sampled_from([0.0, 0.5]),
                "num_draft": st.integers(1, 8),
            }
        ),
    ),
)
zeroed_layers = st.tuples(
    st.sets(st.integers(1, N_LAYERS - 2), max_size=3).map(lambda s: tuple(sorted(s))),
    st.sets(st.integers(1, N_LAYERS - 2), max_size=3).map(lambda s: tuple(sorted(s))),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name_options=drafter_options,
    zeroed=zeroed_layers,
    seed=st.integers(0, 2),
    prompt=st.lists(st.integers(0, 63), min_size=1, max_size=12),
    max_draft=st.integers(0, 10),
    n_new=st.integers(1, 40),
)
def test_greedy_output_equals_plain_decoding(name_options, zeroed, seed, prompt, max_draft, n_new):
    name, options = name_options
    engine = cached_engine(seed, zeroed)
    drafter = bound(engine, name, **options)
    result = run(engine, drafter, prompt, n_new, max_draft=max_draft)
    assert result.token_ids == plain(engine, prompt, n_new)
    assert result.stats.drafted <= max_draft * result.stats.steps


@pytest.mark.parametrize("name", SELF_DRAFTERS)
def test_identity_sublayers_make_every_draft_token_accepted(name):
    # Skipping only sub-layers that add zero leaves the model unchanged: the draft is the target.
    engine = engine_with_identities(3, attn_zero=(1, 2, 3, 4, 5), mlp_zero=(1, 2, 3, 4, 5))
    options = {"threshold": 0.0, "num_draft": 5}
    if name == "swift":
        options.update(attn_skip=[2, 3], mlp_skip=[1, 4], search=False)
    elif name == "early-exit":
        options.update(exit_layer=1)
    drafter = bound(engine, name, **options)
    result = run(engine, drafter, [1, 2, 3], 30)
    assert result.token_ids == plain(engine, [1, 2, 3], 30)
    assert result.stats.accepted == result.stats.drafted > 0
    assert result.stats.mean_accepted == pytest.approx(30 / result.stats.steps, abs=1.0)


@pytest.mark.parametrize("name", SELF_DRAFTERS)
def test_propose_leaves_the_cache_as_found(name):
    engine = cached_engine(0, ((), ()))
    drafter = bound(engine, name)
    cache = engine.model.new_cache(64)
    engine.model.forward(torch.tensor([5, 6, 7, 8]), torch.arange(4), cache)
    k_before, v_before = cache.k[:, :, :, :4].clone(), cache.v[:, :, :, :4].clone()
    drafter.start(RequestContext([5, 6, 7, 8], cache))
    draft = drafter.propose([5, 6, 7, 8, 9], 8)
    assert 1 <= len(draft) <= 8 and draft.source == name
    assert cache.length == 4
    assert torch.equal(cache.k[:, :, :, :4], k_before) and torch.equal(cache.v[:, :, :, :4], v_before)


def test_max_nodes_and_room_cap_the_chain():
    engine = cached_engine(0, ((), ()))
    drafter = bound(engine, "early-exit", threshold=0.0, num_draft=8)
    cache = engine.model.new_cache(7)
    engine.model.forward(torch.tensor([1, 2, 3, 4]), torch.arange(4), cache)
    drafter.start(RequestContext([1, 2, 3, 4], cache))
    assert len(drafter.propose([1, 2, 3, 4, 5], 2)) == 2
    assert len(drafter.propose([1, 2, 3, 4, 5], 64)) == 3  # slots 4, 5, 6 are left
    assert len(drafter.propose([1, 2, 3, 4, 5], 0)) == 0


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "name, options, sampling",
    [
        ("early-exit", {"exit_layer": 1, "threshold": 0.0, "num_draft": 3}, SamplingParams(temperature=1.0)),
        (
            "swift",
            {"context_window": 2, "threshold": 0.0, "num_draft": 2, "max_score": 1.0},
            SamplingParams(temperature=0.8, top_k=5),
        ),
    ],
)
def test_sampled_sequences_follow_the_target_distribution(name, options, sampling):
    cfg = tiny_config(vocab=8, dim=16, layers=4, heads=2, kv_heads=1, inter=32, max_seq=64)
    engine = tiny_engine_for(cfg, seed=5)
    drafter = bound(engine, name, **options)
    assert_matches_exact(engine, drafter, [1, 2, 3], sampling, n_new=3, n_samples=3000)


def test_seeded_sampling_is_reproducible():
    engine = cached_engine(1, ((2,), (3,)))
    sampling = SamplingParams(temperature=1.0, seed=11)
    first = run(engine, bound(engine, "swift", context_window=4), [4, 5, 6], 40, sampling)
    second = run(engine, bound(engine, "swift", context_window=4), [4, 5, 6], 40, sampling)
    assert first.token_ids == second.token_ids and first.stats.drafted == second.stats.drafted > 0
    third = run(
        engine,
        bound(engine, "swift", context_window=4),
        [4, 5, 6],
        40,
        SamplingParams(temperature=1.0, seed=12),
    )
    assert third.token_ids != first.token_ids


# ---------------------------------------------------------------- skip plans and options


def test_early_exit_plan():
    engine = cached_engine(0, ((), ()))
    assert bound(engine, "early-exit").plan == [(False, False)] * 3 + [(True, True)] * 3
    assert bound(engine, "early-exit", exit_layer=5).plan == [(False, False)] * 5 + [(True, True)]
    with pytest.raises(LeapError, match="exit_layer must be in \\[1, 6\\]"):
        bound(engine, "early-exit", exit_layer=7)


def test_ffn_skip_plan():
    engine = cached_engine(0, ((), ()))
    assert [m for a, m in bound(engine, "ffn-skip").plan] == [False, False, True, True, True, False]
    assert all(not a for a, m in bound(engine, "ffn-skip").plan)
    assert [m for a, m in bound(engine, "ffn-skip", ratio=0.0).plan] == [False] * 6
    assert [m for a, m in bound(engine, "ffn-skip", layers=[0, 5]).plan] == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]
    with pytest.raises(
        LeapError, match="ffn-skip option layers must be a list of block indices in \\[0, 6\\)"
    ):
        bound(engine, "ffn-skip", layers=[6])


def test_swift_starts_from_odd_blocks_with_the_skip_ratio():
    engine = cached_engine(0, ((), ()))
    d = bound(engine, "swift")  # 8 candidate sub-layers (blocks 1..4), 45% -> 3 skipped
    assert d.skip_layers == {"attn": [1, 3], "mlp": [1]}
    assert d.plan == skip_plan(6, frozenset({(ATTN, 1), (MLP, 1), (ATTN, 3)}))
    assert d.plan == [
        (False, False),
        (True, True),
        (False, False),
        (True, False),
        (False, False),
        (False, False),
    ]
    d = bound(engine, "swift", attn_skip=[0, 2], mlp_skip=[])
    assert d.skip_layers == {"attn": [0, 2], "mlp": []}


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("swift", {"skip_ratio": 1.5}, "swift option skip_ratio must be a number in \\[0, 1\\]"),
        ("swift", {"attn_skip": [1]}, "attn_skip and mlp_skip must be given together"),
        ("swift", {"context_window": 0}, "swift option context_window must be an integer >= 1"),
        ("swift", {"max_score": 0.0}, "swift option max_score must be a number in \\(0, 1\\]"),
        ("swift", {"search": "yes"}, "search must be true or false"),
        ("swift", {"layers": 3}, "unknown swift option.*layers"),
        ("ffn-skip", {"ratio": -0.1}, "ffn-skip option ratio"),
        ("early-exit", {"exit_layer": 0}, "early-exit option exit_layer must be an integer >= 1"),
        ("early-exit", {"num_draft": 0}, "early-exit option num_draft"),
        ("early-exit", {"threshold": 2}, "early-exit option threshold"),
    ],
)
def test_invalid_options(name, options, message):
    with pytest.raises(LeapError, match=message):
        make_drafter(name, **options)


def test_swift_on_a_model_too_shallow_to_keep_first_and_last_blocks():
    engine = tiny_engine_for(tiny_config(layers=2))
    d = bound(engine, "swift")  # every sub-layer is a candidate then: 4, 45% -> 1 skipped
    assert d.search.universe == [(ATTN, 0), (ATTN, 1), (MLP, 0), (MLP, 1)] and d.skip_layers == {
        "attn": [1],
        "mlp": [],
    }
    result = run(engine, d, [1, 2, 3], 20)
    assert result.token_ids == plain(engine, [1, 2, 3], 20)


def test_registered_names():
    assert isinstance(make_drafter("swift"), Swift)
    assert isinstance(make_drafter("ffn-skip"), FFNSkip)
    assert isinstance(make_drafter("early-exit"), EarlyExit)


# ---------------------------------------------------------------- SWIFT's search


def prefilled(engine: Engine, drafter: Swift, tokens: list[int], prompt_len: int):
    """Run the target over `tokens[:-1]` and hand the drafter the state the engine would."""
    cache = engine.model.new_cache(128)
    logits = engine.model.forward(torch.tensor(tokens[:-1]), torch.arange(len(tokens) - 1), cache).logits
    drafter.start(RequestContext(tokens[:prompt_len], cache))
    drafter._ref = list(logits[prompt_len:])
    return cache


def test_window_score_of_the_full_model_is_perfect_and_leaves_the_cache():
    engine = cached_engine(2, ((), ()))
    drafter = bound(engine, "swift", context_window=6)
    tokens = plain(engine, [7, 8, 9], 10)
    tokens = [7, 8, 9] + tokens
    cache = prefilled(engine, drafter, tokens, 3)
    k_before = cache.k[:, :, :, : cache.length].clone()
    match, neg_kl = drafter.score(frozenset(), tokens)
    assert match == 1.0 and -1e-12 < neg_kl <= 1e-12
    assert cache.length == len(tokens) - 1 and torch.equal(cache.k[:, :, :, : cache.length], k_before)
    match, neg_kl = drafter.score(frozenset({(ATTN, 1), (MLP, 2), (MLP, 4)}), tokens)
    assert neg_kl < -1e-6


def test_search_finds_the_identity_sublayers():
    zero_attn, zero_mlp = (2,), (1, 4)  # three of the eight candidates add exactly zero
    engine = engine_with_identities(4, zero_attn, zero_mlp)
    drafter = bound(
        engine,
        "swift",
        context_window=24,
        max_score=1.0,
        max_opt_iter=100,
        max_tolerance=100,
        bayes_interval=5,
        threshold=0.0,
        num_draft=4,
    )
    assert drafter.search.k == 3 and drafter.skip_layers != {"attn": [2], "mlp": [1, 4]}
    for request in range(12):  # the search goes on across requests
        run(engine, drafter, [1 + request, 2, 3], 100)
        if drafter.search.done:
            break
    assert drafter.search.iterations == 100
    assert drafter.skip_layers == {"attn": [2], "mlp": [1, 4]}
    assert drafter.search.best_score[0] == 1.0
    after = run(engine, drafter, [40, 41, 42], 30)  # the next request drafts with the found set
    assert after.token_ids == plain(engine, [40, 41, 42], 30)
    assert after.stats.accepted == after.stats.drafted


def test_search_stops_at_max_score_and_after_max_opt_iter():
    engine = engine_with_identities(4, (2,), (1, 4))
    quick = bound(engine, "swift", context_window=8, max_opt_iter=5, max_score=1.0)
    run(engine, quick, [1, 2, 3], 40)
    assert quick.search.done and quick.search.iterations == 5
    easy = bound(engine, "swift", context_window=8, max_score=0.01)
    run(engine, easy, [1, 2, 3], 40)
    assert easy.search.done and easy.search.iterations == 0  # the incumbent already beats 0.01
    fixed = bound(engine, "swift", context_window=8, search=False)
    run(engine, fixed, [1, 2, 3], 40)
    assert fixed.search.iterations == 0 and fixed.skip_layers == {"attn": [1, 3], "mlp": [1]}


def test_layer_search_candidates_and_bookkeeping():
    opts = SwiftOptions(max_tolerance=3, max_opt_iter=100, bayes_interval=2, seed=1)
    search = LayerSearch(8, 0.45, None, opts)  # 12 candidates, 5 skipped
    assert len(search.universe) == 12 and search.k == 5 and len(search.best) == 5
    search.new_window()
    search.set_incumbent_score((0.5, -1.0))
    seen = set()
    for i in range(3):
        cand = search.candidate()  # the second comes from the Gaussian process
        assert len(cand) == 5 and cand <= set(search.universe) and cand not in seen
        seen.add(cand)
        assert not search.report(cand, (0.5, -1.0))  # a tie is not an improvement
    assert search.done and search.tolerance == 3
    search = LayerSearch(8, 0.45, None, opts)
    search.new_window()
    search.set_incumbent_score((0.5, -1.0))
    cand = search.candidate()
    assert search.report(cand, (0.5, -0.5)) and search.best == cand and search.tolerance == 0
