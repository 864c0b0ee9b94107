"""The benchmark loop: every question through every contender, records appended as they come.

Fairness: all contenders answer the same chat-templated token ids (a second turn follows the contender's
own first answer, as in MT-bench), with the same token budget and sampling, in one process. Contenders
alternate question by question with a rotating order, after one warm-up run each, so that drift of the
machine (heat, other load) spreads evenly over them instead of biasing the ratios.

Records are appended to ``records.jsonl`` and flushed one by one; ``resume=True`` skips the (method,
question, turn) triples already there. A record's ``lossless`` flag compares its output with plain
decoding's (`none`) on the same question and turn, so records of contenders that run before `none` in a
question's order wait in memory until `none` has answered that turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from leapdecode.bench.data import Question, json_lines
from leapdecode.bench.machine import describe_machine
from leapdecode.bench.methods import Contender, DrafterMethod, Run
from leapdecode.engine import Engine
from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams

BASELINE = "none"
RECORDS = "records.jsonl"
META = "run.json"
WARMUP_PROMPT = "Hello! Please introduce yourself in one sentence."
WARMUP_TOKENS = 16
# Settings a resumed run must share with the records it continues.
RESUME_KEYS = ("model", "dtype", "max_new_tokens", "temperature", "top_k", "top_p")


def run_bench(
    engine: Engine,
    questions: Sequence[Question],
    methods: Sequence[str | Contender],
    peers: Sequence[Contender] = (),
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    max_draft: int = 64,
    out_dir: str | Path | None = None,
    resume: bool = False,
    warmup: bool = True,
    progress: bool = True,
    meta: dict | None = None,
) -> list[dict]:
    """Run the benchmark; returns every record (those of a resumed run included).

    `methods` are drafter names or Contender objects; plain decoding (`none`) is added when missing since
    it is the baseline of every ratio. With `out_dir`, records go to ``out_dir/records.jsonl`` and the
    settings and machine to ``out_dir/run.json``.
    """
    sampling = sampling or SamplingParams()
    if not questions:
        raise LeapError("no questions selected (check --categories and --per-category)")
    contenders = _contenders(engine, methods, peers, max_draft)
    log = RecordLog(Path(out_dir) / RECORDS if out_dir else None, resume)
    if out_dir:
        _write_meta(Path(out_dir), engine, contenders, max_new_tokens, sampling, meta or {}, resume)
    session = _Session(engine, contenders, log, max_new_tokens, sampling)
    todo = sum(len(q.turns) for q in questions) * len(contenders)
    left = sum(
        log.get(c.name, q.question_id, t) is None
        for q in questions
        for c in contenders
        for t in range(1, len(q.turns) + 1)
    )
    if warmup and left:
        session.warm_up()
    with tqdm(
        total=todo, initial=todo - left, unit="run", desc="bench", disable=not progress, dynamic_ncols=True
    ) as bar:
        for i, q in enumerate(questions):
            for c in _rotated(contenders, i):
                session.answer(c, q, bar)
    return log.records


def _contenders(engine, methods, peers, max_draft) -> list[Contender]:
    made = [m if isinstance(m, Contender) else DrafterMethod(engine, m, max_draft) for m in methods]
    base = [c for c in made if c.name == BASELINE][:1] or [DrafterMethod(engine, BASELINE, max_draft)]
    made = base + [c for c in made if c is not base[0]]  # the baseline leads the first question's order
    made += list(peers)
    names = [c.name for c in made]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LeapError(f"--methods/--peers: {', '.join(dupes)} given twice")
    return made


def _rotated(items: list, shift: int) -> list:
    k = shift % len(items)
    return items[k:] + items[:k]


class _Session:
    def __init__(
        self,
        engine: Engine,
        contenders: list[Contender],
        log: RecordLog,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> None:
        self.engine, self.contenders, self.log = engine, contenders, log
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.waiting: dict[tuple, list[dict]] = {}  # (question_id, turn) -> records waiting for `none`

    def warm_up(self) -> None:
        """One short untimed run each: first-call costs (allocation, kernel selection) stay out."""
        ids = self.engine.encode_prompt(WARMUP_PROMPT)
        for c in self.contenders:
            c.run(ids, min(WARMUP_TOKENS, self.max_new_tokens), self.sampling)

    def answer(self, c: Contender, q: Question, bar) -> None:
        """All turns of one question by one contender, each turn after its own previous answers."""
        messages: list[dict] = []
        for turn, text in enumerate(q.turns, start=1):
            messages.append({"role": "user", "content": text})
            rec = self.log.get(c.name, q.question_id, turn)
            if rec is None:  # else it was recorded before a resume: its answer still leads the next turn
                bar.set_postfix_str(f"{c.name} q{q.question_id} turn {turn}", refresh=False)
                prompt = self.engine.tokenizer.encode_chat(messages)
                prompt = self.engine.encode_prompt(prompt)  # validates length and ids
                run = c.run(prompt, self.max_new_tokens, self.sampling)
                rec = make_record(c, q, turn, prompt, run, self.engine.tokenizer.decode(run.token_ids))
                self._emit(rec)
                bar.update(1)
            messages.append({"role": "assistant", "content": self.engine.tokenizer.decode(rec["output_ids"])})

    def _emit(self, rec: dict) -> None:
        key = (rec["question_id"], rec["turn"])
        if rec["method"] == BASELINE:
            self.log.append(rec)
            for other in self.waiting.pop(key, []):
                self._check_and_append(other, rec)
            return
        base = self.log.get(BASELINE, *key)
        if base is None:
            self.waiting.setdefault(key, []).append(rec)
        else:
            self._check_and_append(rec, base)

    def _check_and_append(self, rec: dict, base: dict) -> None:
        if self.sampling.greedy:  # sampled outputs differ by chance: nothing to check
            rec["lossless"] = rec["output_ids"] == base["output_ids"]
        self.log.append(rec)


def make_record(c: Contender, q: Question, turn: int, prompt: list[int], run: Run, text: str) -> dict:
    n = len(run.token_ids)
    return {
        "method": c.name,
        "kind": c.kind,
        "question_id": q.question_id,
        "category": q.category,
        "group": q.group,
        "turn": turn,
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "wall_s": run.wall_s,
        "tokens_per_s": n / run.wall_s if run.wall_s > 0 else 0.0,
        "prefill_s": run.prefill_s,
        "steps": run.steps,
        "accepted": run.accepted,
        "mean_accepted": run.mean_accepted,
        "draft_s": run.draft_s,
        "verify_s": run.verify_s,
        "accepted_hist": run.accepted_hist,
        "lossless": None,
        "output_ids": list(run.token_ids),
        "text": text,
    }


class RecordLog:
    """records.jsonl: read on resume, appended and flushed record by record."""

    def __init__(self, path: Path | None, resume: bool = False):
        self.path = path
        self.records: list[dict] = []
        self._index: dict[tuple, dict] = {}
        if path is None:
            return
        if path.exists() and path.stat().st_size and not resume:
            raise LeapError(
                f"--out: {path} already holds records; pass --resume to continue it or choose another --out"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        for rec in read_records(path, repair=True) if path.exists() else []:
            self._add(rec)

    def get(self, method: str, question_id, turn: int) -> dict | None:
        return self._index.get((method, question_id, turn))

    def append(self, rec: dict) -> None:
        self._add(rec)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()

    def _add(self, rec: dict) -> None:
        self.records.append(rec)
        self._index[(rec["method"], rec["question_id"], rec["turn"])] = rec


REQUIRED = ("method", "question_id", "category", "turn", "new_tokens", "wall_s", "output_ids")


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a records.jsonl. With `repair`, a last line cut short by an interrupted write is dropped
    from the file; any other bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise LeapError(f"records not found: {path}")
    text = p.read_text(encoding="utf-8")
    lines = text.splitlines()
    if repair and lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
            p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return list(_parse_records(lines, str(path)))


def _parse_records(lines: Iterable[str], source: str) -> Iterable[dict]:
    for number, rec in json_lines(lines, source):
        missing = [k for k in REQUIRED if not isinstance(rec, dict) or k not in rec]
        if missing or not isinstance(rec, dict):
            raise LeapError(f"{source} line {number}: not a bench record (missing {', '.join(missing)})")
        yield rec


def _write_meta(out: Path, engine, contenders, max_new_tokens, sampling, extra, resume) -> None:
    meta = {
        "settings": {
            "model": engine.name,
            "dtype": str(engine.model.dtype).removeprefix("torch."),
            "max_new_tokens": max_new_tokens,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
            **extra.get("settings", {}),
        },
        "machine": describe_machine(engine),
        "contenders": {c.name: {"kind": c.kind, **c.describe()} for c in contenders},
        **{k: v for k, v in extra.items() if k != "settings"},
    }
    path = out / META
    if resume and path.is_file():
        meta = _merge_meta(read_meta(out), meta)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _merge_meta(old: dict, new: dict) -> dict:
    for key in RESUME_KEYS:
        a, b = old.get("settings", {}).get(key), new["settings"].get(key)
        if a != b:
            raise LeapError(f"--resume: the records were made with {key}={a!r}, this run has {key}={b!r}")
    merged = dict(old)
    merged["contenders"] = {**old.get("contenders", {}), **new["contenders"]}
    merged["resumed"] = old.get("resumed", []) + [new["machine"]["date"]]
    return merged


def read_meta(out: str | Path) -> dict:
    path = Path(out) / META
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LeapError(f"{path}: malformed JSON ({exc.msg})") from None
