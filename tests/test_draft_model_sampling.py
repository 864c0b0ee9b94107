"""Sampling with a draft model is exact: the distribution of generated sequences equals the target's.

The exact distribution of every n-token continuation is computed by enumerating the target's own
probabilities on a tiny model (8 tokens); a chi-square test compares it with seeded speculative runs.
`assert_matches_exact` is shared with the self-drafter tests.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import random_state, tiny_config, tiny_engine_for

import leapdecode.drafters.draft_model  # noqa: F401  (registers draft-model)
from leapdecode.drafters import make_drafter
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.model.loader import build_model
from leapdecode.model.torch_runner import TorchRunner
from leapdecode.model.weights import StateSource
from leapdecode.sampling import SamplingParams, target_probs

P_MIN = 0.01


def exact_sequence_probs(engine: Engine, prompt: list[int], params: SamplingParams, n_new: int) -> dict:
    """P(continuation) for every continuation of n_new tokens, from full forwards of each prefix."""
    model = engine.model
    vocab = model.cfg.vocab_size
    probs = {(): 1.0}
    for _ in range(n_new):
        nxt = {}
        for seq, p in probs.items():
            if p == 0.0:
                continue
            ids = prompt + list(seq)
            logits = model.forward(
                torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids))
            ).logits
            row = target_probs(logits[-1], params)  # [V]
            for t in range(vocab):
                nxt[seq + (t,)] = p * row[t].item()
        probs = nxt
    return probs


def chi_square_p(counts: Counter, exact: dict, n: int) -> float:
    """p-value of counts against the exact probabilities; cells expected below 5 are pooled."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0.0, 0.0
    for seq, p in exact.items():
        expected = p * n
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(seq, 0), pooled_exp + expected
            continue
        stat += (counts.get(seq, 0) - expected) ** 2 / expected
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    return torch.special.gammaincc(
        torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
    ).item()


def assert_matches_exact(
    engine: Engine, drafter, prompt: list[int], sampling: SamplingParams, n_new: int, n_samples: int
) -> None:
    counts: Counter = Counter()
    drafted = accepted = 0
    for i in range(n_samples):
        cfg = GenerationConfig(max_new_tokens=n_new, drafter=drafter.name, sampling=replace(sampling, seed=i))
        result = engine.generate(prompt, cfg, drafter=drafter)
        counts[tuple(result.token_ids)] += 1
        drafted, accepted = drafted + result.stats.drafted, accepted + result.stats.accepted
    assert 0 < accepted < drafted  # both acceptance and rejection were exercised
    exact = exact_sequence_probs(engine, prompt, sampling, n_new)
    assert all(exact[seq] > 0 for seq in counts), "a sequence the target cannot produce was generated"
    p = chi_square_p(counts, exact, n_samples)
    assert p > P_MIN, f"chi-square p = {p:.2g}: the output distribution differs from the target's"


def tiny_pair(target_seed: int = 5, draft_seed: int = 6):
    cfg = tiny_config(vocab=8, dim=16, layers=2, heads=2, kv_heads=1, inter=32, max_seq=64)
    engine = tiny_engine_for(cfg, seed=target_seed)
    source = StateSource(random_state(cfg, draft_seed, scale=0.8), cfg)
    return engine, TorchRunner(build_model(source, torch.float64))


@pytest.mark.parametrize(
    "options, sampling",
    [
        ({"threshold": 0.0, "num_draft": 3}, SamplingParams(temperature=1.0)),  # chain
        ({"threshold": 0.0, "num_draft": 2, "branch": 3}, SamplingParams(temperature=1.0)),  # tree
        (
            {"threshold": 0.0, "num_draft": 2, "branch": 2},
            SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
        ),
        # the draft's output layer over ids 0-3 and the request's own: draws from a distribution with zeros
        ({"threshold": 0.0, "num_draft": 3, "vocab": 4}, SamplingParams(temperature=1.0)),
        ({"threshold": 0.0, "num_draft": 2, "branch": 3, "vocab": 4}, SamplingParams(temperature=1.0)),
    ],
)
def test_draft_model_sampling_is_exact(options, sampling):
    engine, draft = tiny_pair()
    drafter = make_drafter("draft-model", model=draft, **options)
    drafter.bind(engine.host)
    assert_matches_exact(engine, drafter, [1, 2, 3], sampling, n_new=3, n_samples=3000)


def test_the_check_detects_a_wrong_distribution():
    # The same check on plain decoding at another temperature must fail: the test has power.
    engine, _ = tiny_pair()
    counts: Counter = Counter()
    n = 3000
    for i in range(n):
        cfg = GenerationConfig(
            max_new_tokens=3, drafter="none", sampling=SamplingParams(temperature=1.3, seed=i)
        )
        counts[tuple(engine.generate([1, 2, 3], cfg).token_ids)] += 1
    exact = exact_sequence_probs(engine, [1, 2, 3], SamplingParams(temperature=1.0), 3)
    assert chi_square_p(counts, exact, n) < P_MIN


def test_exact_probabilities_sum_to_one():
    engine, _ = tiny_pair()
    exact = exact_sequence_probs(engine, [1, 2, 3], SamplingParams(temperature=1.0), 2)
    assert len(exact) == 64 and sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
    assert set(exact) == set(itertools.product(range(8), repeat=2))
