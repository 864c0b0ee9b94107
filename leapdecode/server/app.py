"""The HTTP application: OpenAI routes over one `Engine`, built with Starlette.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}], GET /health,
GET /metrics. See `leapdecode.server` for the request extension (`leap`) and the response's `leap_stats`.
The bodies of POST routes must be JSON (`Content-Type: application/json`, UTF-8, at most
`max_body_bytes`); with an API key set, /v1/ routes need `Authorization: Bearer KEY` (/health and /metrics
stay open for probes and scrapers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from leapdecode.drafters import available
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.server.errors import ApiError, from_status, invalid
from leapdecode.server.metrics import CONTENT_TYPE
from leapdecode.server.responses import DONE, Formatter, sse
from leapdecode.server.scheduler import Event, Job, Scheduler
from leapdecode.server.schemas import GenerationRequest, parse_request

log = logging.getLogger("leapdecode.server")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServerConfig:
    drafter: str = "auto"  # the drafter of requests that do not choose one
    max_draft: int = 64
    max_concurrency: int = 4  # requests generating at once (interleaved step by step)
    max_queue: int = 64  # requests waiting for a slot; more get 429
    api_key: str | None = None
    model_name: str | None = None  # the name clients use (default: the model file's name)
    max_body_bytes: int = 4 * 1024 * 1024
    # max_tokens of requests that give none (None: up to the end of the context). Each request preallocates
    # a KV cache for prompt + max_tokens, so an uncapped default costs the whole context's memory per slot.
    default_max_tokens: int | None = 2048

    def __post_init__(self):
        if self.drafter not in available():
            raise LeapError(f"unknown drafter {self.drafter!r}; expected one of: {', '.join(available())}")
        checks = {
            "max_draft": (self.max_draft, 0, 512),
            "max_concurrency": (self.max_concurrency, 1, 4096),
            "max_queue": (self.max_queue, 0, 1_000_000),
            "max_body_bytes": (self.max_body_bytes, 1024, 2**31),
            "default_max_tokens": (
                1 if self.default_max_tokens is None else self.default_max_tokens,
                1,
                2**31,
            ),
        }
        for name, (value, lo, hi) in checks.items():
            if not isinstance(value, int) or not lo <= value <= hi:
                raise LeapError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise LeapError("the API key must not be empty")
        if self.model_name is not None and not self.model_name.strip():
            raise LeapError("the served model name must not be empty")


class ServerState:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.scheduler = Scheduler(engine, config.max_concurrency, config.max_queue)
        self.model_name = config.model_name or engine.name
        self.model_names = {self.model_name, engine.name}
        self.created = int(time.time())


def _state(request: Request) -> ServerState:
    return request.app.state.leap


# ------------------------------------------------------------------ request checks


def _authorize(request: Request) -> None:
    key = _state(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(
            413 if length.isdigit() else 400,
            f"the request body must be at most {limit} bytes",
            code="request_too_large" if length.isdigit() else "invalid_content_length",
        )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, f"the request body must be at most {limit} bytes", code="request_too_large"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(499, "the client closed the request", code="client_closed_request") from None
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request) -> object:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            f"Content-Type must be application/json, got {media_type or 'none'!r}",
            code="unsupported_media_type",
        )
    body = await _read_body(request, _state(request).config.max_body_bytes)
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


def _encode(engine: Engine, req: GenerationRequest) -> list[int]:
    try:
        return engine.encode_prompt(req.prompt, raw=req.raw)
    except LeapError as exc:
        raise invalid(str(exc), "messages" if req.kind == "chat" else "prompt") from None


def _generation_config(state: ServerState, req: GenerationRequest, n_prompt: int) -> GenerationConfig:
    context = state.engine.model.cfg.max_seq_len
    room = context - n_prompt
    if req.max_tokens is not None and req.max_tokens > room:
        raise invalid(
            f"this model's context holds {context} tokens: the prompt has {n_prompt}, so max_tokens "
            f"can be at most {room}, got {req.max_tokens}",
            "max_tokens",
            code="context_length_exceeded",
        )
    try:
        default = min(room, state.config.default_max_tokens or room)
        return GenerationConfig(
            max_new_tokens=req.max_tokens or default,
            sampling=req.sampling,
            stop=req.stop,
            drafter=req.drafter or state.config.drafter,
            max_draft=state.config.max_draft if req.max_draft is None else req.max_draft,
        )
    except LeapError as exc:
        raise invalid(str(exc)) from None


# ------------------------------------------------------------------ waiting for the worker


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (the request body has been read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, watcher: asyncio.Future) -> Event | None:
    """The job's next event, or None if the client disconnected first."""
    getter = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


class EventStream:
    """A server-sent-events response fed by a job; when it ends for any reason (done, client gone, server
    stopping) the job is cancelled, which frees its slot if it still held one."""

    def __init__(self, job: Job, scheduler: Scheduler, events):
        self.job, self.scheduler, self.events = job, scheduler, events

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_disconnected(receive))
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.events(watcher):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were writing
            pass
        finally:
            watcher.cancel()
            self.scheduler.cancel(self.job)


def _sse_events(job: Job, fmt: Formatter, req: GenerationRequest):
    async def events(watcher):
        if fmt.kind == "chat":
            yield sse(fmt.chunk("", role=True, with_usage=req.include_usage))
        while (event := await _next_event(job, watcher)) is not None:
            if event.kind == "piece":
                yield sse(fmt.chunk(event.text, with_usage=req.include_usage))
                continue
            if event.kind == "done":
                for chunk in fmt.final_chunks(event.result, job.queue_s, req.include_usage):
                    yield sse(chunk)
            else:
                yield sse(event.error.to_dict())
            yield DONE
            return

    return events


async def _complete(request: Request, job: Job, fmt: Formatter) -> Response:
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        while (event := await _next_event(job, watcher)) is not None:
            if event.kind == "error":
                raise event.error
            if event.kind == "done":
                return JSONResponse(fmt.completion(event.result, job.queue_s))
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    finally:
        watcher.cancel()
        _state(request).scheduler.cancel(job)


# ------------------------------------------------------------------ routes


async def _generate(request: Request, kind: str):
    state = _state(request)
    _authorize(request)
    req = parse_request(kind, await _read_json(request))
    if req.model not in state.model_names:
        raise ApiError(
            404,
            f"the model {req.model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )
    prompt_ids = await run_in_threadpool(_encode, state.engine, req)
    job = Job(prompt_ids, _generation_config(state, req, len(prompt_ids)), stream=req.stream)
    fmt = Formatter(kind, state.model_name, job.id)
    state.scheduler.submit(job)
    if req.stream:
        return EventStream(job, state.scheduler, _sse_events(job, fmt, req))
    return await _complete(request, job, fmt)


async def chat_completions(request: Request):
    return await _generate(request, "chat")


async def completions(request: Request):
    return await _generate(request, "completion")


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "leapdecode",
        "max_model_len": state.engine.model.cfg.max_seq_len,
    }


async def list_models(request: Request):
    _authorize(request)
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request):
    _authorize(request)
    state = _state(request)
    if request.path_params["model"] not in state.model_names:
        raise ApiError(
            404,
            f"the model {request.path_params['model']!r} does not exist",
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_card(state))


async def health(request: Request):
    if not _state(request).scheduler.healthy:
        raise ApiError(503, "the generation worker is not running", code="unhealthy")
    return JSONResponse({"status": "ok"})


async def metrics(request: Request):
    return Response(_state(request).scheduler.metrics.render(), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------ errors, request counting, the app


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return from_status(exc.status_code, dict(exc.headers or {})).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
    return ApiError(500, "internal server error", code="internal").response()


class CountRequests:
    """ASGI middleware: counts responses by route (unknown paths share one label) and status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.state.scheduler.metrics.requests.inc(route=route, status=str(status[0]))


def build_app(engine: Engine, config: ServerConfig | None = None) -> Starlette:
    """The ASGI app serving `engine`. Its lifespan starts the generation worker and stops it on shutdown."""
    state = ServerState(engine, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.scheduler.shutdown)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        lifespan=lifespan,
        middleware=[Middleware(CountRequests, state=state)],
    )
    app.state.leap = state
    return app
