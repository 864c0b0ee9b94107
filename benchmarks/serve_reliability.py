"""Reliability of `leap serve` against careless and hostile clients, on loopback only.

Starts `leap serve` as a process (the bundled model unless --model; the API key from $LEAP_API_KEY),
then, bounded in count and in time (--time-limit), sends:

- bad input of many kinds (malformed HTTP, slow headers and bodies, foreign Host headers, bad JSON,
  bad fields, prompts far past the context, missing keys, ...): each must get the expected status with
  OpenAI's error JSON, and the server must answer /health after it;
- two ~4 MB prompts at once while /health is probed and a 32-token request runs: /health must answer
  within 0.3 s and the request take at most 0.3 s longer than on an idle server (both printed);
- a burst of 32 concurrent streams (each text must equal the same request not streamed), an overload
  burst (the excess gets 429 with Retry-After), clients that disconnect mid-stream (their slots free);
- SIGTERM mid-stream: the active stream ends with an error event and [DONE], the queued one with an
  error event and [DONE], the process exits 0 and logs no traceback.

Prints a table (kind, status, pass) and exits 1 if any check failed.

    python benchmarks/serve_reliability.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

KEY = "sk-reliability"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# what /health may take, and a short request may take beyond its time on an idle server, while huge
# prompts are being refused
LATENCY_BOUND_S = 0.3
PROBE_EVERY_S = 0.02  # /health probes spaced so that they do not load the server themselves


@dataclass
class Row:
    kind: str
    status: str
    ok: bool
    note: str = ""


class Server:
    """`leap serve` in a child process on a free loopback port."""

    def __init__(self, args):
        self.log: list[str] = []
        flags = ["--port", "0", "--drafter", "none", "--max-concurrency", "4", "--max-queue", "32"]
        flags += ["--shutdown-timeout", "2", "--header-timeout", "2", "--body-timeout", "2"]
        flags += ["--max-connections", "100", "--log-level", "warning"]
        flags += ["--model", args.model] if args.model else []
        cmd = [sys.executable, "-m", "leapdecode.cli", "serve", *flags]
        env = dict(os.environ, LEAP_API_KEY=KEY, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        found = None
        for line in self.proc.stderr:  # the line naming the URL comes once the model has loaded
            if found := re.search(r"leap serve: (\S+) on http://(\S+):(\d+) ", line):
                break
        if not found:
            self.proc.kill()
            sys.exit(f"serve_reliability: the server did not start: {line.strip()}")
        self.model, self.host, self.port = found.group(1), found.group(2), int(found.group(3))
        self._drain = threading.Thread(target=self._copy_log, daemon=True)
        self._drain.start()

    def _copy_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._drain.join(5)
        return "".join(self.log)


# ------------------------------------------------------------------ HTTP helpers


def send(srv: Server, method: str, path: str, body=None, headers=None, timeout: float = 120):
    """(status, headers, body bytes) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, headers if headers is not None else AUTH)
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def raw(srv: Server, data: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Sends raw bytes, reads until the server closes; (status, body)."""
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return (int(head.split(b" ")[1]) if head else 0), body


def error_code(body: bytes) -> str | None:
    """The error's code if `body` is OpenAI's error JSON, else "not-openai"."""
    try:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return error["code"]
    except (ValueError, KeyError, TypeError, AssertionError):
        return "not-openai"


def healthy(srv: Server) -> bool:
    try:
        return send(srv, "GET", "/health", headers={}, timeout=10)[0] == 200
    except OSError:
        return False


def stream_events(srv: Server, body: dict, timeout: float = 300) -> tuple[int, list]:
    status, _, payload = send(srv, "POST", COMPLETIONS, body | {"stream": True}, timeout=timeout)
    if status != 200:
        return status, [error_code(payload)]
    parts = [p for p in payload.decode().split("\n\n") if p]
    return status, [json.loads(p[6:]) if p != "data: [DONE]" else "[DONE]" for p in parts]


# ------------------------------------------------------------------ bad input


def bad_inputs(model: str) -> list[tuple[str, str, str, object, dict | None, int, str | None]]:
    """(kind, method, path, body, headers, status, code) of each bad request."""

    def chat(**f):
        return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | f

    def comp(**f):
        return {"model": model, "prompt": "Hi", "max_tokens": 4} | f

    plain = {"Content-Type": "application/json"}
    return [
        ("invalid JSON", "POST", CHAT, b'{"model": "x", "messages": [', AUTH, 400, "invalid_json"),
        ("non-UTF-8 body", "POST", CHAT, b'{"model": "x\xff"}', AUTH, 400, "invalid_encoding"),
        ("text/plain body", "POST", CHAT, chat(), AUTH | {"Content-Type": "text/plain"}, 415, None),
        ("no content type", "POST", CHAT, chat(), {"Authorization": AUTH["Authorization"]}, 415, None),
        ("body is a list", "POST", CHAT, [chat()], AUTH, 400, None),
        ("missing model", "POST", CHAT, {"messages": [{"role": "user", "content": "A"}]}, AUTH, 400, None),
        ("unknown model", "POST", CHAT, chat(model="gpt-4"), AUTH, 404, "model_not_found"),
        ("messages is a string", "POST", CHAT, chat(messages="hi"), AUTH, 400, None),
        ("bad role", "POST", CHAT, chat(messages=[{"role": "robot", "content": "A"}]), AUTH, 400, None),
        ("max_tokens = 0", "POST", CHAT, chat(max_tokens=0), AUTH, 400, None),
        ("max_tokens a string", "POST", COMPLETIONS, comp(max_tokens="9"), AUTH, 400, None),
        ("max_tokens past context", "POST", COMPLETIONS, comp(max_tokens=10**6), AUTH, 400, None),
        ("negative temperature", "POST", CHAT, chat(temperature=-1), AUTH, 400, None),
        ("NaN temperature", "POST", CHAT, b'{"model": "x", "temperature": NaN}', AUTH, 400, "invalid_json"),
        ("top_p above 1", "POST", COMPLETIONS, comp(top_p=1.5), AUTH, 400, None),
        ("n = 2", "POST", CHAT, chat(n=2), AUTH, 400, None),
        ("unknown drafter", "POST", CHAT, chat(leap={"drafter": "magic"}), AUTH, 400, "unknown_drafter"),
        (
            "draft-model not loaded (stream)",
            "POST",
            CHAT,
            chat(leap={"drafter": "draft-model"}, stream=True),
            AUTH,
            400,
            "drafter_unavailable",
        ),
        ("unknown field", "POST", CHAT, chat(frobnicate=1), AUTH, 400, None),
        ("five stop strings", "POST", COMPLETIONS, comp(stop=list("abcde")), AUTH, 400, None),
        ("logprobs", "POST", CHAT, chat(logprobs=True), AUTH, 400, None),
        (
            "image content part",
            "POST",
            CHAT,
            chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            AUTH,
            400,
            None,
        ),
        (
            "lone surrogate",
            "POST",
            CHAT,
            b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}',
            AUTH,
            400,
            None,
        ),
        ("JSON nested 100k deep", "POST", CHAT, b"[" * 100000 + b"]" * 100000, AUTH, 400, "invalid_json"),
        ("stream_options without stream", "POST", CHAT, chat(stream_options={}), AUTH, 400, None),
        ("body over 4 MiB", "POST", CHAT, b"{" + b" " * (5 << 20) + b"}", AUTH, 413, "request_too_large"),
        ("missing API key", "POST", CHAT, chat(), plain, 401, "invalid_api_key"),
        ("wrong API key", "POST", CHAT, chat(), plain | {"Authorization": "Bearer no"}, 401, None),
        ("/metrics without the key", "GET", "/metrics", None, {}, 401, "invalid_api_key"),
        ("unknown route", "POST", "/v1/embeddings", chat(), AUTH, 404, "not_found"),
        ("wrong method", "GET", CHAT, None, AUTH, 405, "method_not_allowed"),
        ("Host: attacker.example", "GET", "/health", None, {"Host": "attacker.example"}, 400, "invalid_host"),
        ("100k empty messages", "POST", CHAT, chat(messages=[{}] * 100000), AUTH, 400, "too_many_messages"),
        ("token ids past context", "POST", COMPLETIONS, comp(prompt=[1] * 40000), AUTH, 400, None),
        (
            "4 MB prompt",
            "POST",
            COMPLETIONS,
            comp(prompt="word " * 800000),
            AUTH,
            400,
            "context_length_exceeded",
        ),
    ]


def raw_inputs(srv: Server) -> list[tuple[str, bytes, int, str]]:
    host = f"Host: {srv.host}\r\n".encode()
    post = b"POST /v1/completions HTTP/1.1\r\n" + host
    return [
        ("garbage request line", b"GARBAGE\r\n\r\n", 400, "invalid_http_request"),
        ("bad Content-Length", post + b"Content-Length: abc\r\n\r\n", 400, "invalid_http_request"),
        ("header line without colon", b"GET /health HTTP/1.1\r\n" + host + b"Bad\r\n\r\n", 400, None),
        ("headers never finished", post, 408, "request_timeout"),
        (
            "body never finished",
            post
            + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
            + b"Content-Length: 100\r\n\r\n{",
            408,
            "request_timeout",
        ),
        ("HTTP/1.0 without Host", b"GET /health HTTP/1.0\r\n\r\n", 400, "invalid_host"),
    ]


def check_bad_inputs(srv: Server) -> list[Row]:
    rows = []
    for kind, method, path, body, headers, want, code in bad_inputs(srv.model):
        try:
            status, _, payload = send(srv, method, path, body, headers, timeout=60)
            got = error_code(payload)
        except OSError as exc:
            status, got = 0, type(exc).__name__
        ok = status == want and got != "not-openai" and (code is None or got == code) and healthy(srv)
        rows.append(Row(kind, str(status), ok, "" if ok else f"code {got}"))
    for kind, data, want, code in raw_inputs(srv):
        status, payload = raw(srv, data)
        got = error_code(payload)
        ok = status == want and got != "not-openai" and (code is None or got == code) and healthy(srv)
        rows.append(Row(kind, str(status), ok, "" if ok else f"code {got}"))
    return rows + [check_connection_cap(srv)]


def check_connection_cap(srv: Server) -> Row:
    idle = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(100)]
    try:
        status, payload = raw(srv, b"")
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    ok = status == 503 and error_code(payload) == "too_many_connections" and healthy(srv)
    return Row("connection past --max-connections", str(status), ok)


# ------------------------------------------------------------------ latency while huge prompts are refused


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def short_request(srv: Server) -> None:
    body = {"model": srv.model, "prompt": "The capital of France is", "max_tokens": 32, "temperature": 0}
    status, _, _ = send(srv, "POST", COMPLETIONS, body | {"leap": {"drafter": "none"}})
    assert status == 200


def check_latency(srv: Server, rounds: int) -> list[Row]:
    idle = statistics.median(timed(lambda: short_request(srv)) for _ in range(3))
    huge = [
        json.dumps({"model": srv.model, "prompt": "word " * 800000}).encode(),
        json.dumps(
            {"model": srv.model, "messages": [{"role": "user", "content": "word " * 800000}]}
        ).encode(),
    ]
    health, short, refused, refusal_s = [], [], [], []

    def refuse(path: str, body: bytes) -> int:
        t0 = time.perf_counter()
        status = send(srv, "POST", path, body)[0]
        refusal_s.append(time.perf_counter() - t0)
        return status

    with ThreadPoolExecutor(4) as pool:
        for _ in range(rounds):
            big = [pool.submit(refuse, p, b) for p, b in zip((COMPLETIONS, CHAT), huge)]
            time.sleep(0.01)
            request = pool.submit(timed, lambda: short_request(srv))
            while not all(f.done() for f in big) or not request.done():
                health.append(timed(lambda: send(srv, "GET", "/health", headers={}, timeout=10)))
                time.sleep(PROBE_EVERY_S)
            refused += [f.result() for f in big]
            short.append(request.result())
    statuses = "/".join(map(str, sorted(set(refused))))
    rows = [Row(f"{len(refused)} x 4 MB prompts refused", statuses, set(refused) == {400})]
    rows[0].note = f"each answered within {max(refusal_s):.3f} s"
    worst = max(health)
    note = f"{len(health)} probes"
    rows.append(Row("/health while refusing", f"max {worst:.3f} s", worst < LATENCY_BOUND_S, note))
    slow = max(short)
    note = f"idle: {idle:.3f} s (median of 3); {rounds} rounds"
    rows.append(
        Row("32-token request while refusing", f"max {slow:.3f} s", slow < idle + LATENCY_BOUND_S, note)
    )
    return rows


# ------------------------------------------------------------------ bursts, disconnects


def prompt(i: int) -> str:
    return f"Item {i}: the list of the numbers from {i} to {i + 20} is"


def piece_texts(events: list) -> list[str]:
    return [e["choices"][0]["text"] for e in events if e != "[DONE]" and e.get("choices")]


def check_burst(srv: Server, n: int = 32) -> Row:
    bodies = [{"model": srv.model, "prompt": prompt(i), "max_tokens": 16, "temperature": 0} for i in range(n)]
    expected = [json.loads(send(srv, "POST", COMPLETIONS, b)[2])["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda b: stream_events(srv, b), bodies))
    texts = ["".join(piece_texts(events)) for _, events in results]
    done = sum(1 for _, ev in results if ev and ev[-1] == "[DONE]")
    same = sum(1 for t, want in zip(texts, expected) if t == want)
    ok = done == n and same == n
    return Row(f"{n}-stream burst", f"{done}x[DONE]", ok, f"{same}/{n} equal to unstreamed")


def check_overload(srv: Server, n: int = 48) -> Row:
    body = {"model": srv.model, "prompt": prompt(0), "max_tokens": 32, "temperature": 0}

    def one(_):
        status, headers, payload = send(srv, "POST", COMPLETIONS, body | {"stream": True})
        if status == 429:
            retry = any(k.lower() == "retry-after" for k in headers)
            return 429, retry and error_code(payload) == "queue_full"
        return status, payload.endswith(b"data: [DONE]\n\n")

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    counts = {s: sum(1 for r in results if r[0] == s) for s in sorted({r[0] for r in results})}
    ok = set(counts) == {200, 429} and all(good for _, good in results) and healthy(srv)
    return Row(f"overload burst of {n}", " ".join(f"{n}x{s}" for s, n in counts.items()), ok)


def metrics(srv: Server) -> dict[str, float]:
    text = send(srv, "GET", "/metrics", headers={"Authorization": AUTH["Authorization"]})[2].decode()
    return {
        k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()) if k and k[0] != "#"
    }


def check_disconnects(srv: Server, n: int = 4) -> Row:
    conns = []
    for i in range(n):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        body = {"model": srv.model, "prompt": prompt(i), "max_tokens": 2000, "stream": True}
        conn.request("POST", COMPLETIONS, json.dumps(body), AUTH)
        resp = conn.getresponse()
        resp.readline()
        conns.append(conn)
    for conn in conns:
        conn.close()
    deadline = time.monotonic() + 10
    while (active := metrics(srv)["leap_active_generations"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return Row(f"{n} clients disconnect mid-stream", f"{int(active)} active after", active == 0)


# ------------------------------------------------------------------ SIGTERM


def check_sigterm(srv: Server) -> list[Row]:
    body = {"model": srv.model, "prompt": "1, 2, 3, 4,", "max_tokens": 4000, "temperature": 0}
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_events, srv, body) for _ in range(5)]  # 4 generate, 1 waits
        deadline = time.monotonic() + 30
        while metrics(srv)["leap_queue_length"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        ends = []
        for f in streams:
            try:
                _, events = f.result()
                last = events[-2] if len(events) > 1 else {}
                ends.append(events[-1] == "[DONE]" and last.get("error", {}).get("code") == "shutting_down")
            except (OSError, http.client.HTTPException):
                ends.append(False)
    exit_code = srv.proc.wait(60)
    log = srv.stop()
    clean = "Traceback" not in log and "CancelledError" not in log
    return [
        Row("SIGTERM: 5 streams end with error + [DONE]", f"{sum(ends)}/5", all(ends)),
        Row("SIGTERM: exit status, no traceback", f"exit {exit_code}", exit_code == 0 and clean),
    ]


# ------------------------------------------------------------------ main


def print_table(rows: list[Row]) -> None:
    print("| kind | status | pass | note |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r.kind} | {r.status} | {'yes' if r.ok else 'NO'} | {r.note} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or folder (default: the bundled model)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the two huge prompts (default: 3)")
    p.add_argument("--time-limit", type=float, default=900, help="seconds before the run is abandoned")
    args = p.parse_args()
    threading.Timer(args.time_limit, lambda: os._exit(2)).start()  # bounded, whatever hangs
    srv = Server(args)
    rows: list[Row] = []
    try:
        rows += check_bad_inputs(srv)
        rows += check_latency(srv, args.rounds)
        rows.append(check_burst(srv))
        rows.append(check_overload(srv))
        rows.append(check_disconnects(srv))
        rows += check_sigterm(srv)
    finally:
        srv.stop()
        print_table(rows)
    os._exit(0 if rows and all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
