"""The server under load (loopback only, bounded in count and time): 32 concurrent streams with mixed
drafters, a full queue answered with 429, clients that disconnect freeing their slots, and drafter
instances reused across requests. All on a tiny random-weight model in float64, so every drafter's greedy
output must equal plain decoding exactly."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.request

import openai
import pytest

from leapdecode.drafters import available
from leapdecode.engine import GenerationConfig
from leapdecode.server import BackgroundServer, ServerConfig, build_app
from leapdecode.server.metrics import parse_samples

DRAFTERS = [d for d in ("none", "pld", "suffix", "recycling", "copy", "auto") if d in available()]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def prompt_text(i: int) -> str:
    """Distinct prompts with repeats in them, so that lookup drafters find matches."""
    head = "".join(LETTERS[(i * 7 + k * 3) % 26] for k in range(5))
    return head + "XY" + head + LETTERS[i % 26] + head[:3]


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return parse_samples(resp.read().decode())


def wait_for(url: str, condition, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if condition(m):
            return m
        assert time.monotonic() < deadline, f"condition not reached; metrics: {m}"
        time.sleep(0.02)


def slow_down(engine, delay: float = 0.0, gate: threading.Event | None = None) -> None:
    """Make every forward of the engine's model wait (a gate) or take longer (a delay); a batched
    forward (`--batch`) too."""
    forward, batched = engine.model.forward, engine.model.forward_batch

    def slowed(*args, **kwargs):
        if gate is not None:
            assert gate.wait(30), "the test never opened the gate"
        time.sleep(delay)
        return forward(*args, **kwargs)

    def slowed_batch(items):
        if gate is not None:
            assert gate.wait(30), "the test never opened the gate"
        time.sleep(delay)
        return batched(items)

    engine.model.forward, engine.model.forward_batch = slowed, slowed_batch


async def stream_text(client, kind: str, prompt: str, drafter: str, max_tokens: int) -> tuple[str, dict]:
    """One streamed request; returns the text and the final chunk's leap_stats."""
    common = {
        "model": "tiny-0",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "extra_body": {"leap": {"drafter": drafter}},
    }
    if kind == "chat":
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **common
        )
    else:
        stream = await client.completions.create(prompt=prompt, **common)
    pieces, last = [], None
    async for chunk in stream:
        last = chunk
        if chunk.choices:
            pieces.append((chunk.choices[0].delta.content if kind == "chat" else chunk.choices[0].text) or "")
    return "".join(pieces), last.model_extra["leap_stats"]


@pytest.mark.parametrize("batching", [False, True])
def test_32_concurrent_streams_with_mixed_drafters(tiny_engine, batching):
    jobs = [
        ("chat" if i % 2 else "completion", prompt_text(i), DRAFTERS[i % len(DRAFTERS)]) for i in range(32)
    ]
    expected = [
        tiny_engine.generate(
            p, GenerationConfig(max_new_tokens=16, drafter="none"), raw=kind == "completion"
        ).text
        for kind, p, _ in jobs
    ]
    app = build_app(
        tiny_engine, ServerConfig(drafter="none", max_concurrency=4, max_queue=64, batching=batching)
    )

    async def run_all(url):
        async with openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60
        ) as client:
            tasks = [stream_text(client, kind, p, d, 16) for kind, p, d in jobs]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

    with BackgroundServer(app) as srv:
        results = asyncio.run(run_all(srv.url))
        m = metrics(srv.url)
    assert [text for text, _ in results] == expected  # every request, in order: none lost, none mixed up
    assert [stats["drafter"] for _, stats in results] == [d for _, _, d in jobs]
    assert m['leap_generations_total{outcome="length"}'] == 32
    assert m['leap_requests_total{route="/v1/chat/completions",status="200"}'] == 16
    assert m['leap_requests_total{route="/v1/completions",status="200"}'] == 16
    assert m["leap_completion_tokens_total"] == 32 * 16
    assert m["leap_active_generations"] == 0 and m["leap_queue_length"] == 0
    if "pld" in DRAFTERS:  # the repeated prompts give prompt lookup something to accept
        assert m['leap_spec_accepted_tokens_total{drafter="pld"}'] > 0
    pool = app.state.leap.scheduler.pool
    assert all(1 <= n <= 4 for n in pool.created.values()), pool.created  # one instance per slot at most


@pytest.mark.parametrize("batching", [False, True])
def test_full_queue_answers_429_at_once_and_server_stays_healthy(tiny_engine, batching):
    expected = tiny_engine.generate(
        prompt_text(0), GenerationConfig(max_new_tokens=8, drafter="none"), raw=True
    ).text
    gate = threading.Event()
    slow_down(tiny_engine, gate=gate)  # nothing generates until the gate opens: the queue state is exact
    app = build_app(
        tiny_engine, ServerConfig(drafter="none", max_concurrency=2, max_queue=2, batching=batching)
    )

    async def scenario(url):
        async with openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60
        ) as client:

            def start():
                return asyncio.create_task(stream_text(client, "completion", prompt_text(0), "none", 8))

            accepted = [start(), start()]
            await asyncio.to_thread(wait_for, url, lambda m: m["leap_active_generations"] == 2)
            accepted += [start(), start()]
            await asyncio.to_thread(wait_for, url, lambda m: m["leap_queue_length"] == 2)
            for _ in range(3):
                with pytest.raises(openai.RateLimitError) as info:
                    await client.completions.create(model="tiny-0", prompt="AB", max_tokens=4, stream=True)
                assert info.value.status_code == 429 and info.value.code == "queue_full"
                assert info.value.body["type"] == "rate_limit_error"
            gate.set()
            return await asyncio.wait_for(asyncio.gather(*accepted), timeout=60)

    with BackgroundServer(app) as srv:
        try:
            results = asyncio.run(scenario(srv.url))
        finally:
            gate.set()
        m = metrics(srv.url)
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    assert [text for text, _ in results] == [expected] * 4
    assert m['leap_rejected_total{reason="queue_full"}'] == 3
    assert m['leap_requests_total{route="/v1/completions",status="429"}'] == 3
    assert m['leap_generations_total{outcome="length"}'] == 4


def open_stream(
    url: str, prompt: str, max_tokens: int
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps(
        {
            "model": "tiny-0",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "leap": {"drafter": "none"},
        }
    )
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def first_event(resp: http.client.HTTPResponse) -> dict:
    while not (line := resp.fp.readline()).startswith(b"data: "):
        assert line, "the stream ended early"
    return json.loads(line[6:])


@pytest.mark.parametrize("batching", [False, True])
def test_clients_that_disconnect_free_their_slots(tiny_engine, batching):
    slow_down(tiny_engine, delay=0.02)  # 400 tokens would take 8 s: a cancelled request ends far sooner
    app = build_app(
        tiny_engine, ServerConfig(drafter="none", max_concurrency=2, max_queue=4, batching=batching)
    )
    with BackgroundServer(app) as srv:
        streams = [open_stream(srv.url, prompt_text(i), 400) for i in range(3)]
        for _, resp in streams[:2]:
            assert first_event(resp)["choices"][0]["text"]  # both active ones are generating
        wait_for(srv.url, lambda m: m["leap_active_generations"] == 2 and m["leap_queue_length"] == 1)
        for i in (0, 2):  # one active client and the waiting one go away
            streams[i][1].close()
            streams[i][0].close()
        m = wait_for(
            srv.url,
            lambda m: (
                m.get('leap_generations_total{outcome="cancelled"}') == 2
                and m["leap_active_generations"] == 1
                and m["leap_queue_length"] == 0
            ),
            timeout=5,
        )
        assert m["leap_completion_tokens_total"] < 400  # the cancelled one stopped early
        conn, resp = open_stream(srv.url, prompt_text(5), 3)  # the freed slot serves a new request at once
        assert resp.read().decode().endswith("data: [DONE]\n\n")
        conn.close()
        streams[1][1].close()
        streams[1][0].close()
        m = wait_for(srv.url, lambda m: m["leap_active_generations"] == 0, timeout=5)
        assert m['leap_generations_total{outcome="cancelled"}'] == 3
        assert m['leap_generations_total{outcome="length"}'] == 1

        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)  # not streamed: the same
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps({"model": "tiny-0", "prompt": "AB", "max_tokens": 400}),
            {"Content-Type": "application/json"},
        )
        wait_for(srv.url, lambda m: m["leap_active_generations"] == 1)
        conn.close()
        m = wait_for(srv.url, lambda m: m['leap_generations_total{outcome="cancelled"}'] == 4, timeout=5)
        assert m["leap_active_generations"] == 0
        assert m['leap_requests_total{route="/v1/completions",status="499"}'] == 1


def test_drafter_state_is_kept_across_requests(tiny_engine):
    """Sequential requests reuse one drafter instance per name (so learned state carries over)."""
    app = build_app(tiny_engine, ServerConfig(drafter="none", max_concurrency=4))
    names = [d for d in DRAFTERS if d != "none"] or ["none"]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for name in names:
            for i in range(3):
                client.completions.create(
                    model="tiny-0",
                    prompt=prompt_text(i),
                    max_tokens=6,
                    temperature=0,
                    extra_body={"leap": {"drafter": name}},
                )
        pool = app.state.leap.scheduler.pool
        assert pool.created == {name: 1 for name in names}
