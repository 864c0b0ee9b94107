"""Slow: the self-drafters on the bundled SmolLM2 model, in float64, give plain decoding's tokens; SWIFT's
search runs on it and its window scores stay in range."""

from __future__ import annotations

import pytest

import leapdecode.drafters.swift  # noqa: F401
from leapdecode.engine import Engine, GenerationConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine64() -> Engine:
    return Engine.load(dtype="float64", drafter_options={"swift": {"context_window": 16, "max_opt_iter": 20}})


@pytest.mark.parametrize("name", ["swift", "ffn-skip", "early-exit"])
def test_bundled_model_self_drafting_is_lossless(engine64, spec_bench_questions, name):
    for q in spec_bench_questions[300:302]:
        ids = engine64.encode_prompt(q["turns"][0])
        plain = engine64.generate(ids, GenerationConfig(max_new_tokens=48, drafter="none"))
        spec = engine64.generate(ids, GenerationConfig(max_new_tokens=48, drafter=name))
        assert spec.token_ids == plain.token_ids
        assert spec.stats.drafted > 0
    if name == "swift":
        search = engine64.drafter("swift").search
        assert search.iterations > 0 and 0.0 <= search.best_score[0] <= 1.0
