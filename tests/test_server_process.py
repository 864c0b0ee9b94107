"""`ServerProcess`: `leap serve` as its own process, as the serving benchmarks run it."""

import json
import urllib.request

import pytest

from leapdecode.server import ServerProcess
from leapdecode.server.runner import healthy


def chat(url: str, content: str, max_tokens: int) -> dict:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.load(resp)


def test_serves_until_stopped_then_exits_cleanly():
    server = ServerProcess(["--drafter", "none", "--batch", "--threads", "1", "--served-model-name", "m"])
    with server as url:
        answer = chat(url, "Say hi.", 4)
        assert answer["usage"]["completion_tokens"] >= 1
        assert answer["choices"][0]["message"]["content"]
    assert server._proc is not None and server._proc.returncode == 0  # SIGTERM: a clean shutdown
    assert not healthy(url)


def test_a_server_that_cannot_start_is_an_error_naming_its_arguments():
    server = ServerProcess(["--model", "no-such-model.gguf"], start_timeout=60)
    with pytest.raises(RuntimeError, match="--model no-such-model.gguf"), server:
        pass
