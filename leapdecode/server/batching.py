"""Batched decoding: the active requests' forwards in one batched forward per round.

The engine runs a request as one loop (propose, one forward, accept); this module batches those loops
without a second copy of them. Each active request runs its `Generation` in a *lane*: a thread that runs
only while the conductor (the scheduler's worker thread) hands it the baton, so exactly one thread runs
at a time, as with the single worker (no locks around drafters, no two threads on the model). The
request's engine is the server's engine with its runner wrapped in a `BatchingRunner`: when the loop
calls `forward`, the lane parks that forward and gives the baton back. A round is:

  1. resume every lane with the result of its last forward (or a `Cancelled` error), in admission
     order; each runs until it parks its next forward or its generation ends;
  2. one `forward_batch` over the parked forwards (`leapdecode.model.runner`): ragged rows, each
     sequence with its own cache, each row computed as it would be alone.

Chunked prefill: a prompt longer than `chunk` rows is parked one chunk per round, so a long prompt
delays the others by at most one chunk per round. Cancellation: a cancelled lane is resumed with
`Cancelled` raised from its parked forward, so its rows leave the very next round. Forwards that drafters
make themselves (a self-drafting trial, a draft model) run directly in their lane, one lane at a time.

Speculation under load: a lane's drafters weigh their drafts by `SharedCost`, the cost model as a lane of
a batch sees it. A round's forward serves every lane, so a lane pays its share of the one-row-per-lane
round (the round's cost over its lanes) plus the marginal cost of its extra rows on top of the other
lanes' rows (both read from the measured curve at the last round's rows). While the batch is bound by
the weight pass, extra rows cost little and drafts stay long; once it is bound by arithmetic, extra rows
cost what they return and drafts shrink to what pays (down to plain steps).

Exactness: every row's arithmetic is that of its own forward (the native fallback runs one forward per
sequence; the torch runner shares only the weight pass, float64-equal), and chunking a prefill changes
no row on a row-invariant backend, so outputs equal serving one request at a time.
"""

from __future__ import annotations

import contextvars
import copy
import threading
from collections.abc import Callable
from dataclasses import replace

import torch

from leapdecode.costmodel import CostModel
from leapdecode.engine import Engine
from leapdecode.model.runner import FULL, NO_LOGITS, BatchItem, Output, Plan, forward_batch, forward_each

DEFAULT_CHUNK = 256  # prompt rows per round


class Cancelled(Exception):
    """Raised from a parked forward of a lane whose request was cancelled."""


_lane = threading.local()  # .current: the Lane running on this thread


class Lane:
    """A generation that runs on its own thread but only while it holds the baton (module docstring)."""

    def __init__(self, body: Callable[[], None], name: str):
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.parked: BatchItem | None = None  # the forward it waits on
        self.rows = 0  # rows of its forward in the last round
        self.result: Output | BaseException | None = None  # what that forward returns (or raises)
        self.done = False
        context = contextvars.copy_context()  # the conductor's kernel thread count, for direct forwards
        self._thread = threading.Thread(target=context.run, args=(self._main, body), name=name, daemon=True)
        self._thread.start()

    def resume(self) -> None:
        """Run the lane until it parks a forward or ends (conductor side)."""
        self._go.release()
        self._back.acquire()

    def _main(self, body: Callable[[], None]) -> None:
        self._go.acquire()
        _lane.current = self
        try:
            body()
        finally:
            self.done, self.parked = True, None
            self._back.release()

    def park(self, item: BatchItem) -> Output:
        """Wait for the conductor to run `item` in a batch (lane side)."""
        self.parked, self.result = item, None
        self._back.release()
        self._go.acquire()
        result, self.parked, self.result = self.result, None, None
        if isinstance(result, BaseException):
            raise result
        assert result is not None  # the conductor always answers a parked forward
        return result


class RoundLoad:
    """The rows and lanes of the last batched round (what a lane's rows share the weight pass with)."""

    def __init__(self):
        self.rows, self.lanes = 0, 0

    def note(self, lanes: list[Lane]) -> None:
        self.rows, self.lanes = sum(lane.rows for lane in lanes), len(lanes)


class SharedCost:
    """The cost model as the current lane sees it (module docstring): seconds of its forward of k rows."""

    def __init__(self, base: Callable[[], CostModel], load: RoundLoad):
        self.base, self.load = base, load

    def __call__(self, k: int, context: int | None = None) -> float:
        lane = getattr(_lane, "current", None)
        curve, mine = self.base(), (lane.rows if lane is not None else 0)
        others = max(0, self.load.rows - mine)
        if others == 0:  # alone (or not in a lane): the curve itself
            return curve(k, context)
        lanes = self.load.lanes if mine else self.load.lanes + 1
        one = curve(others + 1, context)
        return one / lanes + curve(others + k, context) - one


class BatchingRunner:
    """The server's runner as a lane sees it: `forward` parks the call for the next batched round
    (prompts longer than `chunk` rows one chunk per round); everything else is the runner's own."""

    def __init__(self, runner, chunk: int = DEFAULT_CHUNK):
        self.runner, self.chunk = runner, chunk

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def forward(self, tokens, positions, cache, mask=None, plan: Plan = FULL) -> Output:
        lane = getattr(_lane, "current", None)
        if lane is None:  # not in a lane (the conductor, a measurement): an ordinary forward
            return self.runner.forward(tokens, positions, cache, mask, plan)
        if mask is not None or not plan.advance or plan.features or len(tokens) <= self.chunk:
            return lane.park(BatchItem(tokens, positions, cache, mask, plan))
        return self._chunked(lane, tokens, positions, cache, plan)

    def _chunked(self, lane: Lane, tokens, positions, cache, plan: Plan) -> Output:
        """A causal prefill in chunks of `chunk` rows, one per round; the outputs joined as one."""
        outs = []
        for a in range(0, len(tokens), self.chunk):
            last = a + self.chunk >= len(tokens)
            rows = plan.rows if last or plan.rows == "all" else "none"
            part = Plan(plan.layers, rows, plan.head, plan.hidden, (), True)
            rows_a = slice(a, a + self.chunk)
            outs.append(lane.park(BatchItem(tokens[rows_a], positions[rows_a], cache, None, part)))
        logits = torch.cat([o.logits for o in outs]) if plan.rows == "all" else outs[-1].logits
        hidden = torch.cat([o.hidden for o in outs if o.hidden is not None]) if plan.hidden else None
        return Output(logits if plan.rows != "none" else NO_LOGITS, hidden)


def batching_engine(engine: Engine, chunk: int = DEFAULT_CHUNK, load: RoundLoad | None = None) -> Engine:
    """The server's engine with its runner behind a `BatchingRunner` (the same drafter options, cost
    curve, prefix cache and drafter host: forwards made by drafters themselves run directly)."""
    lanes = copy.copy(engine)
    lanes.model = BatchingRunner(engine.model, chunk)  # a Runner by duck typing (`__getattr__`)
    lanes.cost_curve = engine.cost_curve  # type: ignore[method-assign]  # measured once, on the runner
    cost = SharedCost(engine.cost_curve, load or RoundLoad())
    lanes.host = replace(engine.host, cost=lambda: cost, make=lanes.new_drafter)  # lanes' drafters
    return lanes


def run_round(
    lanes: list[Lane], runner, cancelled: Callable[[Lane], bool], load: RoundLoad | None = None
) -> None:
    """One round (module docstring): resume every lane, then one batched forward of what they parked
    (its rows noted in `load`)."""
    for lane in lanes:
        if lane.parked is not None and cancelled(lane):
            lane.result = Cancelled()
        lane.resume()
    parked = [lane for lane in lanes if not lane.done and lane.parked is not None]
    items = [lane.parked for lane in parked if lane.parked is not None]
    for lane, item in zip(parked, items):
        lane.rows = len(item.tokens)
    if load is not None:
        load.note(parked)
    for lane, result in zip(parked, _batch(runner, items)):
        lane.result = result


def _batch(runner, items) -> list[Output | BaseException]:
    """The batched forward. When it fails (a bad input checked before any row is written, e.g. a full
    context), each item runs alone, and an item that fails alone fails only its own request: its lane
    re-raises the error from its forward, where the engine's loop would have seen it."""
    if not items:
        return []
    try:
        return list(forward_batch(runner, items))
    except Exception:  # noqa: BLE001 (retried item by item just below; each error reaches its lane)
        out: list[Output | BaseException] = []
        for item in items:
            try:
                out.append(forward_each(runner, [item])[0])
            except Exception as exc:  # noqa: BLE001 (raised again in the lane that made the forward)
                out.append(exc)
        return out
