"""KV cache edits: truncate and keep, checked against decoding from scratch (float64, exact)."""

from __future__ import annotations

import torch
from conftest import tiny_engine_for
from hypothesis import given, settings
from hypothesis import strategies as st

from leapdecode.cache import KVCache
from leapdecode.draft import Draft, tree_inputs
from leapdecode.sampling import SamplingParams

ENGINE = tiny_engine_for(seed=3)
V = ENGINE.model.cfg.vocab_size


def scratch_logits(tokens: list[int]) -> torch.Tensor:
    model = ENGINE.model
    return model.forward(
        torch.tensor(tokens), torch.arange(len(tokens)), model.new_cache(len(tokens))
    ).logits[-1]


@st.composite
def tree_with_path(draw):
    """A random draft tree and one root-to-node path in it (possibly empty)."""
    n = draw(st.integers(1, 12))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = [draw(st.integers(0, V - 1)) for _ in range(n)]
    end = draw(st.integers(-1, n - 1))
    draft = Draft(tokens, parents)
    return draft, draft.path_to(end) if end >= 0 else []


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.lists(st.integers(0, V - 1), min_size=1, max_size=20),
    case=tree_with_path(),
    root=st.integers(0, V - 1),
    nxt=st.integers(0, V - 1),
)
def test_keep_path_then_decode_equals_scratch(prompt, case, root, nxt):
    draft, path = case
    model = ENGINE.model
    cache = model.new_cache(64)
    model.forward(torch.tensor(prompt), torch.arange(len(prompt)), cache)
    start = cache.length
    tokens, positions, mask = tree_inputs(draft, root, start)
    model.forward(tokens, positions, cache, mask)
    cache.keep([start] + [start + 1 + i for i in path], start)
    kept = prompt + [root] + [draft.token_ids[i] for i in path]
    assert cache.length == len(kept)
    step = model.forward(torch.tensor([nxt]), torch.tensor([cache.length]), cache).logits[-1]
    ref = scratch_logits(kept + [nxt])
    assert torch.allclose(step, ref, rtol=0, atol=1e-12)
    assert step.argmax() == ref.argmax()


@settings(max_examples=25, deadline=None)
@given(
    prompt=st.lists(st.integers(0, V - 1), min_size=2, max_size=20), extra=st.integers(1, 8), data=st.data()
)
def test_truncate_then_decode_equals_scratch(prompt, extra, data):
    model = ENGINE.model
    cut = data.draw(st.integers(1, len(prompt)))
    cache = model.new_cache(64)
    model.forward(torch.tensor(prompt + [1] * extra), torch.arange(len(prompt) + extra), cache)
    cache.truncate(cut)
    nxt = prompt[cut - 1]
    step = model.forward(torch.tensor([nxt]), torch.tensor([cut]), cache).logits[-1]
    assert torch.allclose(step, scratch_logits(prompt[:cut] + [nxt]), rtol=0, atol=1e-12)


def test_keep_validates_indices():
    cache = KVCache(1, 1, 2, 8, dtype=torch.float64)
    cache.advance(6)
    for bad in ([3, 2], [1], [4, 4], [6]):
        try:
            cache.keep(bad, start=2)
        except ValueError:
            continue
        raise AssertionError(f"keep({bad}) accepted")
    cache.keep([2, 4, 5], start=2)
    assert cache.length == 5


def test_cache_after_verification_equals_plain_decoding():
    """After a verification step, the cache holds what plain decoding of the same tokens would."""
    engine, model = ENGINE, ENGINE.model
    prompt = [5, 9, 2, 7, 1]
    cache = model.new_cache(64)
    logits = model.forward(torch.tensor(prompt), torch.arange(len(prompt)), cache).logits[-1]
    root = int(logits.argmax())
    # a chain that follows the model's own greedy choices for 3 tokens, then one wrong branch
    greedy = engine.generate(prompt, _cfg(5)).token_ids
    draft = Draft(greedy[1:4] + [(greedy[2] + 1) % V], [-1, 0, 1, 0])
    step = engine.verify(draft, root, cache, SamplingParams(), None)
    assert step.accepted == [0, 1, 2] and step.bonus == greedy[4]
    plain = model.new_cache(64)
    seq = prompt + greedy[:4]
    model.forward(torch.tensor(seq), torch.arange(len(seq)), plain)
    assert cache.length == plain.length == len(seq)
    n = cache.length
    assert torch.allclose(cache.k[:, :, :, :n], plain.k[:, :, :, :n], rtol=0, atol=1e-12)
    assert torch.allclose(cache.v[:, :, :, :n], plain.v[:, :, :, :n], rtol=0, atol=1e-12)


def _cfg(n):
    from leapdecode.engine import GenerationConfig

    return GenerationConfig(max_new_tokens=n, drafter="none")
