"""The eagle drafter: lossless on tiny random models with tiny random heads, its tree, its head file,
and the engine handing it the committed rows' hidden states."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_config, tiny_engine_for
from test_lossless import ENGINES, V, plain

from leapdecode.draft import Draft, StepResult
from leapdecode.drafters.base import Drafter, RequestContext
from leapdecode.drafters.eagle import EagleConfig, EagleLayer, committed_rows
from leapdecode.drafters.medusa import MedusaConfig, MedusaHeads
from leapdecode.drafters.trained import HeadFile, TargetParts, check_embeddings, model_info, save_head
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams


def random_head(engine: Engine, kind: str, path, seed: int = 0, vocab: int | None = None) -> str:
    """A head file of random weights for `engine`'s model (a random part of the vocabulary)."""
    cfg = engine.model.cfg
    torch.manual_seed(seed)
    if kind == "eagle":
        hc = EagleConfig(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size, 1e-6)
        module: torch.nn.Module = EagleLayer(hc)
    else:
        hc = MedusaConfig(cfg.dim, 3)  # type: ignore[assignment]
        module = MedusaHeads(hc)  # type: ignore[arg-type]
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
    gen = torch.Generator().manual_seed(seed)
    n = vocab or cfg.vocab_size // 2
    ids = torch.randperm(cfg.vocab_size, generator=gen)[:n].sort().values
    check = check_embeddings(TargetParts(engine.model))
    norm = 1.0 + 0.1 * torch.randn(cfg.dim, generator=gen)
    head = HeadFile(kind, hc.__dict__, model_info(engine.model), dict(module.state_dict()), ids, norm, check)
    save_head(path, head)
    return str(path)


def with_head(engine: Engine, kind: str, tmp_path, seed: int = 0, **options) -> Drafter:
    path = random_head(engine, kind, tmp_path / f"{kind}-{seed}.safetensors", seed)
    engine.drafter_options[kind] = {"path": path, "size": "fixed", **options}
    try:
        return engine.new_drafter(kind)
    finally:
        del engine.drafter_options[kind]


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_trained_drafters_are_lossless(kind, tmp_path):
    """The same property as every drafter: greedy output equals plain decoding, token for token."""
    rng = random.Random(kind)
    for e, engine in enumerate(ENGINES):
        drafter = with_head(engine, kind, tmp_path, seed=e)
        for _ in range(4):
            prompt = [rng.randrange(V) for _ in range(rng.randint(1, 30))]
            ref = plain(engine, prompt, 40)
            out = engine.generate(prompt, GenerationConfig(max_new_tokens=40, max_draft=12), drafter=drafter)
            assert out.token_ids == ref, f"{kind} changed the greedy output"
            assert out.stats.drafted > 0  # it really drafted


def test_eagle_tree_keeps_depth_width_and_budget(tmp_path):
    engine = ENGINES[0]
    d = with_head(engine, "eagle", tmp_path, nodes=10, depth=3, topk=2)
    d.start(RequestContext((1, 2, 3)))
    hidden = torch.randn(3, engine.model.cfg.dim, dtype=engine.model.dtype)
    d.observe(StepResult(Draft(), [1, 2, 3], torch.zeros(1, V), [], 4, hidden=hidden))
    draft = d.propose([1, 2, 3, 4], 64)
    assert 0 < len(draft) <= 10
    assert max(draft.depths()) <= 3
    for node in [-1, *range(len(draft))]:
        assert len(draft.children(node)) <= 2
    assert draft.scores is not None and all(0 < s <= 1 for s in draft.scores)


def test_committed_rows_of_prefill_and_verification():
    assert committed_rows(StepResult(Draft(), [5, 6, 7], torch.zeros(1, 4), [], 9)) == [5, 6, 7]
    step = StepResult(Draft([1, 2, 3], [-1, 0, -1]), [8, 1, 2, 3], torch.zeros(4, 4), [0, 1], 9)
    assert committed_rows(step) == [8, 1, 2]


class Recorder(Drafter):
    name = "recorder"
    wants_hidden = True

    def __init__(self, draft: Draft):
        self.draft, self.steps = draft, []

    def propose(self, tokens, max_nodes):
        return self.draft

    def observe(self, step):
        self.steps.append(step)


def test_engine_hands_the_committed_rows_hidden_states():
    """StepResult.hidden holds the target's states of the root and the accepted path (the prefill: the
    prompt's), equal to those a plain forward over the committed text computes."""
    engine = tiny_engine_for(tiny_config())
    prompt = [3, 1, 4, 1, 5]
    ref = plain(engine, prompt, 12)
    rec = Recorder(Draft([ref[1], ref[2], 7], [-1, 0, -1]))
    out = engine.generate(prompt, GenerationConfig(max_new_tokens=12), drafter=rec)
    assert out.token_ids == ref
    text = prompt + ref
    model = engine.model
    cache = model.new_cache(len(text))
    from leapdecode.model.runner import Plan

    full = model.forward(torch.tensor(text), torch.arange(len(text)), cache, plan=Plan(hidden=True)).hidden
    rows = torch.cat([s.hidden for s in rec.steps])  # every committed row once, in order
    assert rows.shape[0] == len(text) - 1  # all but the newest token, which no forward has read yet
    torch.testing.assert_close(rows, full[: len(text) - 1], rtol=1e-9, atol=1e-9)
    assert rec.steps[0].tokens == prompt and rec.steps[1].accepted == [0, 1]


def test_plain_drafters_get_no_hidden_states():
    engine = tiny_engine_for(tiny_config())
    rec = Recorder(Draft())
    rec.wants_hidden = False
    engine.generate([1, 2], GenerationConfig(max_new_tokens=3), drafter=rec)
    assert all(s.hidden is None for s in rec.steps) and len(rec.steps) == 2  # no prefill step


def test_a_head_for_another_model_is_refused(tmp_path):
    path = random_head(ENGINES[0], "eagle", tmp_path / "h.safetensors")
    other = ENGINES[1]  # same sizes, other weights: the embeddings tell them apart
    other.drafter_options["eagle"] = {"path": path}
    try:
        with pytest.raises(LeapError, match="embeddings differ"):
            other.new_drafter("eagle")
    finally:
        del other.drafter_options["eagle"]
    with pytest.raises(LeapError, match="no head file"):
        ENGINES[0].drafter_options["eagle"] = {"path": str(tmp_path / "missing")}
        try:
            ENGINES[0].new_drafter("eagle")
        finally:
            del ENGINES[0].drafter_options["eagle"]


def test_sampled_eagle_drafts_carry_their_rows(tmp_path):
    engine = ENGINES[0]
    d = with_head(engine, "eagle", tmp_path, nodes=9, depth=3, topk=3)
    params = SamplingParams(temperature=0.8, seed=1)
    out = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=20, sampling=params), drafter=d)
    assert out.stats.drafted > 0


def test_auto_takes_the_eagle_head_as_a_source_and_stays_lossless(tmp_path):
    engine = ENGINES[0]
    path = random_head(engine, "eagle", tmp_path / "auto-eagle.safetensors")
    engine.drafter_options["eagle"] = {"path": path}
    try:
        auto = engine.new_drafter("auto")
    finally:
        del engine.drafter_options["eagle"]
    assert "eagle" in auto.sources and auto.wants_hidden
    rng = random.Random(5)
    for _ in range(3):
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 20))]
        ref = plain(engine, prompt, 30)
        assert engine.generate(prompt, GenerationConfig(max_new_tokens=30), drafter=auto).token_ids == ref


def test_auto_without_a_head_for_the_model_has_no_eagle_source(tmp_path):
    auto = ENGINES[0].new_drafter("auto")  # no eagle configured: not a default source
    assert "eagle" not in auto.sources and not auto.wants_hidden
    ENGINES[0].drafter_options["eagle"] = {}  # configured, but the shipped head is another model's
    try:
        auto = ENGINES[0].new_drafter("auto")
    finally:
        del ENGINES[0].drafter_options["eagle"]
    assert "eagle" not in auto.sources and not auto.wants_hidden


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_a_silent_head_keeps_calibrating_on_its_best_guess(kind, tmp_path):
    """With a cost that never pays, the head proposes nothing; its calibration (trust) must still follow
    how often its best child of the root is the target's next token, or a low trust would never rise."""
    engine = ENGINES[0]
    d = with_head(engine, kind, tmp_path, size="cost")
    d.sizer.host = type("Host", (), {"cost": lambda self: lambda k, ctx: 10.0 * k})()
    d.start(RequestContext((1, 2, 3)))
    dim = engine.model.cfg.dim
    d.observe(StepResult(Draft(), [1, 2, 3], torch.zeros(1, V), [], 4, hidden=torch.randn(3, dim)))
    tokens = [1, 2, 3, 4]
    for right in (True, False):
        d.sizer.accepted, d.sizer.predicted = (0.2, 1.0) if right else (1.0, 0.5)
        before = d.sizer.trust
        for _ in range(10):
            d.sizer.size = "fixed"  # every node, to read the head's best guess
            every = d.propose(tokens, 64)
            d.sizer.size = "cost"
            draft = d.propose(tokens, 64)
            assert len(draft) == 0 and every.scores is not None  # never pays
            guess = every.token_ids[max(range(len(every)), key=lambda i: every.scores[i])]
            bonus = guess if right else next(t for t in range(V) if t != guess)
            hidden = torch.randn(1, dim)
            d.observe(StepResult(draft, [tokens[-1]], torch.zeros(1, V), [], bonus, hidden=hidden))
            tokens.append(bonus)
        assert (d.sizer.trust > before) if right else (d.sizer.trust < before)
