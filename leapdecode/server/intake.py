"""What every request passes before a route looks at it: the Host header, the API key, and a body read
within its size and time limits and parsed as JSON.

The Host check defends a server on loopback against DNS rebinding: a web page whose host name resolves
to 127.0.0.1 could otherwise read the API from the visitor's browser. Browsers always send the page's
host name, so only the names this server answers to (loopback by default) are let through.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from starlette.requests import ClientDisconnect, Request

from leapdecode.server.errors import ApiError, invalid

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The host of a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class CheckHost:
    """ASGI middleware: requests whose Host header names none of `allowed` get a 400 (``*`` allows any)."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_name(host) not in self.allowed:
                shown = host[:100] or "none"
                error = ApiError(
                    400,
                    f"the Host header {shown!r} is not one this server answers to; start the server with "
                    "--allowed-hosts NAME to accept that name",
                    code="invalid_host",
                )
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def authorize(request: Request, key: str | None) -> None:
    """Checks `Authorization: Bearer KEY` in constant time, before the body is read."""
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body must be at most {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, at most `limit` bytes, all of it within `timeout` seconds (a slow sender gets a 408 and
    the connection is closed, so that it cannot hold a connection by trickling bytes)."""
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise invalid("the Content-Length header is not a number", code="invalid_content_length")
    if length is not None and int(length) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise ApiError(499, "the client closed the request", code="client_closed_request") from None
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int, timeout: float) -> object:
    """The body as JSON: `Content-Type: application/json`, UTF-8, standard JSON (no NaN)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            f"Content-Type must be application/json, got {media_type or 'none'!r}",
            code="unsupported_media_type",
        )
    body = await read_body(request, limit, timeout)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(
            f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise invalid("the request body's JSON is nested too deeply", code="invalid_json") from None
