"""`leap serve --replicas N`: N engine replicas on Ray Serve behind one OpenAI-compatible endpoint.

Design. The HTTP front is the single-process server's own app (`leapdecode.server.app`: the same
routes, streaming, errors, limits, host check, API key and connection guards) in the `leap serve`
process; only its scheduler is replaced, by a `ReplicaRouter` (`leapdecode.server.ray_router`). The
front holds the tokenizer and the model's config, never its weights: it tokenizes and checks each
request as before, then the router sends the prompt ids to one replica and relays the replica's events
(text pieces, the result, or an error) into the request's queue, where the app's streaming and
non-streaming responses read them as they read the local worker's.

Each replica is one Ray Serve deployment of one replica (`leapdecode.server.ray_replica.EngineReplica`:
a process with an `Engine` and the local server's scheduler, prefix cache and drafter pool), named
``leap-replica-i``. One deployment per replica, rather than one deployment of N, gives the front an
address for each replica: prefix affinity (`leapdecode.server.ray_routing`) needs to send a
conversation back to the replica holding its prefix cache and drafter state, and the router's
decisions stay in this process, visible in /metrics (Serve's pluggable request router would choose
inside the handle, out of sight, through an alpha API; `ray.serve.llm`'s PrefixCacheAffinityRouter
is built for its own LLM engines). Serve still does what it is good at: it places
each replica on a node with `--replica-cpus` free CPUs, restarts a replica whose process dies or whose
health check fails, and streams a call's results back (`handle.options(stream=True)`).

A replica that dies fails its in-flight streams with an error event (``replica_failed``, then
``[DONE]``; a non-streamed request gets the 503), never a hang; new requests go to live replicas until
Serve has restarted it. The cluster is a local one started here (`ray.init` with N x `--replica-cpus`
CPUs, no dashboard, no usage reporting, warnings only; Ray binds its own ports to the machine's address,
not loopback, and requires its cluster token on them), or an existing one with
`--ray-address` (every node needs leapdecode and the model file at the same path). One `leap serve` per
cluster: the apps' names are fixed, and a second server would replace the first one's replicas.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Self, cast

import ray
from ray import serve

from leapdecode.engine import Engine
from leapdecode.errors import LeapError
from leapdecode.model.runner import Runner
from leapdecode.model.source import open_source
from leapdecode.server.app import ServerConfig, build_app
from leapdecode.server.ray_replica import EngineReplica, ReplicaSpec
from leapdecode.server.ray_router import Replica, ReplicaRouter
from leapdecode.server.ray_routing import index_capacity

log = logging.getLogger("leapdecode.server")
APP_PREFIX = "leap-replica-"
MAX_REPLICAS = 4096
DEPLOY_TIMEOUT_S = 600.0
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve's logs: warnings, no line per call


@dataclass(frozen=True)
class RayOptions:
    """How many replicas, each with how many CPUs, on which cluster (None: a local one started here)."""

    replicas: int = 2
    replica_cpus: int = 1
    address: str | None = None

    def __post_init__(self):
        for name, value in (("replicas", self.replicas), ("replica_cpus", self.replica_cpus)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPLICAS:
                raise LeapError(f"{name} must be an integer in [1, {MAX_REPLICAS}], got {value!r}")
        if self.address is not None and not self.address.strip():
            raise LeapError("--ray-address must not be empty (auto, or HOST:PORT of the head node)")


class _ConfigOnly:
    """The front's stand-in for a runner: the model's config, no weights (the replicas hold those)."""

    backend = "none"

    def __init__(self, cfg):
        self.cfg = cfg


def front_engine(model: str | None, drafter_options: dict | None = None) -> Engine:
    """An engine that tokenizes and knows the model's config, without loading its weights."""
    source, tokenizer, path = open_source(model)
    runner = cast(Runner, _ConfigOnly(source.cfg))
    return Engine(runner, tokenizer, name=path.name, drafter_options=drafter_options)


def connect(options: RayOptions) -> bool:
    """Join the cluster (or start a local one) and start Serve without its HTTP proxy; True when this
    process started the cluster (and so stops it at the end)."""
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local server reports to nobody
        common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if options.address is None:
            cpus = options.replicas * options.replica_cpus
            ray.init(num_cpus=cpus, include_dashboard=False, **common)
            started = True
        else:
            try:
                ray.init(address=options.address, **common)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise LeapError(f"--ray-address {options.address}: cannot join the cluster: {exc}") from None
    for name in ("ray.serve", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    serve.start(proxy_location="Disabled", logging_config=QUIET)
    return started


def app_name(index: int) -> str:
    return f"{APP_PREFIX}{index}"


def deploy(spec: ReplicaSpec, replicas: int, timeout: float = DEPLOY_TIMEOUT_S) -> list[Replica]:
    """Deploy the replicas (in parallel) and wait until each answers; a replica that cannot start (its
    constructor fails, or no node has its CPUs) is an error naming the cause."""
    capacity = spec.config.max_concurrency + spec.config.max_queue
    deployment = cast(Any, EngineReplica).options(  # a Deployment, which mypy sees as the class
        ray_actor_options={"num_cpus": spec.cpus},
        max_ongoing_requests=capacity + 4,  # room for the router's probes beside a full queue
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
        max_constructor_retry_count=2,
        logging_config=QUIET,
    )
    for i in range(replicas):
        serve._run(deployment.bind(spec), name=app_name(i), route_prefix=None, _blocking=False)
    _wait_running([app_name(i) for i in range(replicas)], timeout)
    out = [Replica(i, serve.get_app_handle(app_name(i))) for i in range(replicas)]
    for rep in out:
        rep.incarnation = rep.handle.stats.remote().result(timeout_s=timeout)["incarnation"]
    return out


def _wait_running(names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        apps = serve.status().applications
        states = {n: apps[n] for n in names if n in apps}
        failed = [(n, s.message) for n, s in states.items() if str(s.status).endswith("DEPLOY_FAILED")]
        if failed:
            raise LeapError(f"engine replica {failed[0][0]} could not start: {failed[0][1]}")
        if len(states) == len(names) and all(str(s.status).endswith("RUNNING") for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise LeapError(f"the engine replicas did not start within {timeout:g} s (enough free CPUs?)")
        time.sleep(0.2)


def teardown(replicas: int, started: bool) -> None:
    """Stop the cluster if this process started it (the front has drained the replicas' requests);
    else delete the replicas' apps from the cluster and leave it."""
    try:
        if not started:
            for i in range(replicas):
                serve.delete(app_name(i))
    finally:
        ray.shutdown()


@dataclass
class ReplicaServer:
    """The replicas and the router in front of them: `build_app(front, config, scheduler=router)`.

    >>> with ReplicaServer(RayOptions(replicas=2), ReplicaSpec(config=config)) as rs:
    ...     app = rs.app()
    """

    options: RayOptions
    spec: ReplicaSpec = field(default_factory=ReplicaSpec)
    replicas: list[Replica] = field(default_factory=list)
    started: bool = False

    def __enter__(self) -> Self:
        self.started = connect(self.options)
        try:
            self.replicas = deploy(self.spec, self.options.replicas)
        except BaseException:
            teardown(self.options.replicas, self.started)
            raise
        return self

    def router(self, front: Engine, **kwargs) -> ReplicaRouter:
        """A router over the replicas (kwargs: `ReplicaRouter`'s), its prefix indexes sized like the
        replicas' prefix caches (float32 keys and values of `front`'s model)."""
        config, cfg = self.spec.config, front.model.cfg
        keys = index_capacity(config.prefix_cache_mb, 2 * 4 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim)
        for rep in self.replicas:
            rep.prefixes.capacity = keys
        slots = config.max_concurrency
        return ReplicaRouter(self.replicas, slots, slots + config.max_queue, **kwargs)

    def app(self, front: Engine | None = None, **router_kwargs):
        """The HTTP app over the replicas (`front`: default, an engine without weights)."""
        if front is None:
            front = front_engine(self.spec.load_args.get("model"), self.spec.load_args.get("drafter_options"))
        return build_app(front, self.spec.config, scheduler=self.router(front, **router_kwargs))

    def __exit__(self, *exc) -> None:
        teardown(self.options.replicas, self.started)


def load_args(args) -> dict:
    """`Engine.load`'s keyword arguments from `leap serve`'s model options (threads: per replica)."""
    options = {"draft-model": {"path": args.draft_model}} if args.draft_model else {}
    if args.threads is not None:
        raise LeapError("with --replicas, each replica's threads are its --replica-cpus; drop --threads")
    if args.drafter == "draft-model" and not args.draft_model:
        raise LeapError("--drafter draft-model needs --draft-model PATH")
    return {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "drafter_options": options,
        "backend": args.backend,
        "quant": args.quant,
        "activations": args.activations,
        "kv_cache": args.kv_cache,
    }


def run(args, config: ServerConfig, sock) -> int:
    """`leap serve --replicas N` in the foreground until SIGTERM or SIGINT."""
    from leapdecode.server import runner

    options = RayOptions(args.replicas, args.replica_cpus or 1, args.ray_address)
    spec = ReplicaSpec(load_args(args), config, options.replica_cpus)
    front = front_engine(args.model, spec.load_args["drafter_options"])  # a bad model path fails here
    print(f"leap serve: starting {options.replicas} engine replicas", file=sys.stderr, flush=True)
    with ReplicaServer(options, spec) as rs:
        app = rs.app(front)
        host, port = sock.getsockname()[:2]
        print(
            f"leap serve: {app.state.leap.model_name} on http://{host}:{port} ({options.replicas} replicas "
            f"x {options.replica_cpus} CPUs, drafter {config.drafter}, {config.max_concurrency} slots and "
            f"queue {config.max_queue} per replica)",
            file=sys.stderr,
            flush=True,
        )
        server = runner.make_server(app, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout)
        runner.serve(server, sock)
    return 0
