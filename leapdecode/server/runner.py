"""Running the app with uvicorn: in the foreground (`leap serve`) or in a background thread.

The listening socket is bound here, before uvicorn starts, so that a port in use is a one-line error
rather than uvicorn's exit, and so that port 0 (a free port picked by the system) can be read back.

Shutdown (SIGTERM, SIGINT, `BackgroundServer.stop`) drains the generations before uvicorn's own
shutdown, which cancels the request tasks still running when its timeout passes and only then runs the
app's lifespan shutdown: by then no stream could be told anything. `LeapServer.shutdown` first stops
accepting connections and admitting requests (waiting ones get 503), lets the active generations finish
for up to `shutdown_timeout` seconds, ends the rest with a 503 error event, waits for every response to
be written, and closes the connections still reading a request; uvicorn then finds nothing to cancel.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Self

import h11
import uvicorn

from leapdecode.errors import LeapError
from leapdecode.server.protocol import ConnectionLimits, protocol_class

#: Once the generations are ended, how long responses may take to be written before connections close.
WRITE_GRACE_S = 5


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise LeapError(f"port must be in [0, 65535], got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise LeapError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class LeapServer(uvicorn.Server):
    """uvicorn's server, draining the app's generations before uvicorn's shutdown (module docstring)."""

    def __init__(self, config: uvicorn.Config, scheduler, shutdown_timeout: float):
        super().__init__(config)
        self.scheduler, self.shutdown_timeout = scheduler, shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # no new connections while the streams finish
        self.scheduler.stop_admitting()
        if not await self._wait(lambda: not self.scheduler.busy, self.shutdown_timeout):
            self.scheduler.abort_active()
            await self._wait(lambda: not self.scheduler.busy, WRITE_GRACE_S)
        await self._wait(lambda: not any(_answering(c) for c in self.server_state.connections), WRITE_GRACE_S)
        for connection in list(self.server_state.connections):
            connection.transport.close()  # idle, or still sending a request nobody will serve
        await super().shutdown(sockets)

    async def _wait(self, done, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if self.force_exit or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def _answering(connection) -> bool:
    """Whether the connection's request has been read in full and its response is not yet complete."""
    cycle = getattr(connection, "cycle", None)
    if cycle is None or cycle.response_complete or cycle.disconnected:
        return False
    return connection.conn.their_state is not h11.SEND_BODY and not connection.transport.is_closing()


def make_server(app, *, log_level: str = "info", shutdown_timeout: float = 30.0) -> uvicorn.Server:
    """A uvicorn server for `app` (from `build_app`), with its connection limits, draining on shutdown."""
    state = app.state.leap
    limits = ConnectionLimits(
        header_timeout=state.config.header_timeout,
        body_timeout=state.config.body_timeout,
        max_connections=state.config.max_connections,
    )
    config = uvicorn.Config(
        app,
        http=protocol_class(limits),
        ws="none",
        loop="asyncio",
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=WRITE_GRACE_S,  # what is left after `LeapServer.shutdown` drained
        timeout_keep_alive=5,
    )
    return LeapServer(config, state.scheduler, shutdown_timeout)


def serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """Run in the foreground until SIGTERM or SIGINT, then shut down cleanly and return.

    uvicorn re-raises the signal it caught once it has shut down; the handlers set here receive it, so
    the process ends by returning (exit status 0) instead of being killed by its own signal.
    """
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda s, _frame: caught.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """The app served on a loopback port from a thread: for tests, benchmarks and embedding.

    >>> with BackgroundServer(build_app(engine, config)) as srv:
    ...     requests go to srv.url (e.g. http://127.0.0.1:41234)
    """

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        shutdown_timeout: float = 10.0,
        start_timeout: float = 60.0,
    ):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, log_level=log_level, shutdown_timeout=shutdown_timeout)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="leap-http", daemon=True
        )
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown, as on SIGTERM."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess:
    """`leap serve ARGS` as its own process on a free loopback port: for benchmarks, whose clients must
    not share the server's interpreter (one GIL for the clients' parsing, the HTTP loop and the
    generations would measure the clients too). Stopped with SIGTERM, as a deployment stops it.
    `command`: another server that takes `--port N` and answers GET /health (a peer, e.g. llama.cpp's
    llama-server) instead of `leap serve`.

    >>> with ServerProcess(["--batch", "--drafter", "none"]) as url:
    ...     requests go to url
    """

    def __init__(
        self,
        args: list[str],
        start_timeout: float = 300.0,
        stop_timeout: float = 120.0,
        command: list[str] | None = None,
    ):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = command or [sys.executable, "-m", "leapdecode.cli", "serve"]
        self.argv = [*command, "--port", str(self.port), *args]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while not healthy(self.url):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{' '.join(self.argv)} did not start")
            time.sleep(0.5)
        return self.url

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def healthy(url: str) -> bool:
    """Whether the server at `url` answers /health with 200."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
