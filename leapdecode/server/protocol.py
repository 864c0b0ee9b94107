"""The HTTP/1.1 connection: uvicorn's h11 protocol with limits it does not have of its own.

- A cap on open connections: one past `max_connections` is answered 503 and closed at once.
- A header timeout: a request's headers must arrive within `header_timeout` seconds of its first byte
  (of the connection, for its first request), else 408 and the connection is closed. uvicorn's
  keep-alive timer restarts on every byte received, so without this a client sending its headers a
  byte at a time (slowloris) holds a connection indefinitely.
- A body guard: the app answers a body slower than `body_timeout` with 408 (`intake.read_body`); a route
  that never reads its body (an unknown path, a 401) leaves it to this guard, which closes a connection
  whose body is still arriving a moment after that.
- Malformed HTTP (a garbage request line, a bad Content-Length, oversized headers) gets OpenAI's error
  JSON instead of uvicorn's plain-text 400.

Errors written here bypass the app (there is no request to route yet), so they are written as raw
bytes, always with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from leapdecode.server.errors import ApiError

#: After `body_timeout`, how long the app has to answer its own 408 before the guard closes.
BODY_GUARD_GRACE_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int


def raw_response(error: ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying `error`, after which the connection closes."""
    body = json.dumps(error.to_dict()).encode()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    """The protocol class uvicorn instantiates per connection, with `limits` bound."""
    return type("LeapH11Protocol", (LeapH11Protocol,), {"limits": limits})


class LeapH11Protocol(H11Protocol):
    limits: ConnectionLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers" or "body" while that timer runs
        if len(self.connections) > self.limits.max_connections:
            return self._refuse(
                ApiError(
                    503,
                    f"too many open connections (at most {self.limits.max_connections}); retry later",
                    code="too_many_connections",
                )
            )
        self._arm("headers", self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def send_400_response(self, msg: str) -> None:
        self._refuse(
            ApiError(
                400,
                "the request is not valid HTTP/1.1 (request line, headers or body framing)",
                code="invalid_http_request",
            )
        )

    # ------------------------------------------------------------ the read timers

    def _watch(self) -> None:
        """Arms or clears the timer for what the client is sending now."""
        if self.transport.is_closing():
            return self._disarm()
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.conn.trailing_data[0] and self._phase != "headers":  # a new request has begun
                self._arm("headers", self.limits.header_timeout)
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.limits.body_timeout + BODY_GUARD_GRACE_S)
        else:  # the request has been read (or the connection is ending): nothing to wait for
            self._disarm()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
        self._timer, self._phase = None, ""

    def _expired(self) -> None:
        phase, self._timer, self._phase = self._phase, None, ""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if phase == "headers" and state is h11.IDLE:
            if not self.conn.trailing_data[0] and self.cycle is None:
                return self.transport.close()  # connected but never sent a byte: nobody to answer
            seconds = f"{self.limits.header_timeout:g}"
            message = f"the request headers did not arrive within {seconds} s"
            return self._refuse(ApiError(408, message, code="request_timeout"))
        if phase == "body" and state is h11.SEND_BODY:
            self.transport.close()  # the app has answered (or given up on) this body by now

    def _refuse(self, error: ApiError) -> None:
        self._disarm()
        self.transport.write(raw_response(error))
        self.transport.close()
