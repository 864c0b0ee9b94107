"""Draft-model speculation: lossless greedy decoding with random draft models (chains and trees), its own
KV cache kept in step with the sequence, seeded sampling, and the checks on the draft model."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import char_tokenizer, tiny_config, tiny_engine_for, tiny_runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leapdecode.drafters.draft_model  # noqa: F401  (registers draft-model)
from leapdecode.drafters import RequestContext, make_drafter
from leapdecode.drafters.draft_model import DraftModel, DraftModelOptions, Picker, common_prefix, draft_nodes
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.model.tokenizer import Tokenizer
from leapdecode.sampling import SamplingParams

VOCAB = 64


@functools.cache
def target(seed: int) -> Engine:
    return tiny_engine_for(tiny_config(vocab=VOCAB, layers=3), seed)


def draft_config(layers: int):
    return tiny_config(vocab=VOCAB, layers=layers, dim=16, heads=2, kv_heads=1, inter=32)


@functools.cache
def draft_model(seed: int, layers: int):
    return tiny_runner(draft_config(layers), seed, torch.float64)


def drafter_for(engine: Engine, model, **options) -> DraftModel:
    d = make_drafter("draft-model", model=model, **options)
    d.bind(engine.host)
    return d


def begin(drafter, engine: Engine, prompt=(), size: int = 64, sampling=None) -> None:
    """Start a request of `prompt` on a fresh target cache of `size`."""
    drafter.start(RequestContext(prompt, engine.model.new_cache(size), sampling or SamplingParams()))


def generate(engine: Engine, drafter, prompt, n: int, sampling=None, max_draft: int = 64):
    cfg = GenerationConfig(
        max_new_tokens=n,
        drafter=drafter.name if drafter else "none",
        sampling=sampling or SamplingParams(),
        max_draft=max_draft,
    )
    return engine.generate(prompt, cfg, drafter=drafter)


# ---------------------------------------------------------------- lossless greedy decoding


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target_seed=st.integers(0, 2),
    draft=st.sampled_from(["self", "other-1", "other-2", "other-3"]),
    num_draft=st.integers(1, 8),
    branch=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.2, 0.6]),
    stop=st.sampled_from(["token", "path"]),
    max_draft=st.integers(0, 12),
    prompts=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10), min_size=1, max_size=3),
    n_new=st.integers(1, 40),
    vocab=st.sampled_from([0, 4, 40]),
)
def test_greedy_output_equals_plain_decoding(
    target_seed, draft, num_draft, branch, threshold, stop, max_draft, prompts, n_new, vocab
):
    engine = target(target_seed)
    # "self": the target's own weights (every draft accepted); "other-s": a smaller random model
    model = engine.model if draft == "self" else draft_model(int(draft[-1]), int(draft[-1]))
    drafter = drafter_for(
        engine, model, num_draft=num_draft, branch=branch, threshold=threshold, vocab=vocab, stop=stop
    )
    for prompt in prompts:  # one drafter across requests: its cache must resync each time
        result = generate(engine, drafter, prompt, n_new, max_draft=max_draft)
        assert result.token_ids == generate(engine, None, prompt, n_new).token_ids
        assert result.stats.drafted <= max_draft * result.stats.steps


@pytest.mark.parametrize("branch", [1, 3])
def test_the_target_drafting_for_itself_is_always_accepted(branch):
    engine = target(0)
    drafter = drafter_for(engine, engine.model, num_draft=5, branch=branch, threshold=0.0)
    result = generate(engine, drafter, [1, 2, 3], 36)
    assert result.stats.accepted == 30 and result.stats.steps == 6  # 6 steps of 5 accepted + 1 bonus
    assert result.stats.drafted == 30 * branch


def test_tree_shape_and_greedy_siblings():
    engine = target(0)
    drafter = drafter_for(engine, draft_model(1, 1), num_draft=3, branch=3, threshold=0.0)
    begin(drafter, engine)
    draft = drafter.propose([4, 5, 6], 64)
    assert draft.parents == [-1, -1, -1, 0, 0, 0, 3, 3, 3] and draft.probs is None
    small = draft_model(1, 1)
    logits = small.forward(torch.tensor([4, 5, 6]), torch.arange(3), small.new_cache(8)).logits[-1]
    assert draft.token_ids[:3] == torch.topk(logits, 3).indices.tolist()  # top-3, most likely first
    assert len(drafter.propose([4, 5, 6], 4)) == 4  # max_nodes caps the tree
    assert drafter.propose([4, 5, 6], 4).parents == [-1, -1, -1, 0]


def test_sampled_drafts_carry_their_distributions():
    engine = target(0)
    drafter = drafter_for(engine, draft_model(1, 1), num_draft=4, branch=2, threshold=0.0)
    begin(drafter, engine, [4, 5, 6], sampling=SamplingParams(temperature=0.9, top_k=10, seed=3))
    draft = drafter.propose([4, 5, 6], 64)
    assert draft.probs.shape == (8, VOCAB) and draft.probs.dtype == torch.float64
    assert torch.equal(draft.probs[0], draft.probs[1])  # siblings are drawn from one row
    assert torch.allclose(draft.probs.sum(-1), torch.ones(8, dtype=torch.float64))
    assert ((draft.probs > 0).sum(-1) == 10).all()  # top_k applies to the draft distribution
    assert all(draft.probs[i, t] > 0 for i, t in enumerate(draft.token_ids))


# ---------------------------------------------------------------- the draft model's own cache


def test_cache_follows_the_sequence_through_rejections_and_new_requests():
    engine = target(1)
    model = draft_model(2, 2)
    drafter = drafter_for(engine, model, num_draft=4, threshold=0.0)
    sequences = [[1, 2, 3], [1, 2, 3, 9], [1, 2, 3, 9, 9, 4], [1, 2, 7], [5], [5, 6, 7, 8, 9, 10]]
    for tokens in sequences:
        begin(drafter, engine, tokens, 128)
        got = drafter.propose(tokens, 64)
        fresh = drafter_for(engine, model, num_draft=4, threshold=0.0)
        begin(fresh, engine, (), 128)
        assert got.token_ids == fresh.propose(tokens, 64).token_ids
        assert drafter._seen[: len(tokens)] == tokens and drafter._cache.length == len(drafter._seen)
        assert drafter._seen[len(tokens) :] == got.token_ids[:-1]  # the chain minus its last token is cached


def test_feed_only_what_the_draft_model_has_not_seen():
    engine = target(1)
    drafter = drafter_for(engine, draft_model(2, 2), num_draft=2, threshold=0.0)
    begin(drafter, engine, (), 128)
    calls = []
    original = drafter.model.forward

    def counting(tokens, *args, **kwargs):
        calls.append(tokens.shape[0])
        return original(tokens, *args, **kwargs)

    drafter.model.forward = counting
    try:
        d = drafter.propose(list(range(10)), 64)  # prefill 10, then one drafted token
        # the first draft token was accepted and 33 is the bonus: the accepted token was already fed
        # while drafting, so only the bonus is new
        d2 = drafter.propose(list(range(10)) + [d.token_ids[0], 33], 64)
        # a rejected draft: the cache drops the drafted token and feeds the bonus after the root
        d3 = drafter.propose(list(range(10)) + [d.token_ids[0], 33, 20], 64)
        d4 = drafter.propose(list(range(10)) + [d.token_ids[0], 33, 21], 64)
        assert calls == [10, 1, 1, 1, 1, 1, 1, 1] and len(d2) == len(d3) == len(d4) == 2
        assert drafter._seen == list(range(10)) + [d.token_ids[0], 33, 21, d4.token_ids[0]]
    finally:
        del drafter.model.forward


def scripted(confidences: list[float]):
    """Logits whose top token (id = depth) has the given softmax probability, one row per depth, and a
    step function that returns the next row."""
    rows = []
    for depth, c in enumerate(confidences):
        p = torch.full((16,), (1 - c) / 15)
        p[depth] = c
        rows.append(p.log())
    it = iter(rows[1:])
    return rows[0], lambda token: next(it)


@pytest.mark.parametrize(
    "confidences, stop, threshold, depth, expected",
    [
        ([0.9, 0.6, 0.5, 0.9, 0.9], "token", 0.3, 5, 5),  # every token above 0.3
        ([0.9, 0.6, 0.5, 0.9, 0.9], "path", 0.3, 5, 3),  # 0.9, 0.54, 0.27: stops after the third
        ([0.9, 0.2, 0.9, 0.9], "token", 0.3, 4, 2),  # the token below 0.3 is still proposed
        ([0.9, 0.2, 0.9, 0.9], "path", 0.3, 4, 2),
        ([0.99] * 12, "path", 0.3, 10, 10),  # confident chains run to the deepest allowed
        ([0.9, 0.6, 0.5, 0.9], "path", 0.0, 4, 4),  # threshold 0: only the depth stops
    ],
)
def test_stop_rules(confidences, stop, threshold, depth, expected):
    first, step = scripted(confidences)
    d = draft_nodes(
        first,
        step,
        Picker(None, 0),
        max_nodes=64,
        max_depth=depth,
        branch=1,
        threshold=threshold,
        source="t",
        stop=stop,
    )
    assert d.token_ids == list(range(expected)) and d.parents == list(range(-1, expected - 1))


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [1]) == 0


# ---------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible():
    engine = target(2)
    model = draft_model(1, 1)
    sampling = SamplingParams(temperature=1.0, seed=7)
    runs = [generate(engine, drafter_for(engine, model, branch=2), [3, 4], 40, sampling) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].stats.drafted == runs[1].stats.drafted > 0
    other = generate(
        engine, drafter_for(engine, model, branch=2), [3, 4], 40, SamplingParams(temperature=1.0, seed=8)
    )
    assert other.token_ids != runs[0].token_ids


# ---------------------------------------------------------------- checks on the draft model


def test_refuses_another_vocabulary_size():
    engine = target(0)
    cfg = tiny_config(vocab=VOCAB + 1, layers=1)
    with pytest.raises(LeapError, match="draft model's vocabulary has 65 tokens, the target's 64"):
        drafter_for(engine, tiny_runner(cfg, 0, torch.float64))


def test_refuses_other_token_strings():
    engine = target(0)
    tok = char_tokenizer(VOCAB)
    vocab = {tok.token(i): i for i in range(VOCAB)}
    vocab["x9"], vocab[tok.token(63)] = 63, None
    vocab = {t: i for t, i in vocab.items() if i is not None}
    import tokenizers
    from tokenizers import models

    other = Tokenizer(
        tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])),
        bos_id=None,
        eos_ids=set(),
        chat_template=None,
        add_bos=False,
    )
    with pytest.raises(LeapError, match="token 63 is 'x9' for the draft model but"):
        drafter_for(engine, draft_model(1, 1), tokenizer=other)
    drafter_for(engine, draft_model(1, 1), tokenizer=tok)  # the same strings pass


def test_refuses_another_dtype():
    engine = target(0)
    with pytest.raises(LeapError, match="must match"):
        drafter_for(engine, tiny_runner(draft_config(1), 1, torch.float32))


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "exactly one of the options path"),
        ({"path": "a.gguf", "model": object()}, "exactly one of the options path"),
        ({"path": 3}, "option path must be a string"),
        ({"path": "x", "num_draft": 0}, "draft-model option num_draft must be an integer >= 1"),
        ({"path": "x", "branch": 1.5}, "draft-model option branch"),
        ({"path": "x", "threshold": -1}, "draft-model option threshold"),
        ({"path": "x", "stop": "chain"}, "draft-model option stop must be one of token, path, got 'chain'"),
        ({"path": "x", "vocab": -1}, "draft-model option vocab must be an integer >= 0"),
        ({"path": "x", "depth": 3}, "unknown draft-model option.*depth"),
        ({"path": "x", "quant": "int3"}, "unknown quant 'int3'"),
        ({"path": "x", "backend": "gpu"}, "unknown backend 'gpu'"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(LeapError, match=message):
        make_drafter("draft-model", **options)


def test_missing_path_is_a_clear_error(tmp_path):
    engine = target(0)
    with pytest.raises(LeapError, match="model not found"):
        drafter_for_path = make_drafter("draft-model", path=str(tmp_path / "missing.gguf"))
        drafter_for_path.bind(engine.host)


def test_defaults():
    assert DraftModelOptions(path="m.gguf") == DraftModelOptions(
        path="m.gguf",
        model=None,
        tokenizer=None,
        num_draft=10,
        branch=1,
        threshold=0.3,
        stop="path",
        vocab=65536,
        backend="auto",
        quant="auto",
        activations="auto",
    )


def test_a_draft_model_from_a_path_runs_on_the_fast_kernels(default_engine):
    """The bundled file's own blocks on the native kernels, as a target would run it; output unchanged."""
    from leapdecode.model.linear import available_backends
    from leapdecode.model.source import default_model_path

    if "native" not in available_backends():
        pytest.skip("the native backend needs AVX2+FMA+F16C and a C++ compiler")
    drafter = make_drafter("draft-model", path=str(default_model_path()), num_draft=3)
    drafter.bind(default_engine.host)
    assert drafter.model.spec.describe() == "native/gguf/int8"
    ids = default_engine.encode_prompt("Name three colors.")
    result = generate(default_engine, drafter, ids, 24)
    assert result.token_ids == generate(default_engine, None, ids, 24).token_ids
    assert result.stats.accepted > 0


def test_draft_spec_takes_int4_where_the_files_blocks_cannot_run(default_engine):
    from leapdecode.drafters.draft_model import draft_spec
    from leapdecode.model.linear import available_backends
    from leapdecode.model.source import default_model_path

    if "native" not in available_backends():
        pytest.skip("the native backend needs AVX2+FMA+F16C and a C++ compiler")
    path, model = default_model_path(), default_engine.model
    runs = False  # a file with blocks the kernels cannot run as stored, as a Q4_K_M file
    assert draft_spec(DraftModelOptions(path=str(path)), model, runs).describe() == "native/int4/int8"
    asked = DraftModelOptions(path=str(path), quant="none", activations="float32")
    assert draft_spec(asked, model, runs).describe() == "native/none/float32"  # what is asked for stays
    torch_spec = DraftModelOptions(path=str(path), backend="torch")
    assert draft_spec(torch_spec, model, runs).describe() == "torch/none/float32"
    assert draft_spec(DraftModelOptions(path=str(path)), model, True).describe() == "native/gguf/int8"


@pytest.mark.slow
def test_bundled_model_drafting_for_itself_from_its_path(bundled_engine):
    from leapdecode.model.source import default_model_path

    drafter = make_drafter(
        "draft-model",
        path=str(default_model_path()),
        threshold=0.0,
        num_draft=4,
        backend="torch",
        quant="none",
    )  # exactly the target's arithmetic
    drafter.bind(bundled_engine.host)  # loads a second copy and compares the tokenizers
    result = generate(bundled_engine, drafter, bundled_engine.encode_prompt("Name three colors."), 20)
    assert result.stats.accepted == result.stats.drafted > 0
