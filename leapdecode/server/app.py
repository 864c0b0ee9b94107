"""The HTTP application: OpenAI routes over one `Engine`, built with Starlette.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}], GET /health,
GET /metrics. See `leapdecode.server` for the request extension (`leap`) and the response's `leap_stats`.
The bodies of POST routes must be JSON (`Content-Type: application/json`, UTF-8, at most
`max_body_bytes`, all of it within `body_timeout` seconds); with an API key set, /v1/ routes need
`Authorization: Bearer KEY`, and so does /metrics unless `metrics_public` (/health stays open for
probes). Every request must name an allowed host (`leapdecode.server.intake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from leapdecode.drafters import available, make_drafter
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.prefix_cache import DEFAULT_MB, MAX_MB, PrefixCache
from leapdecode.server.batching import DEFAULT_CHUNK
from leapdecode.server.errors import ApiError, from_status, invalid
from leapdecode.server.intake import LOOPBACK_HOSTS, CheckHost, authorize, host_name, read_json
from leapdecode.server.metrics import CONTENT_TYPE
from leapdecode.server.responses import DONE, Formatter, sse
from leapdecode.server.scheduler import Event, Job, Scheduler
from leapdecode.server.schemas import GenerationRequest, Limits, parse_request

log = logging.getLogger("leapdecode.server")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServerConfig:
    drafter: str = "auto"  # the drafter of requests that do not choose one
    max_draft: int = 64
    max_concurrency: int = 8  # requests generating at once (batched, else interleaved step by step)
    max_queue: int = 64  # requests waiting for a slot; more get 429
    api_key: str | None = None
    model_name: str | None = None  # the name clients use (default: the model file's name)
    max_body_bytes: int = 4 * 1024 * 1024
    # max_tokens of requests that give none (None: up to the end of the context). Each request preallocates
    # a KV cache for prompt + max_tokens, so an uncapped default costs the whole context's memory per slot.
    default_max_tokens: int | None = 2048
    max_messages: int = 2048  # messages of a chat request (and text parts of one message)
    # host names requests may carry in their Host header besides loopback's ("*": any)
    allowed_hosts: tuple[str, ...] = ()
    metrics_public: bool = False  # with an API key: /metrics without the key too
    header_timeout: float = 10.0  # seconds a client may take to send a request's headers
    body_timeout: float = 30.0  # seconds a client may take to send a request's body
    max_connections: int = 256  # open connections; more are answered 503 and closed
    # MiB of keys and values kept to reuse prompt prefixes across requests (0: no prefix cache)
    prefix_cache_mb: int = DEFAULT_MB
    # the active requests' forwards batched into one per round (leapdecode.server.batching); False: one
    # request's step after another (measured: the same speed for one stream, 0.67x the throughput of 4)
    batching: bool = True
    prefill_chunk: int = DEFAULT_CHUNK  # with batching: prompt rows per round (a long prompt's share)

    def __post_init__(self):
        if self.drafter not in available():
            raise LeapError(f"unknown drafter {self.drafter!r}; expected one of: {', '.join(available())}")
        checks = {
            "max_draft": (self.max_draft, 0, 512),
            "max_concurrency": (self.max_concurrency, 1, 4096),
            "max_queue": (self.max_queue, 0, 1_000_000),
            "max_body_bytes": (self.max_body_bytes, 1024, 2**31),
            "max_messages": (self.max_messages, 1, 1_000_000),
            "max_connections": (self.max_connections, 1, 1_000_000),
            "prefix_cache_mb": (self.prefix_cache_mb, 0, MAX_MB),
            "prefill_chunk": (self.prefill_chunk, 1, 1 << 20),
            "default_max_tokens": (
                1 if self.default_max_tokens is None else self.default_max_tokens,
                1,
                2**31,
            ),
        }
        for name, (value, lo, hi) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise LeapError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise LeapError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        for name in self.allowed_hosts:
            if not isinstance(name, str) or not name.strip() or "/" in name:
                raise LeapError(f"allowed host names must be host names (or *), got {name!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise LeapError("the API key must not be empty")
        if self.model_name is not None and not self.model_name.strip():
            raise LeapError("the served model name must not be empty")


class ServerState:
    def __init__(self, engine: Engine, config: ServerConfig, scheduler: Any = None):
        """`scheduler`: None, a `Scheduler` of the engine; else an object with its interface (the
        replica router of `leap serve --replicas`, `leapdecode.server.ray_router`)."""
        self.engine, self.config = engine, config
        engine.prefix_cache = PrefixCache.from_mb(config.prefix_cache_mb)  # this server's, from empty
        if scheduler is None:
            scheduler = Scheduler(
                engine,
                config.max_concurrency,
                config.max_queue,
                prefill_chunk=config.prefill_chunk if config.batching else None,
            )
        self.scheduler = scheduler
        self.model_name = config.model_name or engine.name
        self.model_names = {self.model_name, engine.name}
        self.created = int(time.time())
        context = engine.model.cfg.max_seq_len
        self.limits = Limits(
            max_messages=config.max_messages,
            max_prompt_tokens=context - 1,
            max_prompt_chars=context * engine.tokenizer.max_token_chars,
            context=context,
        )
        self.allowed_hosts = frozenset(LOOPBACK_HOSTS) | {host_name(h) for h in config.allowed_hosts}
        self.unavailable = _unavailable_drafters(engine)
        if config.drafter in self.unavailable:
            raise LeapError(f"--drafter {config.drafter}: {self.unavailable[config.drafter]}")


def _unavailable_drafters(engine: Engine) -> dict[str, str]:
    """Drafters this server cannot build (e.g. draft-model without a draft model), with the reason: a
    request naming one is refused before its response starts."""
    out = {}
    for name in available():
        try:
            make_drafter(name, **engine.drafter_options.get(name, {}))
        except LeapError as exc:
            out[name] = str(exc)
    return out


def _state(request: Request) -> ServerState:
    return request.app.state.leap


# ------------------------------------------------------------------ request checks


def _check_drafter(state: ServerState, req: GenerationRequest) -> None:
    name = req.drafter or state.config.drafter
    if name in state.unavailable:
        raise invalid(
            f"the drafter {name!r} is not available on this server: {state.unavailable[name]}",
            "leap.drafter",
            code="drafter_unavailable",
        )


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
            if event.error is not None:
                raise event.error
            if event.result is not None:
                return JSONResponse(fmt.completion(event.result, job.queue_s))
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    finally:
        watcher.cancel()
        _state(request).scheduler.cancel(job)


# ------------------------------------------------------------------ routes


async def _generate(request: Request, kind: str):
    state = _state(request)
    config = state.config
    authorize(request, config.api_key)
    body = await read_json(request, config.max_body_bytes, config.body_timeout)
    req = parse_request(kind, body, state.limits)
    if req.model not in state.model_names:
        raise ApiError(
            404,
            f"the model {req.model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )
    _check_drafter(state, req)
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
    authorize(request, _state(request).config.api_key)
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request):
    state = _state(request)
    authorize(request, state.config.api_key)
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
    config = _state(request).config
    if not config.metrics_public:
        authorize(request, config.api_key)
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


def build_app(engine: Engine, config: ServerConfig | None = None, scheduler: Any = None) -> Starlette:
    """The ASGI app serving `engine`. Its lifespan starts the generation worker and stops it on shutdown.
    `scheduler`: see `ServerState`."""
    state = ServerState(engine, config or ServerConfig(), scheduler)

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
    handlers: dict[Any, Any] = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        lifespan=lifespan,
        middleware=[
            Middleware(CountRequests, state=state),
            Middleware(CheckHost, allowed=state.allowed_hosts),
        ],
    )
    app.state.leap = state
    return app
