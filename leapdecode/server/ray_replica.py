"""One engine replica of `leap serve --replicas N`: a Ray Serve deployment whose process holds an
`Engine` and the single-process server's own scheduler (`leapdecode.server.scheduler`), so a replica
admits, interleaves or batches, caches prefixes and pools drafters exactly as `leap serve` does.

The front (`leapdecode.server.ray_app`) has tokenized and checked the request; `generate` takes the
prompt ids and the `GenerationConfig` and streams the job's events back in batches (every event that is
ready when the previous batch has gone, so a slow link sends fewer, larger messages). Events cross
processes as plain tuples: ``("piece", text)``, ``("done", Result, queue_s)``, ``("error", fields)``
(an `ApiError`'s constructor arguments: exceptions with keyword arguments do not pickle).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ray import serve

from leapdecode.engine import Engine, GenerationConfig
from leapdecode.server.app import ServerConfig, ServerState
from leapdecode.server.errors import ApiError
from leapdecode.server.scheduler import Event, Job

WireEvent = tuple


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica loads and how it serves: `Engine.load`'s keyword arguments, the server's
    config, and its CPUs (its kernels' threads)."""

    load_args: dict = field(default_factory=dict)
    config: ServerConfig = field(default_factory=ServerConfig)
    cpus: int = 1


def error_fields(error: ApiError) -> dict:
    return {
        "status": error.status,
        "message": error.message,
        "param": error.param,
        "code": error.code,
        "type": error.type,
        "headers": error.headers,
    }


def error_from(fields: dict) -> ApiError:
    fields = dict(fields)
    return ApiError(fields.pop("status"), fields.pop("message"), **fields)


def _wire(event: Event, job: Job) -> WireEvent:
    if event.kind == "piece":
        return ("piece", event.text)
    if event.kind == "done":
        return ("done", event.result, job.queue_s)
    assert event.error is not None
    return ("error", error_fields(event.error))


@serve.deployment
class EngineReplica:
    def __init__(self, spec: ReplicaSpec):
        engine = Engine.load(threads=spec.cpus, **spec.load_args)
        self.state = ServerState(engine, spec.config)  # the single-process server's scheduler and cache
        self.scheduler = self.state.scheduler
        self.scheduler.start()
        self.incarnation = uuid.uuid4().hex  # changes when Serve restarts the replica

    async def generate(
        self, prompt_ids: list[int], config: GenerationConfig, stream: bool
    ) -> AsyncIterator[list[WireEvent]]:
        """The job's events, in batches, until its result or error. Cancelling the call (the client
        went away, the front shuts down) cancels the job."""
        job = Job(prompt_ids, config, stream=stream)
        try:
            self.scheduler.submit(job)
        except ApiError as exc:
            yield [("error", error_fields(exc))]
            return
        try:
            while True:
                events = [await job.events.get()]
                while not job.events.empty():
                    events.append(job.events.get_nowait())
                yield [_wire(e, job) for e in events]
                if events[-1].kind != "piece":
                    return
        finally:
            self.scheduler.cancel(job)

    def stats(self) -> dict:
        """Who answers (a restarted replica has a new incarnation) and its metrics' exposition text."""
        return {
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "metrics": self.scheduler.metrics.render(),
        }

    def check_health(self) -> None:
        """Serve's health check: a replica whose generation worker has stopped is replaced."""
        if not self.scheduler.healthy:
            raise RuntimeError("the generation worker is not running")

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.shutdown(timeout=5.0)
