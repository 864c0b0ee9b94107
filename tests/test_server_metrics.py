"""The Prometheus text format, checked line by line, and the server's speculative series."""

from __future__ import annotations

import pytest

from leapdecode.server.metrics import Counter, Gauge, Histogram, Registry, ServerMetrics, parse_samples
from leapdecode.stats import Stats


def test_exposition_text_is_exact():
    r = Registry()
    c = r.add(Counter, "x_total", "Things", ("kind",))
    g = r.add(Gauge, "y", "Level", fn=lambda: 3)
    h = r.add(Histogram, "z_seconds", "Latency", ("d",), buckets=(0.1, 1))
    c.inc(kind='a"b')
    c.inc(2, kind="c")
    h.observe(0.05, d="p")
    h.observe(0.5, d="p")
    h.observe(7, d="p")
    assert g.kind == "gauge"
    assert (
        r.render()
        == """\
# HELP x_total Things
# TYPE x_total counter
x_total{kind="a\\"b"} 1
x_total{kind="c"} 2
# HELP y Level
# TYPE y gauge
y 3
# HELP z_seconds Latency
# TYPE z_seconds histogram
z_seconds_bucket{d="p",le="0.1"} 1
z_seconds_bucket{d="p",le="1"} 2
z_seconds_bucket{d="p",le="+Inf"} 3
z_seconds_sum{d="p"} 7.55
z_seconds_count{d="p"} 3
"""
    )


def test_labels_must_match_the_declared_names():
    c = Registry().add(Counter, "x_total", "Things", ("kind",))
    with pytest.raises(ValueError, match="labels"):
        c.inc(other="a")


def test_speculative_statistics_per_drafter():
    m = ServerMetrics(lambda: 2, lambda: 1, 4)
    m.observe_generation(
        Stats(prompt_tokens=5, new_tokens=9, steps=4, drafted=12, accepted=5, decode_s=0.5, drafter="pld"),
        "length",
    )
    m.observe_generation(
        Stats(prompt_tokens=3, new_tokens=3, steps=2, drafted=2, accepted=1, decode_s=0.5, drafter="pld"),
        "stop",
    )
    m.observe_generation(
        Stats(prompt_tokens=1, new_tokens=2, steps=2, drafter="none", decode_s=1.0), "cancelled"
    )
    s = parse_samples(m.render())
    assert s['leap_spec_steps_total{drafter="pld"}'] == 6
    assert s['leap_spec_drafted_tokens_total{drafter="pld"}'] == 14
    assert s['leap_spec_accepted_tokens_total{drafter="pld"}'] == 6
    assert s['leap_spec_mean_accepted_tokens{drafter="pld"}'] == 2.0  # (6 accepted + 6 bonus) / 6 steps
    assert s['leap_spec_mean_accepted_tokens{drafter="none"}'] == 1.0
    assert s["leap_prompt_tokens_total"] == 9 and s["leap_completion_tokens_total"] == 14
    assert s['leap_generations_total{outcome="cancelled"}'] == 1
    assert s['leap_tokens_per_second_count{drafter="pld"}'] == 2
    assert s['leap_tokens_per_second_sum{drafter="pld"}'] == 18 + 6
    assert (s["leap_queue_length"], s["leap_active_generations"], s["leap_slots"]) == (2, 1, 4)
