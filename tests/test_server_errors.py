"""Malformed and hostile requests: each gets OpenAI's error JSON with the right 4xx status, and the server
keeps serving. Raw HTTP (http.client) so that bodies, headers and encodings are exactly what we send."""

from __future__ import annotations

import http.client
import json

import pytest
from conftest import tiny_engine_for

from leapdecode.server import BackgroundServer, ServerConfig, build_app
from leapdecode.server.schemas import GenerationRequest, parse_request

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
LIMIT = 4096  # the server's body limit in these tests


def chat(**fields) -> dict:
    return {"model": "tiny-0", "messages": [{"role": "user", "content": "ABC"}], "max_tokens": 4} | fields


def completion(**fields) -> dict:
    return {"model": "tiny-0", "prompt": "ABC", "max_tokens": 4} | fields


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

# (name, method, path, body (dict -> JSON, bytes as is), headers, status, code, param)
CASES = [
    ("invalid JSON", "POST", CHAT, b'{"model": "tiny-0", "messages": [', AUTH, 400, "invalid_json", None),
    ("non-UTF-8 bytes", "POST", CHAT, b'{"model": "tiny-0\xff\xfe"}', AUTH, 400, "invalid_encoding", None),
    (
        "text/plain body",
        "POST",
        CHAT,
        chat(),
        AUTH | {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
        None,
    ),
    (
        "no content type",
        "POST",
        COMPLETIONS,
        completion(),
        {"Authorization": f"Bearer {KEY}"},
        415,
        "unsupported_media_type",
        None,
    ),
    ("body is a list", "POST", CHAT, [chat()], AUTH, 400, None, None),
    (
        "missing model",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "A"}]},
        AUTH,
        400,
        None,
        "model",
    ),
    ("unknown model", "POST", CHAT, chat(model="gpt-4"), AUTH, 404, "model_not_found", "model"),
    ("messages is a string", "POST", CHAT, chat(messages="hello"), AUTH, 400, None, "messages"),
    (
        "message with a bad role",
        "POST",
        CHAT,
        chat(messages=[{"role": "robot", "content": "A"}]),
        AUTH,
        400,
        None,
        "messages[0].role",
    ),
    ("max_tokens = 0", "POST", CHAT, chat(max_tokens=0), AUTH, 400, None, "max_tokens"),
    (
        "max_tokens is a string",
        "POST",
        COMPLETIONS,
        completion(max_tokens="10"),
        AUTH,
        400,
        None,
        "max_tokens",
    ),
    ("max_tokens is a float", "POST", COMPLETIONS, completion(max_tokens=4.5), AUTH, 400, None, "max_tokens"),
    (
        "max_tokens past the context",
        "POST",
        COMPLETIONS,
        completion(max_tokens=510),
        AUTH,
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "prompt longer than the context",
        "POST",
        COMPLETIONS,
        completion(prompt="AB" * 300),
        AUTH,
        400,
        None,
        "prompt",
    ),
    (
        "prompt token id out of vocabulary",
        "POST",
        COMPLETIONS,
        completion(prompt=[1, 2, 999]),
        AUTH,
        400,
        None,
        "prompt",
    ),
    ("empty prompt", "POST", COMPLETIONS, completion(prompt=""), AUTH, 400, None, "prompt"),
    ("negative temperature", "POST", CHAT, chat(temperature=-1), AUTH, 400, None, "temperature"),
    ("boolean temperature", "POST", CHAT, chat(temperature=True), AUTH, 400, None, "temperature"),
    (
        "NaN temperature",
        "POST",
        CHAT,
        b'{"model": "tiny-0", "prompt": "A", "temperature": NaN}',
        AUTH,
        400,
        "invalid_json",
        None,
    ),
    ("top_p above 1", "POST", COMPLETIONS, completion(top_p=1.5), AUTH, 400, None, "top_p"),
    ("n = 2", "POST", CHAT, chat(n=2), AUTH, 400, None, "n"),
    (
        "unknown drafter",
        "POST",
        CHAT,
        chat(leap={"drafter": "magic"}),
        AUTH,
        400,
        "unknown_drafter",
        "leap.drafter",
    ),
    ("unknown extension key", "POST", CHAT, chat(leap={"speed": "max"}), AUTH, 400, None, "leap"),
    ("unknown field", "POST", CHAT, chat(frobnicate=1), AUTH, 400, None, "frobnicate"),
    (
        "five stop strings",
        "POST",
        COMPLETIONS,
        completion(stop=["a", "b", "c", "d", "e"]),
        AUTH,
        400,
        None,
        "stop",
    ),
    ("empty stop string", "POST", COMPLETIONS, completion(stop=""), AUTH, 400, None, "stop"),
    ("logprobs asked", "POST", CHAT, chat(logprobs=True), AUTH, 400, None, "logprobs"),
    ("presence penalty", "POST", CHAT, chat(presence_penalty=0.5), AUTH, 400, None, "presence_penalty"),
    (
        "image content part",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        AUTH,
        400,
        None,
        "messages[0].content[0]",
    ),
    (
        "lone surrogate in content",
        "POST",
        CHAT,
        (b'{"model": "tiny-0", "messages": [{"role": "user", "content": "\\ud800"}]}'),
        AUTH,
        400,
        None,
        "messages[0].content",
    ),
    (
        "nested JSON past the recursion limit",
        "POST",
        CHAT,
        b"[" * 2000 + b"]" * 2000,
        AUTH,
        400,
        "invalid_json",
        None,
    ),
    (
        "stream_options with an unknown key",
        "POST",
        CHAT,
        chat(stream=True, stream_options={"x": 1}),
        AUTH,
        400,
        None,
        "stream_options",
    ),
    (
        "missing API key",
        "POST",
        CHAT,
        chat(),
        {"Content-Type": "application/json"},
        401,
        "invalid_api_key",
        None,
    ),
    (
        "wrong API key",
        "POST",
        CHAT,
        chat(),
        AUTH | {"Authorization": "Bearer nope"},
        401,
        "invalid_api_key",
        None,
    ),
    (
        "wrong auth scheme",
        "GET",
        "/v1/models",
        None,
        {"Authorization": f"Basic {KEY}"},
        401,
        "invalid_api_key",
        None,
    ),
    (
        "oversized body",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "A" * LIMIT}]),
        AUTH,
        413,
        "request_too_large",
        None,
    ),
    ("unknown route", "POST", "/v1/embeddings", chat(), AUTH, 404, "not_found", None),
    ("wrong method", "GET", CHAT, None, AUTH, 405, "method_not_allowed", None),
    ("unknown model by id", "GET", "/v1/models/nope", None, AUTH, 404, "model_not_found", "model"),
]


@pytest.fixture(scope="module")
def server():
    app = build_app(tiny_engine_for(), ServerConfig(drafter="none", api_key=KEY, max_body_bytes=LIMIT))
    with BackgroundServer(app) as srv:
        yield srv


def request(srv, method: str, path: str, body=None, headers=None, chunked: bool = False):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if chunked:
        conn.request(
            method,
            path,
            iter([data[i : i + 1000] for i in range(0, len(data), 1000)]),
            headers or {},
            encode_chunked=True,
        )
    else:
        conn.request(method, path, data, headers or {})
    resp = conn.getresponse()
    status, payload = resp.status, resp.read()
    conn.close()
    return status, payload


def assert_error(status, payload, want_status, want_code=None, want_param=None):
    assert status == want_status, payload
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "rate_limit_error", "server_error")
    if want_code is not None:
        assert error["code"] == want_code
    if want_param is not None:
        assert error["param"] == want_param


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, case):
    _, method, path, body, headers, want_status, want_code, want_param = case
    status, payload = request(server, method, path, body, headers)
    assert_error(status, payload, want_status, want_code, want_param)
    status, payload = request(server, "POST", COMPLETIONS, completion(temperature=0), AUTH)
    assert status == 200 and len(json.loads(payload)["choices"][0]["text"]) > 0


def test_oversized_chunked_body_without_length_is_refused(server):
    body = json.dumps(chat(messages=[{"role": "user", "content": "A" * (2 * LIMIT)}])).encode()
    status, payload = request(server, "POST", CHAT, body, AUTH, chunked=True)
    assert_error(status, payload, 413, "request_too_large")


@pytest.mark.parametrize("batching", [False, True])
def test_a_failing_generation_costs_one_request_not_the_server(tiny_engine, batching):
    """A fault inside generation: a 500 error (an error event when streaming), and the next request works.
    Batched, a failed round is retried item by item (`leapdecode.server.batching`), so the fault repeats
    once more there."""
    forward, done, raised = tiny_engine.model.forward, [], {2: 0, 4: 0}

    def faulty(*args, **kwargs):
        if len(done) in raised and raised[len(done)] < (2 if batching else 1):  # steps into requests 1, 2
            raised[len(done)] += 1
            raise RuntimeError("simulated fault")
        done.append(1)
        return forward(*args, **kwargs)

    tiny_engine.model.forward = faulty
    if batching:
        tiny_engine.model.forward_batch = lambda items: [
            faulty(i.tokens, i.positions, i.cache, i.mask, i.plan) for i in items
        ]
    config = ServerConfig(drafter="none", batching=batching)
    with BackgroundServer(build_app(tiny_engine, config)) as srv:
        status, payload = request(
            srv,
            "POST",
            COMPLETIONS,
            completion(max_tokens=8, temperature=0),
            {"Content-Type": "application/json"},
        )
        assert_error(status, payload, 500, "internal")
        status, payload = request(
            srv,
            "POST",
            COMPLETIONS,
            completion(max_tokens=8, temperature=0, stream=True),
            {"Content-Type": "application/json"},
        )
        events = [json.loads(line[6:]) for line in payload.decode().split("\n\n")[:-2]]
        assert status == 200 and payload.endswith(b"data: [DONE]\n\n")
        assert len(events) == 3 and all(e["choices"][0]["text"] for e in events[:2])  # pieces, then the error
        assert events[2]["error"]["type"] == "server_error" and events[2]["error"]["code"] == "internal"
        status, payload = request(
            srv,
            "POST",
            COMPLETIONS,
            completion(max_tokens=8, temperature=0),
            {"Content-Type": "application/json"},
        )
        assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 8
        status, payload = request(srv, "GET", "/metrics")
        assert b'leap_generations_total{outcome="error"} 2' in payload


def test_health_metrics_and_models_after_the_abuse(server):
    status, payload = request(server, "GET", "/health")
    assert (status, json.loads(payload)) == (200, {"status": "ok"})
    status, payload = request(server, "GET", "/v1/models", headers=AUTH)
    assert status == 200 and [m["id"] for m in json.loads(payload)["data"]] == ["tiny-0"]
    status, payload = request(server, "GET", "/metrics", headers=AUTH)
    assert status == 200 and b'leap_requests_total{route="/v1/chat/completions",status="400"}' in payload


def test_requests_without_max_tokens_get_the_server_default(tiny_engine):
    config = ServerConfig(drafter="none", default_max_tokens=5)
    with BackgroundServer(build_app(tiny_engine, config)) as srv:
        body = {"model": "tiny-0", "prompt": "ABC", "temperature": 0}
        status, payload = request(srv, "POST", COMPLETIONS, body, {"Content-Type": "application/json"})
        answer = json.loads(payload)
        assert status == 200 and answer["usage"]["completion_tokens"] == 5
        assert answer["choices"][0]["finish_reason"] == "length"
        status, payload = request(
            srv,
            "POST",
            COMPLETIONS,
            body | {"max_tokens": 508},  # 3 + 508 = 511 < 512
            {"Content-Type": "application/json"},
        )
        assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 508


# ------------------------------------------------------------------ validation without HTTP


def test_parse_request_maps_openai_fields():
    req = parse_request(
        "chat",
        {
            "model": "m",
            "messages": [
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
                },
                {"role": "user", "content": "hi"},
            ],
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "leap": {"drafter": "none", "max_draft": 8},
            "presence_penalty": 0,
            "logit_bias": None,
            "user": "u",
        },
    )
    assert req == GenerationRequest(
        kind="chat",
        model="m",
        prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=7,
        sampling=req.sampling,
        stop=("\n",),
        stream=True,
        include_usage=True,
        drafter="none",
        max_draft=8,
    )
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.seed) == (0.5, 0.9, 3)


def test_parse_request_defaults_follow_openai():
    req = parse_request("completion", {"model": "m", "prompt": ["AB"]})
    assert (req.prompt, req.max_tokens, req.sampling.temperature, req.stop, req.drafter) == (
        "AB",
        None,
        1.0,
        (),
        None,
    )
    assert parse_request("completion", {"model": "m", "prompt": [[1, 2]], "top_p": 0}).sampling.greedy
    assert parse_request("completion", {"model": "m", "prompt": [5, 6]}).prompt == [5, 6]


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--drafter", "magic"], "unknown drafter 'magic'"),
        (["--drafter", "none", "--port", "70000"], "port must be in [0, 65535]"),
        (["--drafter", "none", "--max-concurrency", "0"], "--max-concurrency: expected an integer >= 1"),
    ],
)
def test_serve_command_rejects_bad_options_in_one_line(argv, message, capsys):
    from leapdecode.cli import main

    try:
        rc = main(["serve", *argv])
    except SystemExit as exc:  # argparse errors exit from the parser
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_serve_command_reports_a_port_in_use(capsys):
    import socket

    from leapdecode.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        rc = main(["serve", "--drafter", "none", "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("leap: error: cannot listen on 127.0.0.1:") and "in use" in err
