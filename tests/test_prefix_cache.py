"""The prefix cache: outputs with a hit equal outputs without one, token for token (float64 tiny models,
the native kernels bit for bit, the bundled model), a conversation's next turn prefills only its new
tokens, LRU eviction under the cap, the server's stats and metrics, and the option's validation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import pytest
import torch
from conftest import tiny_config, tiny_engine_for
from hypothesis import given, settings
from hypothesis import strategies as st

from leapdecode.drafters import available
from leapdecode.engine import GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.model.linear import LinearSpec, available_backends
from leapdecode.prefix_cache import MAX_MB, MIB, PrefixCache
from leapdecode.sequences import common_prefix
from leapdecode.server import BackgroundServer, ServerConfig, build_app
from leapdecode.server.metrics import parse_samples

DRAFTERS = [d for d in ("none", "pld", "suffix", "recycling") if d in available()]
V = tiny_config().vocab_size


def engines(seed: int = 2, block: int = 4, capacity: int = 64 * MIB, **kwargs):
    """The same random model twice: with a prefix cache, and without one (the cold reference)."""
    hot, cold = tiny_engine_for(seed=seed, **kwargs), tiny_engine_for(seed=seed, **kwargs)
    hot.prefix_cache = PrefixCache(capacity, block_tokens=block)
    return hot, cold


def config(drafter: str = "none", n: int = 12) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, drafter=drafter)


# ---------------------------------------------------------------- exactness


@settings(max_examples=25, deadline=None)
@given(
    stem=st.lists(st.integers(0, V - 1), min_size=2, max_size=30),
    tails=st.lists(st.lists(st.integers(0, V - 1), min_size=0, max_size=9), min_size=2, max_size=4),
    cuts=st.lists(st.integers(0, 30), min_size=4, max_size=4),
    drafter=st.sampled_from(DRAFTERS),
    block=st.sampled_from([1, 3, 4, 16]),
)
def test_outputs_with_a_hit_equal_outputs_without(stem, tails, cuts, drafter, block):
    hot, cold = engines(block=block)
    for tail, cut in zip(tails, cuts):
        prompt = stem[: max(2, cut)] + tail
        a, b = hot.generate(prompt, config(drafter)), cold.generate(prompt, config(drafter))
        assert a.token_ids == b.token_ids
        assert b.stats.prefix_cached_tokens == 0
    assert hot.prefix_cache is not None and hot.prefix_cache.stats.hits >= 1  # the stem came back


def test_a_repeated_prompt_prefills_only_its_last_token():
    hot, cold = engines()
    prompt = list(range(3, 40))
    first, again = hot.generate(prompt, config()), hot.generate(prompt, config())
    assert (first.stats.prefix_cached_tokens, again.stats.prefix_cached_tokens) == (0, len(prompt) - 1)
    assert again.token_ids == first.token_ids == cold.generate(prompt, config()).token_ids


def test_a_conversation_turn_prefills_only_its_new_tokens():
    """Turn 2 = turn 1's prompt + its reply + new tokens: everything but the new tokens and the reply's
    last token (the one token whose K/V were never computed) comes from the cache."""
    hot, cold = engines(block=16)
    turn1 = [5, 9, 2, 7] * 6
    reply = hot.generate(turn1, config(n=10)).token_ids
    turn2 = turn1 + reply + [11, 12, 13, 14, 15]
    second = hot.generate(turn2, config())
    assert second.stats.prefix_cached_tokens == len(turn1) + len(reply) - 1
    assert second.token_ids == cold.generate(turn2, config()).token_ids


def test_a_cancelled_generation_stores_what_it_committed():
    hot, _ = engines()
    prompt = list(range(2, 30))
    gen = hot.stream(prompt, config(n=20))
    pieces = [next(gen) for _ in range(5)]  # the prefill's token, then four steps
    gen.close()
    assert len(pieces) == 5 and gen.result is not None
    follow = prompt + gen.result.token_ids + [7]
    assert hot.generate(follow, config()).stats.prefix_cached_tokens == len(prompt) + 4


def test_a_drafter_reading_the_prompts_hidden_states_gets_every_row():
    hot, _ = engines()
    drafter = hot.new_drafter("none")
    drafter.wants_hidden = True  # a trained head observes the prefill's states of the whole prompt
    seen = []
    drafter.observe = lambda step: seen.append(len(step.tokens))
    prompt = list(range(2, 20))
    hot.generate(prompt, config(n=2))
    result = hot.generate(prompt, config(n=2), drafter=drafter)
    assert result.stats.prefix_cached_tokens == 0 and seen[0] == len(prompt)


NATIVE = pytest.mark.skipif(
    "native" not in available_backends(), reason="the native backend needs AVX2+FMA+F16C and a C++ compiler"
)


@NATIVE
@pytest.mark.parametrize("drafter", ["none", "pld"])
def test_native_kv_from_any_forward_equal_a_cold_prefill_bit_for_bit(drafter):
    """Row invariance: K/V stored from a prefill and from verified drafts are those a cold prefill of
    the same tokens writes, so a hit changes no logit."""
    cfg = tiny_config(dim=64, inter=128, vocab=96, layers=3)
    spec = LinearSpec("native", "int8", "int8")
    hot, cold = engines(cfg=cfg, dtype=torch.float32, spec=spec)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 5] * 4
    result = hot.generate(prompt, config(drafter, n=24))
    seq = prompt + result.token_ids
    warm = hot.model.new_cache(len(seq))
    assert hot.prefix_cache is not None
    n = hot.prefix_cache.restore(seq + [0], warm)
    assert n == len(seq) - 1  # all but the last generated token, whose K/V were never computed
    ref = cold.model.new_cache(len(seq))
    cold.model.forward(torch.tensor(seq[:n]), torch.arange(n), ref)
    assert torch.equal(warm.k[:, :, :, :n], ref.k[:, :, :, :n])
    assert torch.equal(warm.v[:, :, :, :n], ref.v[:, :, :, :n])
    assert hot.generate(seq[:30] + [9, 9], config(drafter)).token_ids == (
        cold.generate(seq[:30] + [9, 9], config(drafter)).token_ids
    )


# ---------------------------------------------------------------- the tree and its cap


def filled(tokens: list[int], engine) -> object:
    cache = engine.model.new_cache(len(tokens))
    engine.model.forward(torch.tensor(tokens), torch.arange(len(tokens)), cache)
    return cache


def test_least_recently_used_blocks_go_first_and_none_is_stranded():
    engine = tiny_engine_for(seed=1)
    block_bytes = PrefixCache(1 << 30, block_tokens=4)
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    block_bytes.store(a, filled(a, engine))
    one = block_bytes.nbytes // 2  # two blocks of four tokens
    pc = PrefixCache(5 * one, block_tokens=4)
    for seq in (a, b):
        pc.store(seq, filled(seq, engine))
    assert pc.restore(a + [0], engine.model.new_cache(9)) == 8  # a is now more recent than b
    pc.store(c, filled(c, engine))  # 6 blocks > 5: b's leaf goes (b's first block is newer than it)
    assert pc.nbytes <= pc.capacity_bytes and pc.blocks == 5 and pc.stats.evicted_blocks == 1
    assert [pc.restore(s + [0], engine.model.new_cache(9)) for s in (a, b, c)] == [8, 4, 8]
    pc.capacity_bytes = 0
    pc.store(a, filled(a, engine))
    assert (pc.blocks, pc.nbytes) == (0, 0)


def test_a_partial_block_is_replaced_by_the_full_block_extending_it():
    engine = tiny_engine_for(seed=1)
    pc = PrefixCache(1 << 30, block_tokens=4)
    short, long = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9]
    pc.store(short, filled(short, engine))
    assert pc.blocks == 2
    pc.store(long, filled(long, engine))
    assert pc.blocks == 3  # [1-4], [5-8], [9]: the partial [5, 6] is gone
    pc.store(short, filled(short, engine))  # covered by [5-8]: nothing added
    assert pc.blocks == 3
    assert pc.restore([1, 2, 3, 4, 5, 6, 0, 0], engine.model.new_cache(8)) == 6  # part of a block


def test_the_cap_and_block_size_are_validated():
    for bad in (-1, MAX_MB + 1, True, 1.5):
        with pytest.raises(LeapError, match="prefix cache size"):
            PrefixCache.from_mb(bad)
    assert PrefixCache.from_mb(0) is None
    with pytest.raises(LeapError, match="block size"):
        PrefixCache(MIB, block_tokens=0)
    with pytest.raises(LeapError, match="prefix_cache_mb must be an integer in"):
        ServerConfig(prefix_cache_mb=-1)
    with pytest.raises(LeapError, match="prefix_cache_mb"):
        ServerConfig(prefix_cache_mb=True)


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_the_cli_option_is_checked_before_the_model_loads(command):
    run = subprocess.run(
        [sys.executable, "-m", "leapdecode.cli", command, "--prefix-cache-mb", "-5"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--prefix-cache-mb: expected an integer in [0, 1048576], got -5" in run.stderr


# ---------------------------------------------------------------- the server


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return parse_samples(resp.read().decode())


def test_the_server_reports_reuse_in_leap_stats_usage_and_metrics():
    engine, cold = tiny_engine_for(seed=4), tiny_engine_for(seed=4)
    prompt = list(range(1, 41))
    body = {"model": "tiny-4", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    with BackgroundServer(build_app(engine, ServerConfig(drafter="none", prefix_cache_mb=8))) as srv:
        first, second = post(srv.url, body), post(srv.url, body | {"prompt": prompt + [3, 4]})
        m = metrics(srv.url)
    assert first["leap_stats"]["prefix_cached_tokens"] == 0
    assert second["leap_stats"]["prefix_cached_tokens"] == len(prompt)  # the stored prompt (+ reply)
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": len(prompt)}
    ref = cold.generate(prompt + [3, 4], config(n=8))
    assert second["choices"][0]["text"] == ref.text
    assert m["leap_prefix_cache_lookups_total"] == 2 and m["leap_prefix_cache_hits_total"] == 1
    assert m["leap_prefix_cache_hit_tokens_total"] == len(prompt)
    assert m["leap_prefix_cache_lookup_tokens_total"] == 2 * len(prompt) + 2
    assert m["leap_prefix_cache_hit_rate"] == pytest.approx(len(prompt) / (2 * len(prompt) + 2))
    assert m["leap_prefix_cache_capacity_bytes"] == 8 * MIB and m["leap_prefix_cache_bytes"] > 0


def test_a_server_without_a_prefix_cache_prefills_everything():
    engine = tiny_engine_for(seed=4)
    body = {"model": "tiny-4", "prompt": list(range(1, 30)), "max_tokens": 4, "temperature": 0}
    with BackgroundServer(build_app(engine, ServerConfig(drafter="none", prefix_cache_mb=0))) as srv:
        answers = [post(srv.url, body) for _ in range(2)]
        m = metrics(srv.url)
    assert engine.prefix_cache is None
    assert [a["leap_stats"]["prefix_cached_tokens"] for a in answers] == [0, 0]
    assert m["leap_prefix_cache_lookups_total"] == 0 and m["leap_prefix_cache_capacity_bytes"] == 0


# ---------------------------------------------------------------- the bundled model


def test_bundled_model_chat_turns_reuse_the_conversation_exactly(default_engine):
    """`leap chat`'s loop on the bundled model (default backend): turn 2 prefills only its new tokens
    and both turns equal generation without a prefix cache."""
    engine, gen = default_engine, GenerationConfig(max_new_tokens=24, drafter="none")
    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    engine.prefix_cache = None
    cold = engine.generate(messages, gen)
    turn2 = messages + [
        {"role": "assistant", "content": cold.text},
        {"role": "user", "content": "And two more?"},
    ]
    cold2 = engine.generate(turn2, gen)
    engine.prefix_cache = PrefixCache(64 * MIB)
    try:
        hot = engine.generate(messages, gen)
        hot2 = engine.generate(turn2, gen)
    finally:
        engine.prefix_cache = None
    assert (hot.token_ids, hot2.token_ids) == (cold.token_ids, cold2.token_ids)
    # the reply ended with EOS, so every token before it has K/V: turn 1 and its reply, re-tokenized
    # alike, are reused; prefilled are the end-of-turn token (whose K/V were never computed) and the
    # new user turn
    assert hot.stats.finish_reason == "stop"
    turn1 = hot.prompt_ids + hot.token_ids
    ids2 = engine.encode_prompt(turn2)
    assert common_prefix(turn1, ids2) == len(turn1)
    assert hot2.stats.prefix_cached_tokens == len(turn1)


def test_leap_chat_reuses_the_conversation():
    run = subprocess.run(
        [sys.executable, "-m", "leapdecode.cli", "chat", "--stats", "--drafter", "none"]
        + ["--max-new-tokens", "8"],
        check=False,
        input="Hello there.\nTell me more.\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    cached = [int(n) for n in re.findall(r"prompt \d+ tok \((\d+) cached\)", run.stderr)]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] > 20  # turn 2 reuses turn 1
