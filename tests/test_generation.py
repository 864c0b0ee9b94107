"""Generation behaviour: defaults, greedy vs temperature 0, budgets, EOS, stop strings, streaming."""

from __future__ import annotations

import pytest
from conftest import char_tokenizer, tiny_engine_for

from leapdecode.engine import GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams
from leapdecode.streaming import TextStream


def test_defaults():
    cfg = GenerationConfig()
    assert (cfg.max_new_tokens, cfg.drafter, cfg.max_draft, cfg.stop) == (256, "auto", 64, ())
    assert cfg.sampling.greedy and cfg.sampling == SamplingParams(0.0, 0, 1.0, None)


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_draft": -1}, {"stop": ("",)}])
def test_config_validation(bad):
    with pytest.raises(LeapError):
        GenerationConfig(**bad)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_sampling_validation(bad):
    with pytest.raises(LeapError):
        SamplingParams(**bad)


def test_temperature_zero_is_greedy_whatever_the_seed(tiny_engine):
    prompt = [3, 4, 5]
    greedy = tiny_engine.generate(prompt, GenerationConfig(max_new_tokens=20, drafter="none"))
    for seed in (None, 1, 2):
        cfg = GenerationConfig(max_new_tokens=20, drafter="none", sampling=SamplingParams(0.0, seed=seed))
        assert tiny_engine.generate(prompt, cfg).token_ids == greedy.token_ids


def test_seeded_sampling_reproducible_and_seed_sensitive(tiny_engine):
    def run(seed):
        cfg = GenerationConfig(max_new_tokens=30, drafter="pld", sampling=SamplingParams(1.0, seed=seed))
        return tiny_engine.generate([1, 2, 3], cfg).token_ids

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(5)}) > 1


def test_eos_stops_generation():
    engine = tiny_engine_for(seed=0)
    ref = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=30, drafter="none")).token_ids
    engine.tokenizer.eos_ids = {ref[5]}
    out = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=30, drafter="pld"))
    assert out.token_ids == ref[: ref.index(ref[5])]
    assert out.stats.finish_reason == "stop"


def test_token_budget_and_stats(tiny_engine):
    out = tiny_engine.generate([1, 2], GenerationConfig(max_new_tokens=17, drafter="suffix"))
    s = out.stats
    assert len(out.token_ids) == s.new_tokens == 17 and s.finish_reason == "length"
    assert s.prompt_tokens == 2 and s.drafter == "suffix" and s.steps >= 1
    assert s.mean_accepted == pytest.approx((s.accepted + s.steps) / s.steps)
    assert sum(1 for _ in s.accepted_by_depth) <= 64


def test_stream_pieces_join_to_text(tiny_engine):
    gen = tiny_engine.stream([4, 4, 4], GenerationConfig(max_new_tokens=25, drafter="pld"))
    pieces = list(gen)
    assert "".join(pieces) == gen.result.text == tiny_engine.tokenizer.decode(gen.result.token_ids)


def test_stop_string_cuts_text(tiny_engine):
    full = tiny_engine.generate([9, 8, 7], GenerationConfig(max_new_tokens=30, drafter="none"))
    stop = full.text[10:13]
    gen = tiny_engine.stream([9, 8, 7], GenerationConfig(max_new_tokens=30, drafter="none", stop=(stop,)))
    pieces = list(gen)
    cut = full.text.index(stop)
    assert gen.result.text == "".join(pieces) == full.text[:cut]
    assert gen.result.stats.finish_reason == "stop"


STREAM_CASES = [
    # (pushes of single-character tokens, stop strings, expected pieces, stopped)
    (["A", "B", "C"], (), ["A", "B", "C"], False),
    (["A", "X", "Y", "B"], ("XY",), ["A", "", ""], True),  # "X" is held back until "Y" decides
    (["A", "X", "B"], ("XY",), ["A", "", "XB"], False),
    (["X", "Z"], ("XY", "Z"), ["", "X"], True),  # "X" was only held back; "Z" stops after it
]


@pytest.mark.parametrize("pushes,stop,pieces,stopped", STREAM_CASES)
def test_text_stream_holds_back_possible_stops(pushes, stop, pieces, stopped):
    tok = char_tokenizer(64)
    stream = TextStream(tok, stop)
    got = []
    for ch in pushes:
        piece, done = stream.push(tok.encode(ch))
        got.append(piece)
        if done:
            break
    assert got == pieces and stream.stopped == stopped


def test_prompt_errors(tiny_engine):
    with pytest.raises(LeapError, match="prompt"):
        tiny_engine.encode_prompt([])
    with pytest.raises(LeapError, match="context"):
        tiny_engine.encode_prompt([1] * 600)
    with pytest.raises(LeapError, match="token ids"):
        tiny_engine.encode_prompt([1, 10_000])
