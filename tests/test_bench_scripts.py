"""The benchmark scripts' own bookkeeping (the scripts themselves need models too big for the test run)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _import_script(name: str):
    """Import a benchmark script, then take its folder off `sys.path` again: a script named like an
    installed package (say `kernels`) would otherwise shadow it for every later test."""
    saved = list(sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


draft_model = _import_script("draft_model")


def _record(method: str, index: int, wall: float, gbs: float) -> dict:
    return {
        "method": method,
        "question_id": index,
        "group": "g",
        "index": index,
        "prompt_tokens": 5,
        "new_tokens": 10,
        "wall_s": wall,
        "prefill_s": 0.5,
        "steps": 10 if method == "none" else 4,
        "accepted": 0 if method == "none" else 6,
        "draft_s": 0.0 if method == "none" else 0.2,
        "host_gbs": gbs,
        "token_ids": [1] * 10,
    }


def test_host_split_groups_questions_by_every_run_of_ours():
    """Question 0 ran slow-host only, 1 fast-host only, 2 met both states; transformers' runs (hf) never
    decide a question's state."""
    records = [
        _record("none", 0, 4.0, 45),
        _record("draft-model", 0, 2.0, 50),
        _record("none", 1, 3.0, 80),
        _record("draft-model", 1, 2.5, 78),
        _record("none", 2, 4.0, 45),
        _record("draft-model", 2, 2.0, 79),
        _record("hf", 0, 9.0, 80),
    ]
    text = draft_model.host_split(records)
    slower, faster, mixed = text.split("\n\n")[0:2], text.split("\n\n")[2:4], text.split("\n\n")[-1]
    assert "slower than 60 GB/s (1, readings 45-50 GB/s)" in slower[0]
    assert "| draft-model | 1 | 10 |" in slower[1] and "| 2.00x |" in slower[1]
    assert "faster than 60 GB/s (1, readings 78-80 GB/s)" in faster[0]
    assert "| 1.20x |" in faster[1] and "hf" not in text
    assert mixed == "(1 questions met the host in both states.)"


def test_host_split_without_a_state_says_so():
    records = [_record("none", 0, 4.0, 45), _record("draft-model", 0, 2.0, 79)]
    assert draft_model.host_split(records) == "(1 questions met the host in both states.)"


def test_importing_a_script_leaves_sys_path_as_it_was():
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    _import_script("models")
    assert benchmarks not in sys.path
