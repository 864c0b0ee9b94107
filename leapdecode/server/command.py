"""`leap serve`: the OpenAI-compatible HTTP server (see `leapdecode.server`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from leapdecode.commands.common import add_model_arguments, add_prefix_cache_argument, load_engine
from leapdecode.errors import LeapError
from leapdecode.server.batching import DEFAULT_CHUNK


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    return parse


_non_negative_int, _positive_int = _int_at_least(0), _int_at_least(1)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected a number of seconds in (0, 3600], got {text}")
    return value


def _host_list(text: str) -> list[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=_non_negative_int, default=8000, help="TCP port (default: 8000)")
    g.add_argument(
        "--drafter", default="auto", help="drafter of requests that do not choose one (default: auto)"
    )
    g.add_argument(
        "--max-draft", type=_non_negative_int, default=64, help="most draft tokens verified per step"
    )
    g.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=8,
        help="requests generating at once, their steps batched into one forward (default: 8)",
    )
    g.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=64,
        help="requests waiting for a slot; beyond that the server answers 429 (default: 64)",
    )
    g.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/ routes and /metrics; prefer $LEAP_API_KEY or "
        "--api-key-file: a command line is visible to every local user (default: $LEAP_API_KEY, else none)",
    )
    g.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    g.add_argument(
        "--metrics-public",
        action="store_true",
        help="with an API key, serve /metrics without it too (default: /metrics needs the key)",
    )
    g.add_argument(
        "--allowed-hosts",
        type=_host_list,
        action="extend",
        default=[],
        help="host names accepted in the Host header besides loopback's and --host's, comma-separated "
        "or repeated; * accepts any (default: none)",
    )
    g.add_argument("--served-model-name", default=None, help="model id clients use (default: the file name)")
    g.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=4 * 1024 * 1024,
        help="largest request body accepted (default: 4 MiB)",
    )
    g.add_argument(
        "--max-messages",
        type=_positive_int,
        default=2048,
        help="most messages in a chat request (default: 2048)",
    )
    g.add_argument(
        "--header-timeout",
        type=_seconds,
        default=10.0,
        help="seconds a client may take to send a request's headers; then 408 (default: 10)",
    )
    g.add_argument(
        "--body-timeout",
        type=_seconds,
        default=30.0,
        help="seconds a client may take to send a request's body; then 408 (default: 30)",
    )
    g.add_argument(
        "--max-connections",
        type=_positive_int,
        default=256,
        help="open connections at most; one more is answered 503 and closed (default: 256)",
    )
    g.add_argument(
        "--default-max-tokens",
        type=_non_negative_int,
        default=2048,
        help="max_tokens of requests that give none (default: 2048; 0: up to the end of the context; "
        "each request preallocates its KV cache for prompt + max_tokens)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds active generations may take to finish; then each ends with a 503 error "
        "event (streams: then data: [DONE]) (default: 30)",
    )
    add_prefix_cache_argument(g)
    g.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the active requests' forwards as one batched forward per step, long prompts in chunks "
        "(default); --no-batch: one request's step after another",
    )
    g.add_argument(
        "--prefill-chunk",
        type=_positive_int,
        default=DEFAULT_CHUNK,
        help=f"with --batch, prompt tokens prefilled per step (default: {DEFAULT_CHUNK})",
    )
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("replicas (Ray Serve; pip install 'leapdecode[serve]')")
    r.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        help="engine replicas behind this endpoint, each a process of its own on Ray Serve; a conversation "
        "stays on the replica holding its prefix (default: 1: this process alone, without Ray)",
    )
    r.add_argument(
        "--replica-cpus",
        type=_positive_int,
        default=None,
        help="CPUs (kernel threads) of each replica (default: 1)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (auto: the one `ray start` runs here) instead of starting a local one",
    )
    add_model_arguments(p)


def api_key(args) -> str | None:
    """The key from --api-key (with a warning: other local users can read it), --api-key-file or
    $LEAP_API_KEY, in that order."""
    if args.api_key is not None and args.api_key_file is not None:
        raise LeapError("give the API key once: --api-key or --api-key-file")
    if args.api_key is not None:
        print(
            "leap serve: warning: --api-key is visible to every local user (ps, /proc); "
            "set LEAP_API_KEY or use --api-key-file instead",
            file=sys.stderr,
            flush=True,
        )
        return args.api_key
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LeapError(f"--api-key-file: cannot read {args.api_key_file}: {exc}") from None
        if not lines or not lines[0].strip():
            raise LeapError(f"--api-key-file: {args.api_key_file} holds no key on its first line")
        return lines[0].strip()
    return os.environ.get("LEAP_API_KEY") or None


def _bound_name(host: str) -> tuple[str, ...]:
    """The address the server listens on answers to its own name too (not a wildcard address)."""
    return () if host in ("", "0.0.0.0", "::") else (host,)


def run(args) -> int:
    try:  # the HTTP stack is imported here so that the other subcommands never need it
        from leapdecode.server.app import ServerConfig, build_app
        from leapdecode.server.runner import bind, make_server, serve
    except ModuleNotFoundError as exc:
        raise LeapError(f"leap serve needs the package {exc.name!r}: pip install starlette uvicorn") from None
    config = ServerConfig(
        drafter=args.drafter,
        max_draft=args.max_draft,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        api_key=api_key(args),
        model_name=args.served_model_name,
        max_body_bytes=args.max_body_bytes,
        default_max_tokens=args.default_max_tokens or None,
        max_messages=args.max_messages,
        allowed_hosts=tuple(args.allowed_hosts) + _bound_name(args.host),
        metrics_public=args.metrics_public,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        prefix_cache_mb=args.prefix_cache_mb,
        batching=args.batch,
        prefill_chunk=args.prefill_chunk,
    )  # validated before the model loads
    if args.replicas > 1:
        return _run_replicas(args, config)
    if args.replica_cpus is not None or args.ray_address is not None:
        raise LeapError("--replica-cpus and --ray-address need --replicas 2 or more")
    sock = bind(args.host, args.port)
    engine = load_engine(args)
    app = build_app(engine, config)
    host, port = sock.getsockname()[:2]
    print(
        f"leap serve: {app.state.leap.model_name} on http://{host}:{port} (drafter {config.drafter}, "
        f"{config.max_concurrency} slots, queue {config.max_queue})",
        file=sys.stderr,
        flush=True,
    )
    serve(make_server(app, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout), sock)
    return 0


def _run_replicas(args, config) -> int:
    try:  # Ray is an optional extra
        from leapdecode.server import ray_app
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        raise LeapError("leap serve --replicas needs Ray Serve: pip install 'leapdecode[serve]'") from None
    from leapdecode.server.runner import bind

    return ray_app.run(args, config, bind(args.host, args.port))
