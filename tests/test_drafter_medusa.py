"""The medusa drafter's tree, and exact sampling with both trained drafters' probabilities (chi-square
against the target's enumerated distribution, on a tiny random model with tiny random heads)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_engine_for
from test_draft_model_sampling import assert_matches_exact
from test_drafter_eagle import with_head

from leapdecode.draft import Draft, StepResult
from leapdecode.drafters.base import RequestContext
from leapdecode.drafters.medusa import best_paths
from leapdecode.sampling import SamplingParams


def test_best_paths_are_the_best_products_in_order():
    logp = [[-0.1, -1.0, -2.0], [-0.2, -0.5, -3.0], [-0.3, -2.0, -4.0]]
    paths, scores = best_paths(logp, 6)
    assert paths == [(0,), (0, 0), (0, 0, 0), (0, 1), (0, 1, 0), (1,)]
    every = {
        p: sum(logp[d][i] for d, i in enumerate(p))
        for n in (1, 2, 3)
        for p in __import__("itertools").product(range(3), repeat=n)
    }
    assert sorted(every.values(), reverse=True)[:6] == pytest.approx(sorted(scores, reverse=True))
    assert all(p[:-1] in paths[: paths.index(p)] for p in paths if len(p) > 1)  # parents first


def test_medusa_tree_follows_its_heads(tmp_path):
    engine = tiny_engine_for(tiny_config())
    d = with_head(engine, "medusa", tmp_path, nodes=7, topk=2)
    d.start(RequestContext((1, 2)))
    hidden = torch.randn(2, engine.model.cfg.dim, dtype=engine.model.dtype)
    d.observe(StepResult(Draft(), [1, 2], torch.zeros(1, 64), [], 5, hidden=hidden))
    draft = d.propose([1, 2, 5], 64)
    assert len(draft) == 7 and max(draft.depths()) <= 3  # three heads
    assert all(len(draft.children(n)) <= 2 for n in [-1, *range(len(draft))])
    assert draft.scores == sorted(draft.scores, reverse=True)
    assert len(d.propose([1, 2, 5], 3)) == 3


def tiny_target():
    cfg = tiny_config(vocab=8, dim=16, layers=2, heads=2, kv_heads=1, inter=32, max_seq=64)
    return tiny_engine_for(cfg, seed=5)


@pytest.mark.parametrize(
    "kind, options, sampling",
    [
        ("eagle", {"nodes": 6, "depth": 3, "topk": 2}, SamplingParams(temperature=1.0)),
        ("eagle", {"nodes": 3, "depth": 3, "topk": 1}, SamplingParams(temperature=0.7, top_k=5, top_p=0.9)),
        ("medusa", {"nodes": 6, "topk": 2}, SamplingParams(temperature=1.0)),
    ],
)
def test_sampling_with_trained_heads_is_exact(kind, options, sampling, tmp_path):
    """Draws from the heads' own distributions (over the trimmed vocabulary and the prompt's ids, zero
    elsewhere), with their rows: the output distribution is exactly the target's."""
    engine = tiny_target()
    drafter = with_head(engine, kind, tmp_path, seed=3, **options)
    assert_matches_exact(engine, drafter, [1, 2, 3], sampling, n_new=3, n_samples=2000)
