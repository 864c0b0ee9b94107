"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms with labels; one lock guards them all because the HTTP event loop and the
generation worker thread both update them. `ServerMetrics` names the server's own series.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from operator import attrgetter

from leapdecode.prefix_cache import PrefixCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (), lock=None):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = lock or threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    """A count incremented here, or read when the metrics are rendered (`fn`: a count kept elsewhere)."""

    kind = "counter"

    def __init__(self, *args, fn: Callable[[], float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fn = fn
        self._values: dict[LabelValues, float] = {} if self.labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def _samples(self) -> list[str]:
        if self._fn is not None:
            return [f"{self.name} {_number(self._fn())}"]
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in sorted(self._values.items())
        ]


class Gauge(Metric):
    """A value read when the metrics are rendered (`fn`), or set explicitly per label set."""

    kind = "gauge"

    def __init__(self, *args, fn: Callable[[], float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fn = fn
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def _samples(self) -> list[str]:
        if self._fn is not None:
            return [f"{self.name} {_number(self._fn())}"]
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in sorted(self._values.items())
        ]


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, *args, buckets: Sequence[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[LabelValues, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            s = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    s[i] += 1  # cumulative: every bucket at or above the value
            s[-2] += value
            s[-1] += 1

    def _samples(self) -> list[str]:
        out = []
        for key, s in sorted(self._series.items()):
            for bound, n in zip(self.buckets, s):
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {n}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {s[-1]}")
        return out


class Registry:
    def __init__(self):
        self.lock = threading.RLock()
        self.metrics: list[Metric] = []

    def add(self, cls, name: str, help_text: str, labelnames: Sequence[str] = (), **kwargs):
        metric = cls(name, help_text, labelnames, lock=self.lock, **kwargs)
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        with self.lock:
            return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


PREFIX_SERIES = (  # (kind, name after leap_prefix_cache_, help, attribute of the PrefixCache)
    (Counter, "lookups_total", "Prompts looked up in the prefix cache", "stats.lookups"),
    (Counter, "hits_total", "Prompts that reused at least one cached token", "stats.hits"),
    (Counter, "lookup_tokens_total", "Prompt tokens looked up in the prefix cache", "stats.lookup_tokens"),
    (Counter, "hit_tokens_total", "Prompt tokens reused instead of prefilled", "stats.hit_tokens"),
    (Counter, "evicted_blocks_total", "Blocks evicted to stay under the cap", "stats.evicted_blocks"),
    (Gauge, "hit_rate", "Share of looked-up prompt tokens that were reused", "stats.hit_rate"),
    (Gauge, "bytes", "Bytes of keys and values held", "nbytes"),
    (Gauge, "capacity_bytes", "The cap on those bytes (--prefix-cache-mb)", "capacity_bytes"),
    (Gauge, "blocks", "Token blocks held", "blocks"),
)


def _reader(cache: Callable[[], PrefixCache | None], attribute: str) -> Callable[[], float]:
    get = attrgetter(attribute)
    return lambda: 0 if (c := cache()) is None else get(c)


class ServerMetrics:
    """The series `leap serve` exports. `queue_length` and `active` are read from the scheduler."""

    def __init__(self, queue_length: Callable[[], int], active: Callable[[], int], slots: int):
        r = self.registry = Registry()
        self.requests = r.add(
            Counter, "leap_requests_total", "HTTP requests by route and status code", ("route", "status")
        )
        self.prompt_tokens = r.add(Counter, "leap_prompt_tokens_total", "Prompt tokens of finished requests")
        self.completion_tokens = r.add(
            Counter, "leap_completion_tokens_total", "Generated tokens of finished and cancelled requests"
        )
        self.finished = r.add(
            Counter, "leap_generations_total", "Generations by outcome", ("outcome",)
        )  # stop, length, cancelled, error
        self.rejected = r.add(
            Counter, "leap_rejected_total", "Requests refused before generation", ("reason",)
        )
        r.add(Gauge, "leap_queue_length", "Requests waiting for a slot", fn=queue_length)
        r.add(Gauge, "leap_active_generations", "Requests generating now", fn=active)
        r.add(Gauge, "leap_slots", "Most requests generating at once (--max-concurrency)", fn=lambda: slots)
        self.ttft = r.add(
            Histogram,
            "leap_time_to_first_token_seconds",
            "From request arrival (queueing included) to the first text",
            ("drafter",),
            buckets=TTFT_BUCKETS,
        )
        self.rate = r.add(
            Histogram,
            "leap_tokens_per_second",
            "Generated tokens per second of decoding, per request",
            ("drafter",),
            buckets=RATE_BUCKETS,
        )
        self.steps = r.add(Counter, "leap_spec_steps_total", "Verification forwards", ("drafter",))
        self.drafted = r.add(Counter, "leap_spec_drafted_tokens_total", "Draft tokens verified", ("drafter",))
        self.accepted = r.add(
            Counter, "leap_spec_accepted_tokens_total", "Draft tokens accepted", ("drafter",)
        )
        self.mean_accepted = r.add(
            Gauge,
            "leap_spec_mean_accepted_tokens",
            "Tokens committed per verification step, bonus included (1 = no gain)",
            ("drafter",),
        )

    def watch_prefix_cache(self, cache: Callable[[], PrefixCache | None]) -> None:
        """Series read from the prefix cache that `cache()` returns (zeros while there is none)."""
        for kind, name, help_text, attribute in PREFIX_SERIES:
            self.registry.add(kind, f"leap_prefix_cache_{name}", help_text, fn=_reader(cache, attribute))

    def observe_generation(self, stats, outcome: str) -> None:
        """Account one finished (or cancelled) generation from its `leapdecode.stats.Stats`."""
        with self.registry.lock:
            self.finished.inc(outcome=outcome)
            self.prompt_tokens.inc(stats.prompt_tokens)
            self.completion_tokens.inc(stats.new_tokens)
            if stats.new_tokens > 1 and stats.decode_s > 0:
                self.rate.observe(stats.decode_tokens_per_s, drafter=stats.drafter)
            if stats.steps:
                self.steps.inc(stats.steps, drafter=stats.drafter)
                self.drafted.inc(stats.drafted, drafter=stats.drafter)
                self.accepted.inc(stats.accepted, drafter=stats.drafter)
                steps = self.steps.value(drafter=stats.drafter)
                self.mean_accepted.set(
                    (self.accepted.value(drafter=stats.drafter) + steps) / steps, drafter=stats.drafter
                )

    def render(self) -> str:
        return self.registry.render()


def parse_samples(text: str) -> dict[str, float]:
    """Samples of an exposition text, keyed by the series as written (`name{labels}`): for clients and
    tests that read /metrics."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out
