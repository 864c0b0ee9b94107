"""The front's side of `leap serve --replicas N` (see `leapdecode.server.ray_app`): `ReplicaRouter` stands
where the single-process server's `Scheduler` stands (`submit`, `cancel`, `metrics`, `healthy`, `busy`
and the shutdown steps), but sends each job to an engine replica and relays its events back.

- `submit` picks the replica (`leapdecode.server.ray_routing.choose`) and starts a relay task that
  streams the replica's events into the job's queue, as the worker thread does locally.
- A replica that dies fails its in-flight calls with Ray's actor error: each such job ends with a 503
  error event (``replica_failed``; streams then ``[DONE]``) and the replica is marked down, so new
  requests go to the others. A monitor asks every replica for its stats each `probe_interval`
  seconds; an answer from a new incarnation (Serve restarted it) counts a restart, empties that
  replica's prefix index and marks it up; `probe_failures` unanswered probes in a row mark it down and
  end the requests still waiting on it.
- /metrics: the front's own series (HTTP requests, router decisions, per-replica requests, failures,
  restarts, liveness, in-flight counts) and every replica's series from its last stats, each sample
  labelled ``replica="i"`` (`sum by` them for the server's totals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from ray.exceptions import ActorDiedError, RayActorError

from leapdecode.server.errors import ApiError
from leapdecode.server.metrics import Counter, Gauge, Registry
from leapdecode.server.ray_replica import error_from
from leapdecode.server.ray_routing import DECISIONS, ReplicaSlot, block_keys, choose
from leapdecode.server.scheduler import Event, Job

log = logging.getLogger("leapdecode.server")


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="shutting_down")


def _replica_failed(index: int) -> ApiError:
    return ApiError(
        503,
        f"engine replica {index} stopped while generating this response (it is being restarted); retry",
        code="replica_failed",
    )


class Replica(ReplicaSlot):
    """A replica's Serve handle and what the router knows of it."""

    def __init__(self, index: int, handle: Any, index_capacity: int = 1 << 16):
        super().__init__(index, index_capacity)
        self.handle = handle
        self.incarnation: str | None = None
        self.dead: str | None = None  # the incarnation whose death was seen (its late answers are ignored)
        self.failures = 0  # probes unanswered in a row
        self.metrics_text = ""  # the replica's last exposition text


class RouterMetrics:
    """The front's series, and the replicas' series merged in when rendered."""

    def __init__(self, replicas: Sequence[Replica]):
        self.replicas = replicas
        r = self.registry = Registry()
        self.requests = r.add(
            Counter, "leap_requests_total", "HTTP requests by route and status code", ("route", "status")
        )
        self.rejected = r.add(
            Counter, "leap_rejected_total", "Requests refused before generation", ("reason",)
        )
        self.decisions = r.add(
            Counter, "leap_router_decisions_total", "Where the router sent requests, and why", ("decision",)
        )
        for decision in DECISIONS:
            self.decisions.inc(0, decision=decision)
        self.routed = r.add(
            Counter, "leap_replica_requests_total", "Requests sent to a replica", ("replica",)
        )
        self.failed = r.add(
            Counter,
            "leap_replica_failed_requests_total",
            "Requests ended by their replica's failure",
            ("replica",),
        )
        self.restarts = r.add(Counter, "leap_replica_restarts_total", "Replica restarts seen", ("replica",))
        self.up = r.add(Gauge, "leap_replica_up", "1 while a replica answers, else 0", ("replica",))
        self.in_flight = r.add(Gauge, "leap_replica_in_flight", "Requests at a replica now", ("replica",))
        for rep in replicas:
            for counter in (self.routed, self.failed, self.restarts):
                counter.inc(0, replica=str(rep.index))
        r.add(Gauge, "leap_replicas", "Engine replicas behind this endpoint", fn=lambda: len(replicas))

    def render(self) -> str:
        for rep in self.replicas:
            self.up.set(int(rep.up), replica=str(rep.index))
            self.in_flight.set(rep.in_flight, replica=str(rep.index))
        families = _families(self.registry.render(), None)
        for rep in self.replicas:
            for name, (head, samples) in _families(rep.metrics_text, str(rep.index)).items():
                families.setdefault(name, (head, []))[1].extend(samples)
        return "".join("".join(head + samples) for head, samples in families.values() if samples)


def _families(text: str, replica: str | None) -> dict[str, tuple[list[str], list[str]]]:
    """Exposition text as {family: (HELP and TYPE lines, samples)}, samples labelled with `replica`."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            out.setdefault(name, ([], []))[0].append(line + "\n")
        elif line.startswith("#"):
            out.setdefault(name, ([], []))[0].append(line + "\n")
        elif line:
            out.setdefault(name, ([], []))[1].append(_labelled(line, replica) + "\n")
    return out


def _labelled(sample: str, replica: str | None) -> str:
    if replica is None:
        return sample
    series, _, value = sample.rpartition(" ")
    label = f'replica="{replica}"'
    series = series[:-1] + "," + label + "}" if series.endswith("}") else series + "{" + label + "}"
    return f"{series} {value}"


class ReplicaRouter:
    """Jobs to replicas and their events back (module docstring). Called from the event loop only,
    except `shutdown`, which the app's lifespan calls from a worker thread."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        slots: int,
        capacity: int,
        probe_interval: float = 1.0,
        probe_timeout: float = 10.0,
        probe_failures: int = 2,
        affinity: bool = True,
    ):
        self.replicas, self.slots, self.capacity = list(replicas), slots, capacity
        self.probe_interval, self.probe_timeout = probe_interval, probe_timeout
        self.probe_failures = probe_failures
        self.affinity = affinity  # False: every request to the least-loaded replica (for comparisons)
        self._relays: dict[Job, tuple[Replica, asyncio.Task]] = {}
        self._stopping = False
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task | None = None
        self.metrics = RouterMetrics(self.replicas)

    # ------------------------------------------------------------ the Scheduler interface

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._monitor = self._loop.create_task(self._watch())

    @property
    def healthy(self) -> bool:
        running = self._monitor is not None and not self._monitor.done()
        return running and not self._stopping and any(r.up for r in self.replicas)

    @property
    def busy(self) -> bool:
        return bool(self._relays)

    def submit(self, job: Job) -> None:
        """Send the job to a replica, or refuse it (429: every replica full; 503: none up or stopping)."""
        if self._stopping:
            raise _shutting_down()
        keys = block_keys(job.prompt_ids) if self.affinity else []
        try:
            replica, decision = choose(self.replicas, keys, self.slots, self.capacity, self._turn)
        except ApiError as exc:
            self.metrics.rejected.inc(reason=exc.code or "refused")
            raise
        self._turn += 1
        replica.prefixes.add(keys)
        replica.in_flight += 1
        self.metrics.decisions.inc(decision=decision)
        self.metrics.routed.inc(replica=str(replica.index))
        self._relays[job] = (replica, asyncio.get_running_loop().create_task(self._relay(job, replica)))

    def cancel(self, job: Job) -> None:
        """Stop relaying a job (its client went away); cancelling the call cancels it on the replica."""
        if job in self._relays:
            self._relays[job][1].cancel()

    def stop_admitting(self) -> None:
        self._stopping = True

    def abort_active(self) -> None:
        """End every relayed job with a 503 error event."""
        for job, (_replica, task) in list(self._relays.items()):
            job.cancel_error = job.cancel_error or _shutting_down()
            task.cancel()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                self._loop.call_soon_threadsafe(self._stop_tasks)

    def _stop_tasks(self) -> None:
        self.abort_active()
        if self._monitor is not None:
            self._monitor.cancel()

    # ------------------------------------------------------------ relaying a job's events

    async def _relay(self, job: Job, replica: Replica) -> None:
        call = replica.handle.options(stream=True).generate.remote(job.prompt_ids, job.config, job.stream)
        try:
            await self._forward(job, replica, call)
        except asyncio.CancelledError:
            call.cancel()
            if job.cancel_error is not None:
                job.events.put_nowait(Event("error", error=job.cancel_error))
        except RayActorError as exc:
            self.metrics.failed.inc(replica=str(replica.index))
            replica.up = False
            if isinstance(exc, ActorDiedError):
                replica.dead = replica.incarnation
            job.events.put_nowait(Event("error", error=_replica_failed(replica.index)))
        except Exception:  # a bug must cost one request, not the server
            log.exception("relaying generation %s from replica %d failed", job.id, replica.index)
            job.events.put_nowait(Event("error", error=ApiError(500, "internal error", code="internal")))
        finally:
            replica.in_flight -= 1
            self._relays.pop(job, None)

    async def _forward(self, job: Job, replica: Replica, call) -> None:
        async for batch in call:
            for kind, *payload in batch:
                if kind == "piece":
                    job.events.put_nowait(Event("piece", text=payload[0]))
                    continue
                if kind == "done":
                    result, queue_s = payload
                    job.started = job.arrived + queue_s
                    if self.affinity:  # the replica's prefix cache now holds the whole sequence
                        replica.prefixes.add(block_keys(result.prompt_ids + result.token_ids))
                    job.events.put_nowait(Event("done", result=result))
                else:
                    job.events.put_nowait(Event("error", error=error_from(payload[0])))
                return
        raise RuntimeError("the replica ended the stream without a result")

    # ------------------------------------------------------------ watching the replicas

    async def _watch(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(r) for r in self.replicas))
            await asyncio.sleep(self.probe_interval)

    async def _probe(self, replica: Replica) -> None:
        try:
            info = await asyncio.wait_for(replica.handle.stats.remote(), self.probe_timeout)
        except Exception:  # noqa: BLE001 (dead, restarting or stuck: all count as unanswered)
            replica.failures += 1
            if replica.failures >= self.probe_failures and replica.up:
                log.warning("engine replica %d does not answer; marked down", replica.index)
                replica.up = False
                self._end_relays_on(replica)
            return
        replica.failures = 0
        if info["incarnation"] == replica.dead:
            return  # an answer sent before it died
        if replica.incarnation is not None and info["incarnation"] != replica.incarnation:
            log.warning("engine replica %d was restarted", replica.index)
            self.metrics.restarts.inc(replica=str(replica.index))
            replica.prefixes.clear()  # its prefix cache and drafters started from empty
        replica.incarnation, replica.metrics_text, replica.up = info["incarnation"], info["metrics"], True

    def _end_relays_on(self, replica: Replica) -> None:
        """Requests still waiting on a replica that stopped answering end with an error event."""
        for job, (mine, task) in list(self._relays.items()):
            if mine is replica:
                self.metrics.failed.inc(replica=str(replica.index))
                job.cancel_error = job.cancel_error or _replica_failed(replica.index)
                task.cancel()
