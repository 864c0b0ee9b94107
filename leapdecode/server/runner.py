"""Running the app with uvicorn: in the foreground (`leap serve`) or in a background thread.

The listening socket is bound here, before uvicorn starts, so that a port in use is a one-line error
rather than uvicorn's exit, and so that port 0 (a free port picked by the system) can be read back.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Self

import uvicorn

from leapdecode.errors import LeapError


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


def make_server(app, *, log_level: str = "info", shutdown_timeout: float = 30.0) -> uvicorn.Server:
    """A uvicorn server for `app`: on shutdown (SIGTERM, SIGINT) it stops accepting connections, lets
    in-flight requests finish for up to `shutdown_timeout` seconds, cancels what is left, then stops the
    generation worker (the app's lifespan)."""
    config = uvicorn.Config(
        app,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)


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

    def start(self) -> BackgroundServer:
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
