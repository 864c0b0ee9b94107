"""Spec-Bench questions: loading, validation, selection, and the task groups of its result table.

A question file has one JSON object per line: ``{"question_id": ..., "category": ..., "turns": [...]}``.
MT-bench questions have two turns (the second is asked after the model's own first answer); the other
Spec-Bench tasks have one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from leapdecode.checks import check_int
from leapdecode.errors import LeapError

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")

# Spec-Bench's columns, in its order: group title -> categories.
GROUPS: dict[str, tuple[str, ...]] = {
    "Multi-turn Conversation": MT_BENCH,
    "Translation": ("translation",),
    "Summarization": ("summarization",),
    "QA": ("qa",),
    "Math": ("math_reasoning",),
    "RAG": ("rag",),
}
# Names accepted by --categories besides the categories themselves.
ALIASES: dict[str, tuple[str, ...]] = {"mt_bench": MT_BENCH}
# Spec-Bench's own question set ships with the package (Apache-2.0; see SOURCE.md beside it).
SPEC_BENCH = Path(__file__).resolve().parents[1] / "data" / "spec_bench" / "question.jsonl"


def spec_bench_path() -> Path:
    """The bundled Spec-Bench question file: the default of every `--data`."""
    if not SPEC_BENCH.is_file():
        raise LeapError(
            f"the bundled Spec-Bench questions are missing ({SPEC_BENCH}); reinstall or pass --data"
        )
    return SPEC_BENCH


def group_of(category: str) -> str:
    """The Spec-Bench column of a category; a category outside Spec-Bench is a column of its own."""
    for group, cats in GROUPS.items():
        if category in cats:
            return group
    return category


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.question_id, (int, str)) or isinstance(self.question_id, bool):
            raise LeapError(f"question_id must be an integer or a string, got {self.question_id!r}")
        if not isinstance(self.category, str) or not self.category:
            raise LeapError(f"category must be a non-empty string, got {self.category!r}")
        if not self.turns or not all(isinstance(t, str) and t for t in self.turns):
            raise LeapError("turns must be a non-empty list of non-empty strings")

    @property
    def group(self) -> str:
        return group_of(self.category)


def json_lines(lines: Iterable[str], source: str) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed value) of every non-blank line; a malformed line is a LeapError
    naming the source and the line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LeapError(
                f"{source} line {number}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from None
        yield number, value


def parse_questions(lines: Sequence[str], source: str = "questions") -> list[Question]:
    """Questions from JSON lines; any error names the source and the 1-based line number."""
    questions: list[Question] = []
    seen: set = set()
    for number, obj in json_lines(lines, source):
        q = _question(obj, f"{source} line {number}")
        if q.question_id in seen:
            raise LeapError(f"{source} line {number}: duplicate question_id {q.question_id!r}")
        seen.add(q.question_id)
        questions.append(q)
    if not questions:
        raise LeapError(f"{source}: no questions (expected JSON lines with question_id, category, turns)")
    return questions


def _question(obj: object, where: str) -> Question:
    if not isinstance(obj, dict):
        raise LeapError(f"{where}: expected a JSON object with question_id, category, turns")
    missing = [k for k in ("question_id", "category", "turns") if k not in obj]
    if missing:
        raise LeapError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(obj["turns"], list):
        raise LeapError(f"{where}: turns must be a list of strings")
    try:
        return Question(obj["question_id"], obj["category"], tuple(obj["turns"]))
    except LeapError as exc:
        raise LeapError(f"{where}: {exc}") from None


def load_questions(
    path: str | Path, categories: Sequence[str] | None = None, per_category: int | None = None
) -> list[Question]:
    """Questions of a Spec-Bench question.jsonl, optionally only some categories and the first N of each."""
    p = Path(path)
    if not p.is_file():
        raise LeapError(f"--data: question file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LeapError(f"--data: cannot read {path}: {exc}") from None
    return select(parse_questions(text.splitlines(), str(path)), categories, per_category)


def select(
    questions: list[Question], categories: Sequence[str] | None = None, per_category: int | None = None
) -> list[Question]:
    if per_category is not None:
        check_int("--per-category", per_category)
    wanted = expand_categories(categories, questions) if categories else None
    counts: dict[str, int] = {}
    chosen = []
    for q in questions:
        if wanted is not None and q.category not in wanted:
            continue
        if per_category is not None and counts.get(q.category, 0) >= per_category:
            continue
        counts[q.category] = counts.get(q.category, 0) + 1
        chosen.append(q)
    return chosen


def expand_categories(names: Sequence[str], questions: list[Question]) -> set[str]:
    present = {q.category for q in questions}
    wanted: set[str] = set()
    for name in names:
        cats = set(ALIASES.get(name, (name,))) & present if name in ALIASES else {name}
        if not cats <= present:
            raise LeapError(
                f"--categories: unknown category {name!r}; the data has: "
                f"{', '.join(sorted(present))} (or {', '.join(ALIASES)})"
            )
        wanted |= cats
    return wanted
