"""Speculative sampling preserves the target distribution: chi-square tests on a tiny model.

The exact distribution of 3-token continuations is computed by enumerating the target's probabilities;
the empirical distribution of generated sequences with each drafter (chain and tree, with and without
draft probabilities) must agree with it (p > 0.01). Seeds are fixed, so the test is deterministic.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch
from conftest import tiny_config, tiny_engine_for

from leapdecode.draft import Draft
from leapdecode.drafters import Drafter
from leapdecode.engine import GenerationConfig
from leapdecode.sampling import SamplingParams, target_probs

V, NEW, SAMPLES = 5, 3, 3000
ENGINE = tiny_engine_for(tiny_config(vocab=V, dim=16, heads=2, kv_heads=1, inter=32), seed=11)
PROMPT = [1, 3, 0, 2]
Q = torch.softmax(
    torch.randn(V, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.5, -1
)


class RandomTokens(Drafter):
    """Deterministic proposals (no probabilities): random tokens in a chain or a small tree."""

    def __init__(self, tree: bool, seed: int = 0):
        self.tree, self.rng = tree, random.Random(seed)

    def propose(self, tokens, max_nodes):
        parents = [-1, -1, 0, 0, 2] if self.tree else [-1, 0, 1]
        return Draft([self.rng.randrange(V) for _ in parents], parents)


class FromQ(Drafter):
    """Draws from a fixed draft distribution Q[parent token] and attaches the rows (with probabilities)."""

    def __init__(self, tree: bool, seed: int = 0):
        self.tree, self.gen = tree, torch.Generator().manual_seed(seed)

    def propose(self, tokens, max_nodes):
        parents = [-1, -1, 0, 0, 1] if self.tree else [-1, 0, 1]
        ids, rows = [], []
        for p in parents:
            q = Q[tokens[-1] if p < 0 else ids[p]]
            ids.append(int(torch.multinomial(q, 1, generator=self.gen)))
            rows.append(q)
        return Draft(ids, parents, torch.stack(rows))


def exact_distribution(params: SamplingParams) -> dict[tuple, float]:
    model = ENGINE.model

    def probs(prefix):
        x = torch.tensor(PROMPT + list(prefix))  # [T]
        return target_probs(model.forward(x, torch.arange(len(x)), model.new_cache(16)).logits[-1], params)

    dist = {}
    for seq in itertools.product(range(V), repeat=NEW):
        p = 1.0
        for i in range(NEW):
            p *= probs(seq[:i])[seq[i]].item()
        dist[seq] = p
    return dist


def chi_square_p(counts: Counter, dist: dict, n: int) -> float:
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for seq, p in dist.items():
        exp = p * n
        if exp < 5:  # pool sparse cells so the chi-square approximation holds
            pooled_obs, pooled_exp = pooled_obs + counts.get(seq, 0), pooled_exp + exp
            continue
        stat, df = stat + (counts.get(seq, 0) - exp) ** 2 / exp, df + 1
    if pooled_exp > 0:
        stat, df = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, df + 1
    return torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)).item()


def marginal(table: dict, pos: int) -> dict:
    out = Counter()
    for seq, v in table.items():
        out[(seq[pos],)] += v
    return out


def min_p(counts: Counter, dist: dict, n: int) -> float:
    """Smallest p-value of the joint test and the per-position marginal tests (the marginals have the
    power to see a bias at one position that the many-cell joint test dilutes)."""
    tests = [(counts, dist)] + [(marginal(counts, i), marginal(dist, i)) for i in range(NEW)]
    return min(chi_square_p(c, d, n) for c, d in tests)


ALPHA = 0.01 / (NEW + 1)  # four tests per sample set (Bonferroni)


def sample_counts(make_drafter, params: SamplingParams) -> Counter:
    counts = Counter()
    drafter = make_drafter()
    for i in range(SAMPLES):
        cfg = GenerationConfig(
            max_new_tokens=NEW,
            sampling=SamplingParams(params.temperature, params.top_k, params.top_p, seed=i),
        )
        counts[tuple(ENGINE.generate(PROMPT, cfg, drafter=drafter).token_ids)] += 1
    return counts


DRAFTERS = {
    "plain": lambda: Drafter(),
    "chain": lambda: RandomTokens(tree=False),
    "tree": lambda: RandomTokens(tree=True),
    "chain-probs": lambda: FromQ(tree=False),
    "tree-probs": lambda: FromQ(tree=True),
}


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_sampled_sequences_follow_the_target_distribution(name):
    params = SamplingParams(temperature=1.0)
    p = min_p(sample_counts(DRAFTERS[name], params), exact_distribution(params), SAMPLES)
    assert p > ALPHA, f"{name}: chi-square p = {p:.2e}"


@pytest.mark.parametrize("name", ["tree", "tree-probs"])
def test_top_k_top_p_sampling_with_trees(name):
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    p = min_p(sample_counts(DRAFTERS[name], params), exact_distribution(params), SAMPLES)
    assert p > ALPHA, f"{name}: chi-square p = {p:.2e}"


def test_detects_a_biased_sampler():
    """The test has power: a distribution off by a small tilt is rejected."""
    params = SamplingParams(temperature=1.0)
    dist = exact_distribution(params)
    top = max(dist, key=dist.get)[-1]  # tilt the last token's likeliest value by 30%
    tilted = {s: p * (1.3 if s[-1] == top else 1.0) for s, p in dist.items()}
    total = sum(tilted.values())
    rng = random.Random(0)
    seqs, weights = zip(*((s, p / total) for s, p in tilted.items()))
    counts = Counter(rng.choices(seqs, weights, k=SAMPLES))
    assert min_p(counts, dist, SAMPLES) < ALPHA


@pytest.mark.parametrize("name", ["plain", "tree", "tree-probs"])
def test_seeded_sampling_is_reproducible(name):
    cfg = GenerationConfig(max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=42))
    runs = [ENGINE.generate(PROMPT, cfg, drafter=DRAFTERS[name]()).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
