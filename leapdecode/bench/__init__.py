"""`leap bench`: Spec-Bench through every leapdecode method and the peers (transformers, llama.cpp)."""

from leapdecode.bench.data import GROUPS, Question, load_questions, parse_questions
from leapdecode.bench.methods import Contender, DrafterMethod, Run
from leapdecode.bench.report import render_dir, render_report, summarize
from leapdecode.bench.runner import read_records, run_bench

__all__ = [
    "GROUPS",
    "Contender",
    "DrafterMethod",
    "Question",
    "Run",
    "load_questions",
    "parse_questions",
    "read_records",
    "render_dir",
    "render_report",
    "run_bench",
    "summarize",
]
