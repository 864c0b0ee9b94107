"""The request queue and the generation worker.

Design: ONE worker thread runs every generation, interleaving them step by step (round-robin over the
active generations; each `next()` of a `Generation` is one decoding step's text, the first one includes
the prefill). On a CPU with few cores a single thread driving torch (which parallelises inside its ops)
uses the machine as well as several would, and it keeps the engine and every drafter single-threaded: no
locks around the model, no two threads contending for the same cores.

- Admission is FIFO. At most `max_concurrency` requests are active (hold a slot); up to `max_queue` more
  wait; past that `submit` refuses at once with 429. A finished slot goes to the oldest waiting request.
- Drafters: a request needs a drafter instance of its own (per-request state lives on the instance), but
  state that helps across requests (a suffix tree, a token-recycling matrix) must outlive the request. A
  `DrafterPool` keeps, per drafter name, the instances not in use; a request takes the most recently
  returned one and gives it back when it ends. So with requests one at a time a single instance learns
  from all of them, and with k concurrent requests of one drafter there are at most k instances (at most
  `max_concurrency`), each keeping what it learned for the next request that takes it.
- Batching (`prefill_chunk`, `leap serve`'s default): the worker becomes the conductor of
  `leapdecode.server.batching`: each active request runs in a lane (a thread that runs only while the
  worker hands it the baton, so still one thread at a time) until it parks its next forward; then one
  batched forward serves every parked forward. The steps, drafters and pool are the same.
- Cancellation (client gone, shutdown) only sets a flag; the worker closes the generation between steps
  (`Generation.close()`, which runs the drafter's `stop`) and frees the slot.
- Shutdown comes in two steps, both before the HTTP server cancels any request: `stop_admitting` refuses
  new requests and answers the waiting ones 503 (an error event for streams); active ones run on until
  they finish or the shutdown timeout passes, then `abort_active` ends them with a 503 error event, so
  every stream ends with its last token or an error, then ``[DONE]``.

Events go from the worker to the request's asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from functools import partial

from leapdecode.drafters.base import Drafter
from leapdecode.engine import Engine, Generation, GenerationConfig, Result
from leapdecode.errors import LeapError
from leapdecode.server.batching import Cancelled, Lane, RoundLoad, batching_engine, run_round
from leapdecode.server.errors import ApiError
from leapdecode.server.metrics import ServerMetrics

log = logging.getLogger("leapdecode.server")


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: a text piece, the final result, or an error."""

    kind: str  # "piece" | "done" | "error"
    text: str = ""
    result: Result | None = None
    error: ApiError | None = None


class Job:
    """One admitted request: its prompt ids, config and drafter name, and the queue its events go to."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, *, stream: bool = True):
        self.id = uuid.uuid4().hex
        self.prompt_ids, self.config, self.stream = prompt_ids, config, stream
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.started: float | None = None  # when it got a slot
        self.first_text: float | None = None
        self.cancelled = False
        self.cancel_error: ApiError | None = None  # the error a cancelled job reports (None: cancelled)
        self.generation: Generation | None = None
        self.drafter: Drafter | None = None

    @property
    def queue_s(self) -> float:
        return (self.started or time.perf_counter()) - self.arrived

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class DrafterPool:
    """Idle drafter instances per name, most recently returned first. Used by the worker thread only."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._idle: dict[str, list[Drafter]] = {}
        self.created: dict[str, int] = {}

    def acquire(self, name: str) -> Drafter:
        idle = self._idle.get(name)
        if idle:
            return idle.pop()
        self.created[name] = self.created.get(name, 0) + 1
        return self.engine.new_drafter(name)

    def release(self, name: str, drafter: Drafter) -> None:
        self._idle.setdefault(name, []).append(drafter)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="shutting_down")


class Scheduler:
    def __init__(
        self, engine: Engine, max_concurrency: int, max_queue: int, prefill_chunk: int | None = None
    ):
        """`prefill_chunk`: batching on (`leapdecode.server.batching`): the active requests' forwards
        run as one batched forward per round, prompts `prefill_chunk` rows per round; None: one
        request's step after another."""
        self.engine, self.max_concurrency, self.max_queue = engine, max_concurrency, max_queue
        self.batching = prefill_chunk is not None
        # what generations run on: with batching, the engine with its runner behind a BatchingRunner
        self._load = RoundLoad()  # the last batched round's rows: lanes' drafters weigh their rows by it
        lanes = None if prefill_chunk is None else batching_engine(engine, prefill_chunk, self._load)
        self._generator = engine if lanes is None else lanes
        self.pool = DrafterPool(self._generator)  # drafters bound to it (lanes weigh shared costs)
        self._lanes: dict[Job, Lane] = {}
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.metrics = ServerMetrics(lambda: len(self._waiting), lambda: len(self._active), max_concurrency)
        self.metrics.watch_prefix_cache(lambda: engine.prefix_cache)

    # ------------------------------------------------------------ called from the event loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leap-generation", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        """Admit a job (a slot now, or the queue), or refuse it: 429 when the queue is full."""
        with self._cond:
            if self._stopping:
                raise _shutting_down()
            if len(self._active) < self.max_concurrency:
                self._activate(job)
            elif len(self._waiting) < self.max_queue:
                self._waiting.append(job)
            else:
                self.metrics.rejected.inc(reason="queue_full")
                raise ApiError(
                    429,
                    f"the server is busy: {len(self._active)} requests generating and "
                    f"{len(self._waiting)} waiting (--max-queue {self.max_queue}); retry later",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away). Harmless when the job has already finished."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.finished.inc(outcome="cancelled")
            elif job in self._active:
                job.cancelled = True
                self._cond.notify()

    @property
    def busy(self) -> bool:
        """Whether any job is waiting or generating."""
        with self._cond:
            return bool(self._active or self._waiting)

    def stop_admitting(self) -> None:
        """Refuse new jobs and answer the waiting ones 503; active jobs go on."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.emit(Event("error", error=_shutting_down()))
                self.metrics.finished.inc(outcome="cancelled")
            self._waiting.clear()
            self._cond.notify_all()

    def abort_active(self) -> None:
        """End the active jobs after their current step, each with a 503 error event."""
        with self._cond:
            for job in self._active:
                job.cancel_error = job.cancel_error or _shutting_down()
                job.cancelled = True
            self._cond.notify_all()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel waiting and active ones, and wait for the worker to close them."""
        self.stop_admitting()
        self.abort_active()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ the worker thread

    def _activate(self, job: Job) -> None:
        job.started = time.perf_counter()
        self._active.append(job)
        self._cond.notify()

    def _run(self) -> None:
        if self.batching:
            return self._conduct()
        while True:
            jobs = self._wait_for_jobs()
            if jobs is None:
                return
            for job in jobs:
                self._step(job)

    def _wait_for_jobs(self) -> list[Job] | None:
        """The active jobs, once there is one; None when the scheduler stops with none left."""
        with self._cond:
            while not self._active and not self._stopping:
                self._cond.wait()
            return list(self._active) if self._active else None

    def _conduct(self) -> None:
        """Batched rounds (`leapdecode.server.batching`): every active job runs in its lane until it
        parks a forward, then one batched forward serves them all."""
        with self.engine.compute_scope():  # held throughout: the lanes' own scopes nest inside it
            while (jobs := self._wait_for_jobs()) is not None:
                for job in jobs:
                    if job not in self._lanes:
                        self._lanes[job] = Lane(partial(self._drive, job), f"leap-lane-{job.id[:8]}")
                lanes = [self._lanes[j] for j in jobs]
                run_round(lanes, self.engine.model, lambda lane: self._cancelled(lane), self._load)
                for job in jobs:
                    if self._lanes[job].done:
                        del self._lanes[job]

    def _cancelled(self, lane: Lane) -> bool:
        return any(job.cancelled for job, mine in self._lanes.items() if mine is lane)

    def _drive(self, job: Job) -> None:
        """A lane's body: the job's steps until it ends (a bug outside a step still ends the job, so the
        conductor never starts a second lane for it)."""
        try:
            while self._step(job):
                pass
        except Exception:
            log.exception("lane of generation %s failed", job.id)
            with self._cond:
                active = job in self._active
            if active:
                self._finish(job, "error", ApiError(500, "internal error during generation", code="internal"))

    def _step(self, job: Job) -> bool:
        """One step of the job's generation; False once the job has finished."""
        if job.cancelled:
            self._finish(job, "cancelled")
            return False
        try:
            generation = job.generation or self._begin(job)
            piece = next(generation)
        except StopIteration:
            assert generation.result is not None  # set when the pieces run out
            self._finish(job, generation.result.stats.finish_reason or "stop")
            return False
        except Cancelled:  # dropped mid-step (batching): the drafter stopped mid-step, not reused
            self._finish(job, "cancelled", keep_drafter=False)
            return False
        except LeapError as exc:
            self._finish(job, "error", ApiError(400, str(exc)))
            return False
        except Exception:  # a bug must cost one request, not the server
            log.exception("generation %s failed", job.id)
            error = ApiError(500, "internal error during generation", code="internal")
            self._finish(job, "error", error)
            return False
        if job.first_text is None:
            job.first_text = time.perf_counter()
            self.metrics.ttft.observe(job.first_text - job.arrived, drafter=job.config.drafter)
        if job.stream:
            job.emit(Event("piece", text=piece))
        return True

    def _begin(self, job: Job) -> Generation:
        job.drafter = self.pool.acquire(job.config.drafter)
        job.generation = self._generator.stream(job.prompt_ids, job.config, raw=True, drafter=job.drafter)
        return job.generation

    def _finish(
        self, job: Job, outcome: str, error: ApiError | None = None, keep_drafter: bool = True
    ) -> None:
        result = self._close(job, keep_drafter=keep_drafter and error is None)
        # one update under the metrics' lock: /metrics never shows the job counted yet still active
        with self._cond, self.metrics.registry.lock:  # the order `submit` takes them in too
            if result is not None:
                self.metrics.observe_generation(result.stats, outcome)
            else:
                self.metrics.finished.inc(outcome=outcome)
            self._active.remove(job)
            if self._waiting and not self._stopping:
                self._activate(self._waiting.popleft())
        if error is None and outcome == "cancelled":
            error = job.cancel_error or ApiError(503, "the generation was cancelled", code="cancelled")
        job.emit(Event("error", error=error) if error else Event("done", result=result))

    def _close(self, job: Job, keep_drafter: bool) -> Result | None:
        """Close the generation (runs the drafter's `stop`) and return the drafter to the pool."""
        result = None
        if job.generation is not None:
            try:
                job.generation.close()
            except Exception:
                log.exception("closing generation %s failed", job.id)
                keep_drafter = False
            result = job.generation.result
        if job.drafter is not None and keep_drafter:
            self.pool.release(job.config.drafter, job.drafter)  # a drafter that raised is dropped
        return result
