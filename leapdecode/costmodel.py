"""The measured cost of verifying k tokens in one forward, on this machine and backend.

Speculation pays when the tokens a tree is expected to commit outgrow what its forward costs over a
one-token forward. That ratio is a property of the hardware and kernels (on a 2-core CPU a forward of
16 tokens costs several times one token; on a large GPU it costs the same), so it is measured, not
assumed. It also depends on the context: every verified row attends to every cached token, so on a CPU
a draft token costs more after a long prompt. `CostModel` holds curves measured at a short and a long
context and interpolates between them (attention cost is linear in the context).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)


class Cost(Protocol):
    """What a drafter reads: seconds of a forward of k rows after `context` cached tokens."""

    def __call__(self, k: int, context: int | None = None) -> float: ...


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one verification forward with k tokens, interpolated between measured points."""

    ks: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self):
        if len(self.ks) != len(self.seconds) or not self.ks or list(self.ks) != sorted(set(self.ks)):
            raise ValueError("CostCurve needs ascending, unique ks with one time each")

    def __call__(self, k: int, context: int | None = None) -> float:  # one curve: any context
        ks, ts = self.ks, self.seconds
        if k <= ks[0]:
            return ts[0]
        i = bisect.bisect_left(ks, k)
        if i == len(ks):  # extrapolate along the last segment
            i -= 1
        k0, k1, t0, t1 = ks[i - 1], ks[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (k - k0) / (k1 - k0)

    def relative(self) -> dict[int, float]:
        return {k: t / self.seconds[0] for k, t in zip(self.ks, self.seconds)}


DEFAULT_CONTEXTS = (256, 2048)


@dataclass(frozen=True)
class CostModel:
    """Seconds of a verification forward of k tokens after `context` cached ones: curves measured at a
    few contexts, linear in the context between and beyond them."""

    contexts: tuple[int, ...]
    curves: tuple[CostCurve, ...]

    def __post_init__(self):
        if (
            len(self.contexts) != len(self.curves)
            or not self.curves
            or list(self.contexts) != sorted(set(self.contexts))
        ):
            raise ValueError("CostModel needs ascending, unique contexts with one curve each")

    def __call__(self, k: int, context: int | None = None) -> float:
        cs = self.contexts
        if context is None or len(cs) == 1:
            return self.curves[0](k)
        i = min(max(bisect.bisect_left(cs, context), 1), len(cs) - 1)
        t0, t1 = self.curves[i - 1](k), self.curves[i](k)
        # below the shortest context the line may fall steeply: never predict under half its time
        return max(t0 + (t1 - t0) * (context - cs[i - 1]) / (cs[i] - cs[i - 1]), self.curves[0](k) * 0.5)

    def relative(self, context: int | None = None) -> dict[int, float]:
        """Cost of k tokens over one token at `context` (default: the shortest measured)."""
        ks = self.curves[0].ks
        return {k: self(k, context) / self(1, context) for k in ks}


def measure_model(
    model, ks: tuple[int, ...] = DEFAULT_KS, contexts: tuple[int, ...] = DEFAULT_CONTEXTS, repeats: int = 3
) -> CostModel:
    """`measure` at each context that fits the model (at least one)."""
    fits = sorted({max(1, min(c, model.cfg.max_seq_len - max(ks) - 1)) for c in contexts})
    return CostModel(tuple(fits), tuple(measure(model, ks, c, repeats) for c in fits))


def measure(
    model, ks: tuple[int, ...] = DEFAULT_KS, context: int = 256, repeats: int = 3, budget_s: float = 0.25
) -> CostCurve:
    """Time a forward of k new tokens after `context` cached ones (best of up to `repeats`, fewer once a
    k has taken `budget_s`), as decoding sees it. The cache is filled with random keys and values rather
    than by a prefill: a forward's cost does not depend on their values, and prefilling 2048 tokens of
    a 1.5B model would take longer than every measurement together."""
    context = max(1, min(context, model.cfg.max_seq_len - max(ks) - 1))
    ks = tuple(k for k in ks if context + k < model.cfg.max_seq_len)
    cache = model.new_cache(context + max(ks))
    gen = torch.Generator().manual_seed(0)
    for t in (cache.k, cache.v):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * 0.5)
    cache.advance(context)
    times = []
    for k in ks:
        x = torch.randint(0, model.cfg.vocab_size, (k,), generator=gen).to(model.device)  # [k]
        pos = torch.arange(context, context + k, device=model.device)
        best, spent = float("inf"), 0.0
        for _ in range(repeats):
            cache.truncate(context)
            t0 = time.perf_counter()
            model.forward(x, pos, cache)
            _sync(model.device)
            took = time.perf_counter() - t0
            best, spent = min(best, took), spent + took
            if spent >= budget_s:
                break
        times.append(best)
    # a forward never gets cheaper with more tokens: smooth timing noise so the curve is monotone
    for i in range(1, len(times)):
        times[i] = max(times[i], times[i - 1])
    return CostCurve(ks, tuple(times))


@functools.cache
def code_fingerprint() -> str:
    """A hash of the code a forward runs (model and kernels) and of how it is timed (this module): a saved
    curve is stale once either changes."""
    root = Path(__file__).parent
    files = sorted(
        [
            *root.glob("model/*.py"),
            *root.glob("kernels/*.py"),
            *root.glob("kernels/*.cpp"),
            *root.glob("kernels/*.h"),
            Path(__file__),
        ]
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def cached(model, describe: dict, folder: Path, notify: Callable[[], None] | None = None) -> CostModel:
    """The curve measured earlier for the same model, code, kernels, threads and machine (`describe`), or
    a fresh measurement saved for next time: a one-shot `leap generate` should not pay a second of timing."""
    describe = {**describe, "code": code_fingerprint()}
    key = hashlib.sha256(json.dumps(describe, sort_keys=True).encode()).hexdigest()[:20]
    path = folder / f"cost-{key}.json"
    try:
        saved = json.loads(path.read_text())
        return CostModel(
            tuple(saved["contexts"]), tuple(CostCurve(tuple(saved["ks"]), tuple(t)) for t in saved["seconds"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if notify is not None:
        notify()
    model_cost = measure_model(model)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "describe": describe,
                    "contexts": model_cost.contexts,
                    "ks": model_cost.curves[0].ks,
                    "seconds": [c.seconds for c in model_cost.curves],
                }
            )
        )
    except OSError:
        pass  # a read-only cache only costs the measurement again next time
    return model_cost


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
