"""`leap serve --replicas N` on a local Ray cluster (started once for the module): two engine replicas of
the bundled model, one CPU each, behind one endpoint. Concurrent streams equal single-engine greedy
output, a conversation's turns stay on one replica, a killed replica is restarted while its streams end
with an error event, and bad requests get the single-process server's errors. The routing policy and the
metrics merge are checked without Ray first."""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from leapdecode.drafters import available
from leapdecode.engine import GenerationConfig
from leapdecode.server.errors import ApiError
from leapdecode.server.metrics import parse_samples
from leapdecode.server.ray_routing import BLOCK, ReplicaSlot, block_keys, choose

KEY = "sk-ray"
MODEL = "smollm2"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
DRAFTERS = [d for d in ("none", "pld", "suffix") if d in available()]

# ------------------------------------------------------------------ routing, without Ray


def slots(*loads: int, up=None) -> list[ReplicaSlot]:
    out = [ReplicaSlot(i, in_flight=n) for i, n in enumerate(loads)]
    for i, state in enumerate(up or []):
        out[i].up = state
    return out


def test_block_keys_name_whole_prefixes():
    a, b = list(range(40)), list(range(40)) + [7] * 30
    assert len(block_keys(a)) == 40 // BLOCK and block_keys(b)[: len(block_keys(a))] == block_keys(a)
    assert block_keys(a[1:])[0] != block_keys(a)[0]  # a block's key depends on where it stands
    assert block_keys(list(range(BLOCK - 1))) == []


def test_a_conversation_goes_back_to_the_replica_holding_its_prefix():
    reps = slots(0, 0)
    first = block_keys(list(range(64)))
    chosen, decision = choose(reps, first, slots=2, capacity=4)
    assert decision == "balanced"
    chosen.prefixes.add(first)
    later = block_keys(list(range(64)) + [1] * 40)  # the next turn extends the prompt
    assert choose(reps, later, 2, 4) == (chosen, "affinity")
    other = reps[1 - chosen.index]
    other.prefixes.add(first[:2])  # a prefix both hold (a system prompt) decides nothing by itself
    assert choose(reps, later, 2, 4) == (chosen, "affinity")
    assert choose(reps, first[:2], 2, 4)[1] == "balanced"


def test_fallbacks_and_refusals():
    keys = block_keys(list(range(32)))
    reps = slots(2, 0)
    reps[0].prefixes.add(keys)
    assert choose(reps, keys, slots=2, capacity=4) == (reps[1], "fallback_busy")  # its slots are busy
    reps[1].in_flight = 2
    assert choose(reps, keys, 2, 4) == (reps[0], "affinity")  # every replica busy: it queues there
    reps[0].in_flight = 4
    assert choose(reps, keys, 2, 4) == (reps[1], "fallback_busy")  # its queue is full
    reps[0].in_flight, reps[0].up = 0, False
    assert choose(reps, keys, 2, 4) == (reps[1], "fallback_down")
    reps[1].in_flight = 4
    with pytest.raises(ApiError) as full:
        choose(reps, keys, 2, 4)
    assert (full.value.status, full.value.code) == (429, "queue_full")
    reps[1].up = False
    with pytest.raises(ApiError) as none:
        choose(reps, keys, 2, 4)
    assert (none.value.status, none.value.code) == (503, "no_replica")


def test_the_least_loaded_replica_takes_new_conversations_in_turn():
    reps = slots(1, 0, 0)
    picks = [choose(reps, [], 2, 4, turn)[0].index for turn in range(4)]
    assert picks == [1, 1, 2, 1]  # ties in turn order from `turn`


def test_metrics_carry_every_replica_with_its_label():
    pytest.importorskip("ray")
    from leapdecode.server.metrics import ServerMetrics
    from leapdecode.server.ray_router import Replica, RouterMetrics
    from leapdecode.stats import Stats

    reps = [Replica(0, handle=None), Replica(1, handle=None)]
    for rep, outcome in zip(reps, ("stop", "length")):
        own = ServerMetrics(lambda: 0, lambda: 0, 4)
        own.observe_generation(Stats(prompt_tokens=5, new_tokens=3, drafter="none"), outcome)
        rep.metrics_text = own.render()
    reps[1].up = False
    merged = RouterMetrics(reps)
    merged.requests.inc(route="/v1/completions", status="200")
    text = merged.render()
    s = parse_samples(text)
    assert s['leap_generations_total{outcome="stop",replica="0"}'] == 1
    assert s['leap_generations_total{outcome="length",replica="1"}'] == 1
    assert s['leap_prompt_tokens_total{replica="1"}'] == 5
    assert s['leap_requests_total{route="/v1/completions",status="200"}'] == 1  # the front's own
    assert (s['leap_replica_up{replica="0"}'], s['leap_replica_up{replica="1"}']) == (1, 0)
    assert text.count("# TYPE leap_generations_total ") == 1  # one family, both replicas' samples


# ------------------------------------------------------------------ the command line


def test_replicas_without_ray_name_the_extra(monkeypatch, capsys):
    from leapdecode.cli import main

    for name in [m for m in sys.modules if m == "ray" or m.startswith(("ray.", "leapdecode.server.ray_"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    rc = main(["serve", "--replicas", "2", "--drafter", "none", "--port", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "pip install 'leapdecode[serve]'" in err and len(err.strip().splitlines()) == 1


def test_ray_options_need_replicas(capsys):
    from leapdecode.cli import main

    rc = main(["serve", "--ray-address", "auto", "--drafter", "none", "--port", "0"])
    assert rc != 0 and "need --replicas 2 or more" in capsys.readouterr().err
    if importlib.util.find_spec("ray") is not None:  # refused before any cluster starts
        rc = main(["serve", "--replicas", "2", "--threads", "2", "--drafter", "none", "--port", "0"])
        assert rc != 0 and "--replica-cpus; drop --threads" in capsys.readouterr().err


# ------------------------------------------------------------------ two replicas on a local cluster


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("ray.serve")
    from leapdecode.server import BackgroundServer, ServerConfig
    from leapdecode.server.ray_app import RayOptions, ReplicaServer
    from leapdecode.server.ray_replica import ReplicaSpec

    config = ServerConfig(drafter="none", api_key=KEY, model_name=MODEL, max_concurrency=4, max_queue=64)
    options, spec = RayOptions(replicas=2, replica_cpus=1), ReplicaSpec(config=config, cpus=1)
    with ReplicaServer(options, spec) as rs, BackgroundServer(rs.app(probe_interval=0.5)) as srv:
        yield srv


def metrics(url: str) -> dict[str, float]:
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return parse_samples(resp.read().decode())


def wait_for(url: str, condition, timeout: float = 90.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not condition(m := metrics(url)):
        assert time.monotonic() < deadline, f"condition not reached; metrics: {m}"
        time.sleep(0.2)
    return m


def routed(m: dict[str, float]) -> list[float]:
    return [m[f'leap_replica_requests_total{{replica="{i}"}}'] for i in range(2)]


def prompt(i: int) -> str:
    topics = ["rivers", "bread", "the moon", "chess", "volcanoes", "owls", "trains", "tea"]
    return f"Write one sentence about {topics[i % 8]}, number {i}."


async def stream_text(client, kind: str, text: str, drafter: str, max_tokens: int) -> str:
    common = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    common["extra_body"] = {"leap": {"drafter": drafter}}
    if kind == "chat":
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
    else:
        stream = await client.completions.create(prompt=text, **common)
    pieces = []
    async for chunk in stream:
        if chunk.choices:
            pieces.append((chunk.choices[0].delta.content if kind == "chat" else chunk.choices[0].text) or "")
    return "".join(pieces)


def test_32_concurrent_streams_equal_one_engine(served, default_engine):
    jobs = [("chat" if i % 2 else "completion", prompt(i), DRAFTERS[i % len(DRAFTERS)]) for i in range(32)]
    config = GenerationConfig(max_new_tokens=12, drafter="none")
    expected = [default_engine.generate(p, config, raw=kind == "completion").text for kind, p, _ in jobs]
    before = routed(metrics(served.url))

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120
        ) as client:
            tasks = [stream_text(client, kind, p, d, 12) for kind, p, d in jobs]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=150)

    assert asyncio.run(run_all()) == expected  # every request, in order: none lost, none mixed up
    after = routed(metrics(served.url))
    assert sum(after) - sum(before) == 32 and all(a > b for a, b in zip(after, before))  # both served


def chat_turn(client, messages: list[dict]) -> tuple[str, dict]:
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    return resp.choices[0].message.content, resp.model_extra["leap_stats"]


def test_a_conversation_stays_on_one_replica(served, default_engine):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    before = metrics(served.url)
    messages: list[dict] = [{"role": "system", "content": "You are a terse assistant for a bakery."}]
    cached = []
    for question in ("What is sourdough?", "How long does it rise?", "And at what temperature?"):
        messages.append({"role": "user", "content": question})
        answer, stats = chat_turn(client, messages)
        ref = default_engine.generate(messages, GenerationConfig(max_new_tokens=24, drafter="none"))
        assert answer == ref.text
        cached.append(stats["prefix_cached_tokens"])
        messages.append({"role": "assistant", "content": answer})
    after = metrics(served.url)
    gained = [a - b for a, b in zip(routed(after), routed(before))]
    assert sorted(gained) == [0, 3]  # all three turns on one replica
    hits = 'leap_router_decisions_total{decision="affinity"}'
    assert after[hits] - before[hits] >= 2  # turns 2 and 3 followed their prefix
    assert cached[1] > 0 and cached[2] > cached[1]  # that replica's prefix cache held the conversation


def read_event(resp) -> dict | str:
    """The next server-sent event's data (a JSON object, or the string [DONE])."""
    while True:
        line = resp.readline()
        assert line, "the stream ended without [DONE]"
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            return data if data == "[DONE]" else json.loads(data)


def replica_actor(index: int):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    name = next(n for n in names if n.startswith(f"SERVE_REPLICA::leap-replica-{index}#"))
    return ray.get_actor(name, namespace="serve")


def test_a_killed_replica_fails_its_streams_cleanly_and_comes_back(served):
    import ray

    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 1500, "temperature": 0}
    conn = http.client.HTTPConnection(served.host, served.port, timeout=60)  # a read never waits longer
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}), AUTH)
    resp = conn.getresponse()
    assert resp.status == 200 and read_event(resp)["choices"][0]["text"]  # generating
    m = metrics(served.url)
    victim = next(i for i in range(2) if m[f'leap_replica_in_flight{{replica="{i}"}}'] == 1)
    restarts = f'leap_replica_restarts_total{{replica="{victim}"}}'
    before = m[restarts]
    ray.kill(replica_actor(victim), no_restart=True)
    while isinstance(event := read_event(resp), dict) and "error" not in event:
        assert event["choices"][0]["finish_reason"] is None, "the stream ended before the replica died"
    assert isinstance(event, dict) and event["error"]["code"] == "replica_failed"
    assert read_event(resp) == "[DONE]"
    conn.close()

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    for i in range(3):  # while the replica restarts, requests go to the live one
        assert client.completions.create(model=MODEL, prompt=prompt(i), max_tokens=4, temperature=0).choices
    m = wait_for(
        served.url, lambda m: m[restarts] == before + 1 and m[f'leap_replica_up{{replica="{victim}"}}']
    )
    assert m[f'leap_replica_failed_requests_total{{replica="{victim}"}}'] >= 1
    replies = [
        client.completions.create(model=MODEL, prompt=prompt(i), max_tokens=4, temperature=0)
        for i in range(4)
    ]
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert (
        metrics(served.url)[f'leap_replica_requests_total{{replica="{victim}"}}']
        > m[f'leap_replica_requests_total{{replica="{victim}"}}']
    )


def test_a_client_that_goes_away_frees_its_replica_slot(served):
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 1500, "stream": True}
    conn = http.client.HTTPConnection(served.host, served.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body | {"temperature": 0}), AUTH)
    resp = conn.getresponse()
    assert read_event(resp)["choices"][0]["text"]
    m = metrics(served.url)
    replica = next(i for i in range(2) if m[f'leap_replica_in_flight{{replica="{i}"}}'] == 1)
    cancelled = f'leap_generations_total{{outcome="cancelled",replica="{replica}"}}'
    before = m.get(cancelled, 0)
    conn.close()  # the replica's job is cancelled, not left generating 1500 tokens
    m = wait_for(served.url, lambda m: m.get(cancelled, 0) == before + 1, timeout=30)
    assert m[f'leap_replica_in_flight{{replica="{replica}"}}'] == 0
    assert m[f'leap_active_generations{{replica="{replica}"}}'] == 0


def test_health_models_and_metrics_key(served):
    with urllib.request.urlopen(served.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(served.url + "/metrics", timeout=10)
    assert info.value.code == 401


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | fields


CASES = [  # (name, body, headers, status, code, param): as the single-process server answers them
    ("no API key", chat(), {"Content-Type": "application/json"}, 401, "invalid_api_key", None),
    ("wrong API key", chat(), AUTH | {"Authorization": "Bearer sk-no"}, 401, "invalid_api_key", None),
    ("invalid JSON", b'{"model": ', AUTH, 400, "invalid_json", None),
    ("unknown model", chat(model="gpt-4"), AUTH, 404, "model_not_found", "model"),
    ("n = 2", chat(n=2), AUTH, 400, None, "n"),
    ("unknown drafter", chat(leap={"drafter": "nope"}), AUTH, 400, None, "leap.drafter"),
    ("past the context", chat(max_tokens=10**6), AUTH, 400, "context_length_exceeded", "max_tokens"),
    ("stream, bad temperature", chat(stream=True, temperature=-1), AUTH, 400, None, "temperature"),
]


@pytest.mark.parametrize("name,body,headers,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_requests_get_the_single_process_errors(served, name, body, headers, status, code, param):
    conn = http.client.HTTPConnection(served.host, served.port, timeout=30)
    conn.request(
        "POST", "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body), headers
    )
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    conn.close()
    assert resp.status == status and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and (code is None or error["code"] == code)


def test_replicas_load_the_model_with_every_model_option():
    """What `leap serve --replicas` hands each replica's `Engine.load` follows the model options (the
    key/value cache format included), checked without starting Ray."""
    pytest.importorskip("ray", reason="ray[serve] is not installed (the serve extra)")
    from leapdecode.cli import build_parser
    from leapdecode.server.ray_app import load_args

    args = build_parser().parse_args(["serve", "--replicas", "2", "--kv-cache", "int8", "--quant", "int4"])
    got = load_args(args)
    assert got["kv_cache"] == "int8" and got["quant"] == "int4"
