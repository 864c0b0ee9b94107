"""Greedy output with any drafter equals plain decoding exactly: float64 random small models on the torch
path, and float32 ones on the native kernels (whose rows are computed identically whatever the number of
rows in a forward, so exactness holds in float32 too)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_config, tiny_engine_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leapdecode.draft import Draft
from leapdecode.drafters import Drafter, available
from leapdecode.engine import GenerationConfig
from leapdecode.model.linear import LinearSpec, available_backends


def _native(quant: str, activations: str, seed: int):
    cfg = tiny_config(vocab=48, dim=64, inter=128, qkv_bias=True)
    return tiny_engine_for(cfg, seed=seed, dtype=torch.float32, spec=LinearSpec("native", quant, activations))


ENGINES = [tiny_engine_for(seed=s) for s in range(2)] + [
    tiny_engine_for(tiny_config(vocab=48, qkv_bias=True, tie=True, layers=3), seed=7)
]
if (
    "native" in available_backends()
):  # the fast backend: its tests elsewhere skip, with the reason, without it
    ENGINES += [_native("int4", "int8", 11), _native("none", "float32", 12)]
V = 48
# drafters that need construction options (a draft model path, a head trained for the model) have their
# own test files, which run this property on these engines
NEEDS_OPTIONS = {"draft-model", "eagle", "medusa"}


class NoisyOracle(Drafter):
    """Adversarial: random trees of random shapes whose tokens follow the true continuation with
    probability `p_true` along true paths and are random elsewhere (so acceptance varies at every depth)."""

    name = "noisy-oracle"

    def __init__(self, reference: list[int], seed: int, p_true: float):
        self.reference, self.rng, self.p_true = reference, random.Random(seed), p_true

    def propose(self, tokens, max_nodes):
        n = self.rng.randint(0, min(max_nodes, 16))
        ids, parents, on_truth = [], [], []
        for i in range(n):
            parent = self.rng.randint(-1, i - 1)
            depth = len(Draft(ids + [0], parents + [parent]).path_to(i))
            pos = len(tokens) + depth - 1
            truthful = (parent < 0 or on_truth[parent]) and pos < len(self.reference)
            if truthful and self.rng.random() < self.p_true:
                ids.append(self.reference[pos])
            else:
                ids.append(self.rng.randrange(V))
            parents.append(parent)
            on_truth.append(
                truthful and ids[-1] == self.reference[pos] if pos < len(self.reference) else False
            )
        return Draft(ids, parents, source=self.name)


def plain(engine, prompt, n):
    return engine.generate(prompt, GenerationConfig(max_new_tokens=n, drafter="none")).token_ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(0, V - 1), min_size=1, max_size=24),
    which=st.integers(0, len(ENGINES) - 1),
    seed=st.integers(0, 2**16),
    p_true=st.floats(0.0, 1.0),
    max_draft=st.integers(0, 12),
)
def test_random_tree_drafter_is_lossless(prompt, which, seed, p_true, max_draft):
    engine, n = ENGINES[which], 20
    ref = plain(engine, prompt, n)
    drafter = NoisyOracle(prompt + ref, seed, p_true)
    out = engine.generate(prompt, GenerationConfig(max_new_tokens=n, max_draft=max_draft), drafter=drafter)
    assert out.token_ids == ref
    assert out.stats.new_tokens == n


@pytest.mark.parametrize("name", sorted(set(available()) - NEEDS_OPTIONS))
def test_every_registered_drafter_is_lossless(name):
    rng = random.Random(name)
    for engine in ENGINES:
        drafter = engine.new_drafter(name)
        for _ in range(6):
            prompt = [rng.randrange(V) for _ in range(rng.randint(1, 30))]
            prompt = prompt + prompt[: rng.randint(0, len(prompt))]  # repeats give n-gram drafters matches
            ref = plain(engine, prompt, 40)
            out = engine.generate(prompt, GenerationConfig(max_new_tokens=40), drafter=drafter)
            assert out.token_ids == ref, f"{name} changed the greedy output"


def test_noisy_oracle_actually_gets_accepted():
    """Guards the property test: the adversarial drafter must exercise acceptance, not only rejection."""
    engine, prompt = ENGINES[0], [3, 1, 4, 1, 5]
    ref = plain(engine, prompt, 30)
    out = engine.generate(
        prompt, GenerationConfig(max_new_tokens=30), drafter=NoisyOracle(prompt + ref, 1, 0.9)
    )
    assert out.token_ids == ref
    assert out.stats.accepted > 0 and out.stats.steps < 30
