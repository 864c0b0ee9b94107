"""The server against careless and hostile clients: prompts too large to be worth tokenizing, slow
senders, too many connections, foreign Host headers, drafters the server does not have, malformed HTTP,
and the API key kept off the command line. Loopback only, tiny random-weight model, raw sockets where
the bytes on the wire matter."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from conftest import tiny_engine_for

from leapdecode.errors import LeapError
from leapdecode.server import BackgroundServer, ServerConfig, build_app

JSON = {"Content-Type": "application/json"}
KEY = "sk-hardening"


def chat(**fields) -> dict:
    return {"model": "tiny-0", "messages": [{"role": "user", "content": "ABC"}], "max_tokens": 3} | fields


def request(srv, method: str, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, headers or {})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def error_of(payload: bytes) -> dict:
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def raw_exchange(srv, data: bytes, timeout: float = 20) -> bytes:
    """Sends `data` on a fresh connection and reads until the server closes it."""
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_raw(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split(b" ")[1]), error_of(body)


@pytest.fixture(scope="module")
def server():
    engine = tiny_engine_for()
    config = ServerConfig(
        drafter="none",
        api_key=KEY,
        max_messages=8,
        header_timeout=0.5,
        body_timeout=0.5,
        max_connections=6,
        allowed_hosts=("leap.example",),
    )
    with BackgroundServer(build_app(engine, config)) as srv:
        yield srv


AUTH = JSON | {"Authorization": f"Bearer {KEY}"}


# ------------------------------------------------------------------ prompt sizes, before tokenizing


def test_a_prompt_past_any_fitting_length_is_refused_without_tokenizing(server):
    app_state = server.server.config.app.state.leap
    calls = []
    encode = app_state.engine.encode_prompt
    app_state.engine.encode_prompt = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        limit = app_state.limits.max_prompt_chars
        for body in (
            chat(messages=[{"role": "user", "content": "A" * (limit + 1)}]),
            {"model": "tiny-0", "prompt": "A" * (limit + 1)},
            {"model": "tiny-0", "prompt": [1] * 512},  # 512 token ids: the context is 512
        ):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            status, _, payload = request(server, "POST", path, body, AUTH)
            error = error_of(payload)
            assert status == 400 and error["code"] == "context_length_exceeded", error
            assert error["param"] == ("messages" if "messages" in body else "prompt")
        assert calls == []
    finally:
        app_state.engine.encode_prompt = encode


def test_too_many_messages_or_parts_are_refused_before_validation(server):
    status, _, payload = request(server, "POST", "/v1/chat/completions", chat(messages=[{}] * 9), AUTH)
    error = error_of(payload)
    assert (status, error["param"], error["code"]) == (400, "messages", "too_many_messages")
    parts = [{"type": "text", "text": "A"}] * 9
    body = chat(messages=[{"role": "user", "content": parts}])
    status, _, payload = request(server, "POST", "/v1/chat/completions", body, AUTH)
    assert (status, error_of(payload)["param"]) == (400, "messages[0].content")
    status, _, payload = request(server, "POST", "/v1/chat/completions", chat(messages=[{}] * 8), AUTH)
    assert status == 400 and error_of(payload)["param"] == "messages[0].role"  # 8 pass the count


# ------------------------------------------------------------------ slow clients, connection cap


def test_headers_sent_too_slowly_get_408_and_the_connection_closes(server):
    response = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    status, error = parse_raw(response)
    assert (status, error["code"]) == (408, "request_timeout")


def test_a_body_sent_too_slowly_gets_408_and_the_connection_closes(server):
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
    )
    response = raw_exchange(server, head.encode() + b'{"model": ')
    status, error = parse_raw(response)
    assert (status, error["code"]) == (408, "request_timeout")


def test_a_body_nobody_reads_cannot_hold_the_connection(server):
    """An unknown route answers at once; a body still trickling in after it is cut off by the guard
    (every byte received used to restart the keep-alive timer)."""
    head = b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head)
        response = b""
        while not response.endswith(b"}}"):  # the whole 404, its JSON body included
            response += sock.recv(65536)
        assert response.startswith(b"HTTP/1.1 404 ")
        sock.settimeout(0.25)
        for _ in range(80):  # a byte every quarter second, 99 at most: the server must end this first
            try:
                sock.sendall(b"a")
                if sock.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the server kept reading a body nobody wanted")


def test_connections_past_the_cap_get_503_and_the_server_recovers(tiny_engine):
    app = build_app(tiny_engine, ServerConfig(drafter="none", max_connections=6))
    with BackgroundServer(app) as srv:
        idle = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(6)]
        try:
            with socket.create_connection((srv.host, srv.port), timeout=10) as extra:
                status, error = parse_raw(read_until_closed(extra))
            assert (status, error["code"], error["type"]) == (503, "too_many_connections", "server_error")
        finally:
            for sock in idle:
                sock.close()
        status, _, _ = request(srv, "GET", "/health")  # closed ones no longer count
        assert status == 200


def test_an_idle_connection_is_closed_after_the_header_timeout(server):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        assert read_until_closed(sock) == b""  # nothing was asked, nothing is answered


# ------------------------------------------------------------------ Host header


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:80", "LEAP.example"])
def test_loopback_and_allowed_host_names_pass(server, host):
    status, _, _ = request(server, "GET", "/health", headers={"Host": host})
    assert status == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.evil", ""])
def test_other_host_names_get_400(server, host):
    status, _, payload = request(server, "GET", "/v1/models", headers={"Host": host} | AUTH)
    assert (status, error_of(payload)["code"]) == (400, "invalid_host")


def test_any_host_with_a_star(tiny_engine):
    app = build_app(tiny_engine, ServerConfig(drafter="none", allowed_hosts=("*",)))
    with BackgroundServer(app) as srv:
        assert request(srv, "GET", "/health", headers={"Host": "anything.example"})[0] == 200


# ------------------------------------------------------------------ drafters this server has


@pytest.mark.parametrize("stream", [False, True])
def test_a_drafter_the_server_cannot_build_is_a_400_before_the_response(server, stream):
    body = chat(leap={"drafter": "draft-model"}, stream=stream)
    status, headers, payload = request(server, "POST", "/v1/chat/completions", body, AUTH)
    error = error_of(payload)
    assert (status, error["param"], error["code"]) == (400, "leap.drafter", "drafter_unavailable")
    assert "draft-model" in error["message"] and headers["content-type"] == "application/json"


def test_a_server_default_drafter_it_cannot_build_fails_at_startup(tiny_engine):
    with pytest.raises(LeapError, match="draft-model"):
        build_app(tiny_engine, ServerConfig(drafter="draft-model"))


# ------------------------------------------------------------------ request fields


def test_stream_options_need_stream_true(server):
    for fields in ({}, {"stream": False}):
        body = chat(stream_options={"include_usage": True}, **fields)
        status, _, payload = request(server, "POST", "/v1/chat/completions", body, AUTH)
        assert (status, error_of(payload)["param"]) == (400, "stream_options")
    status, _, _ = request(server, "POST", "/v1/chat/completions", chat(stream_options=None), AUTH)
    assert status == 200


# ------------------------------------------------------------------ malformed HTTP, /metrics


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
    ],
    ids=["request line", "content length", "header line"],
)
def test_malformed_http_gets_an_openai_error(server, data):
    status, error = parse_raw(raw_exchange(server, data))
    assert (status, error["code"], error["type"]) == (400, "invalid_http_request", "invalid_request_error")


def test_metrics_need_the_key_when_one_is_set(server):
    status, _, payload = request(server, "GET", "/metrics")
    assert (status, error_of(payload)["code"]) == (401, "invalid_api_key")
    assert request(server, "GET", "/metrics", headers=AUTH)[0] == 200
    assert request(server, "GET", "/health")[0] == 200  # probes need no key


def test_metrics_public_opens_them(tiny_engine):
    config = ServerConfig(drafter="none", api_key=KEY, metrics_public=True)
    with BackgroundServer(build_app(tiny_engine, config)) as srv:
        status, _, payload = request(srv, "GET", "/metrics")
        assert status == 200 and b"leap_requests_total" in payload
        assert request(srv, "GET", "/v1/models")[0] == 401


# ------------------------------------------------------------------ the command line


def run_serve(argv: list[str], capsys) -> tuple[int, str]:
    """`leap serve` up to binding a port that is in use (so nothing loads): exit code and stderr."""
    from leapdecode.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        try:
            rc = main(["serve", "--drafter", "none", "--port", str(port), *argv])
        except SystemExit as exc:
            rc = exc.code
    return rc, capsys.readouterr().err


def test_an_api_key_on_the_command_line_is_warned_about(capsys):
    rc, err = run_serve(["--api-key", "sk-x"], capsys)
    assert rc == 2 and "warning: --api-key is visible to every local user" in err
    assert "LEAP_API_KEY" in err and "--api-key-file" in err


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from leapdecode.cli import build_parser
    from leapdecode.server.command import api_key

    def key(*argv: str) -> str | None:
        return api_key(build_parser().parse_args(["serve", *argv]))

    path = tmp_path / "key"
    path.write_text("sk-from-file\n")
    monkeypatch.setenv("LEAP_API_KEY", "sk-from-env")
    assert key("--api-key-file", str(path)) == "sk-from-file"
    assert key() == "sk-from-env"
    monkeypatch.delenv("LEAP_API_KEY")
    assert key() is None
    assert "warning" not in capsys.readouterr().err
    path.write_text("\n")
    with pytest.raises(LeapError, match="no key"):
        key("--api-key-file", str(path))
    with pytest.raises(LeapError, match="cannot read"):
        key("--api-key-file", str(tmp_path / "missing"))
    with pytest.raises(LeapError, match="once"):
        key("--api-key", "a", "--api-key-file", str(path))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--header-timeout", "0"], "--header-timeout: expected a number of seconds in (0, 3600]"),
        (["--body-timeout", "x"], "--body-timeout: expected a number of seconds"),
        (["--max-connections", "0"], "--max-connections: expected an integer >= 1"),
        (["--allowed-hosts", "a/b"], "allowed host names must be host names"),
    ],
)
def test_bad_limits_are_one_line_errors(argv, message, capsys):
    rc, err = run_serve(argv, capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
