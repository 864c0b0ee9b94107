"""leap bench end to end on a tiny random-weight engine: records, lossless flags, report ratios, resume."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_engine_for

from leapdecode.bench import parse_questions, read_records, render_report, run_bench, summarize
from leapdecode.bench.data import group_of
from leapdecode.bench.methods import DrafterMethod
from leapdecode.bench.report import OVERALL, render_markdown
from leapdecode.bench.runner import RECORDS, _rotated
from leapdecode.drafters import available
from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams

MAX_NEW = 16
# The tiny engine's tokenizer knows only the capital letters: the other characters of a turn drop out.
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["ABCABC WRITE ABOUT ABC", "NOW REWRITE IT ABCABC"]},
    {"question_id": 82, "category": "writing", "turns": ["XYZ XYZ TELL A STORY"]},
    {"question_id": 3, "category": "qa", "turns": ["WHO IS QQQ AND WHO IS PPP"]},
    {"question_id": 4, "category": "qa", "turns": ["WHAT IS MNOP MNOP"]},
]
FIELDS = (
    "method",
    "kind",
    "question_id",
    "category",
    "group",
    "turn",
    "prompt_tokens",
    "new_tokens",
    "wall_s",
    "tokens_per_s",
    "prefill_s",
    "steps",
    "accepted",
    "mean_accepted",
    "draft_s",
    "verify_s",
    "accepted_hist",
    "lossless",
    "output_ids",
    "text",
)


def drafters_under_test() -> list[str]:
    preferred = [d for d in ("pld", "suffix", "recycling", "copy") if d in available()]
    return preferred[:2]


class Logged(DrafterMethod):
    """A method that notes every call (contender name, prompt) in a shared log."""

    def __init__(self, engine, drafter, log, name=None):
        super().__init__(engine, drafter)
        self.name, self.log = name or drafter, log

    def run(self, prompt_ids, max_new_tokens, sampling):
        self.log.append((self.name, tuple(prompt_ids)))
        return self.transform(prompt_ids, super().run(prompt_ids, max_new_tokens, sampling))

    def transform(self, prompt_ids, run):
        return run


class Lossy(Logged):
    """Plain decoding with the last token changed on one prompt: the bench must flag it."""

    def __init__(self, engine, log, target_prompt):
        super().__init__(engine, "none", log, name="lossy")
        self.target = list(target_prompt)

    def transform(self, prompt_ids, run):
        if list(prompt_ids) != self.target:
            return run
        ids = run.token_ids[:-1] + [(run.token_ids[-1] + 1) % self.engine.model.cfg.vocab_size]
        return type(run)(
            ids,
            run.wall_s,
            run.prefill_s,
            run.steps,
            run.accepted,
            run.draft_s,
            run.verify_s,
            run.accepted_hist,
        )


class Interrupted(Logged):
    """Stops the run (as Ctrl-C would) on its n-th call."""

    def __init__(self, engine, drafter, log, at_call):
        super().__init__(engine, drafter, log)
        self.calls, self.at_call = 0, at_call

    def run(self, prompt_ids, max_new_tokens, sampling):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return super().run(prompt_ids, max_new_tokens, sampling)


def first_prompt(engine):
    return engine.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]["turns"][0]}])


def contenders(engine, log):
    return (
        [Logged(engine, "none", log)]
        + [Logged(engine, d, log) for d in drafters_under_test()]
        + [Lossy(engine, log, first_prompt(engine))]
    )


@pytest.fixture(scope="module")
def questions():
    return parse_questions([json.dumps(q) for q in QUESTIONS])


@pytest.fixture(scope="module")
def bench(tmp_path_factory, questions):
    out = tmp_path_factory.mktemp("bench")
    engine, log = tiny_engine_for(), []
    methods = contenders(engine, log)
    records = run_bench(engine, questions, methods, max_new_tokens=MAX_NEW, out_dir=out, progress=False)
    return {"engine": engine, "out": out, "records": records, "log": log, "names": [m.name for m in methods]}


def by_key(records):
    return {(r["method"], r["question_id"], r["turn"]): r for r in records}


def test_one_record_per_method_question_turn(bench):
    records = bench["records"]
    turns = sum(len(q["turns"]) for q in QUESTIONS)
    assert len(records) == turns * len(bench["names"])
    assert len(by_key(records)) == len(records)
    assert read_records(bench["out"] / RECORDS) == records  # the file holds exactly what was returned
    for r in records:
        assert set(FIELDS) <= set(r)
        assert r["kind"] == "method" and r["group"] == group_of(r["category"])
        assert r["new_tokens"] == len(r["output_ids"]) == MAX_NEW  # no end-of-turn token in this vocabulary
        assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["wall_s"])
        assert r["text"] == bench["engine"].tokenizer.decode(r["output_ids"])
        assert sum(r["accepted_hist"]) == r["steps"]
        assert sum(k * n for k, n in enumerate(r["accepted_hist"])) == r["accepted"]
        assert r["mean_accepted"] == pytest.approx((r["accepted"] + r["steps"]) / r["steps"])
        assert r["draft_s"] >= 0 and r["verify_s"] > 0 and r["prefill_s"] > 0


def test_plain_decoding_accepts_one_token_per_step(bench):
    for r in bench["records"]:
        if r["method"] == "none":
            assert r["accepted"] == 0 and r["mean_accepted"] == 1.0 and r["steps"] == MAX_NEW - 1


def test_second_turn_follows_the_methods_own_first_answer(bench):
    engine, recs = bench["engine"], by_key(bench["records"])
    q = QUESTIONS[0]
    for name in bench["names"]:
        first = recs[(name, 81, 1)]
        messages = [
            {"role": "user", "content": q["turns"][0]},
            {"role": "assistant", "content": engine.tokenizer.decode(first["output_ids"])},
            {"role": "user", "content": q["turns"][1]},
        ]
        prompt = engine.tokenizer.encode_chat(messages)
        assert (name, tuple(prompt)) in bench["log"]
        assert recs[(name, 81, 2)]["prompt_tokens"] == len(prompt)


def test_lossless_flags_match_recomputed_equality(bench):
    recs = by_key(bench["records"])
    for (name, qid, turn), r in recs.items():
        if name == "none":
            assert r["lossless"] is None
        else:
            assert r["lossless"] == (r["output_ids"] == recs[("none", qid, turn)]["output_ids"])
    assert recs[("lossy", 81, 1)]["lossless"] is False
    assert recs[("lossy", 82, 1)]["lossless"] is True
    for name in drafters_under_test():  # real drafters are lossless in float64
        assert all(r["lossless"] for (n, _, _), r in recs.items() if n == name)


def test_methods_alternate_with_rotating_order_after_warm_up(bench):
    names = bench["names"]
    calls = [name for name, _ in bench["log"]]
    assert calls[: len(names)] == names  # one warm-up each
    expected = []
    for i, q in enumerate(QUESTIONS):
        for name in _rotated(names, i):
            expected += [name] * len(q["turns"])
    assert calls[len(names) :] == expected


def _manual_speedup(records, method, keep):
    def tput(name):
        rs = [r for r in records if r["method"] == name and keep(r)]
        return sum(r["new_tokens"] for r in rs) / sum(r["wall_s"] for r in rs)

    return tput(method) / tput("none")


def test_report_ratios_are_computed_from_the_records(bench):
    records = bench["records"]
    s = summarize(records)
    assert s.groups == ["Multi-turn Conversation", "Translation", "Summarization", "QA", "Math", "RAG"]
    assert all(s.speedup[name][g] is None for name in s.contenders for g in ("Translation", "Math"))
    assert s.contenders == bench["names"]
    for name in bench["names"]:
        for group in ("Multi-turn Conversation", "QA"):
            expected = _manual_speedup(records, name, lambda r, g=group: r["group"] == g)
            assert s.speedup[name][group] == pytest.approx(expected)
        assert s.speedup[name][OVERALL] == pytest.approx(_manual_speedup(records, name, lambda r: True))
        mine = [r for r in records if r["method"] == name]
        steps = sum(r["steps"] for r in mine)
        assert s.mean_accepted[name] == pytest.approx((sum(r["accepted"] for r in mine) + steps) / steps)
    assert s.speedup["none"][OVERALL] == pytest.approx(1.0)
    lossy = [r["lossless"] for r in records if r["method"] == "lossy"]
    assert s.matches["lossy"] == (sum(lossy), len(lossy)) and sum(lossy) < len(lossy)


def test_decode_phase_ratios_leave_the_prefill_out(bench):
    records = bench["records"]
    s = summarize(records)

    def decode_tput(name):
        rs = [r for r in records if r["method"] == name]
        return sum(r["new_tokens"] - 1 for r in rs) / sum(r["wall_s"] - r["prefill_s"] for r in rs)

    for name in bench["names"]:
        assert s.decode_speedup[name][OVERALL] == pytest.approx(decode_tput(name) / decode_tput("none"))
        mine = [r for r in records if r["method"] == name]
        steps = sum(r["steps"] for r in mine)
        draft, verify = s.step_ms[name]
        assert draft == pytest.approx(1e3 * sum(r["draft_s"] for r in mine) / steps)
        assert verify == pytest.approx(1e3 * sum(r["verify_s"] for r in mine) / steps)
    text = render_markdown(s, {})
    assert "## Decode phase" in text and f"{s.decode_speedup['lossy'][OVERALL]:.2f}x" in text
    # a peer reports no prefill time: no decode ratio for it rather than a wrong one
    peer = [dict(r, method="peer", kind="peer", prefill_s=None) for r in records if r["method"] == "none"]
    assert summarize(records + peer).decode_speedup["peer"][OVERALL] is None


def test_report_markdown_shows_the_numbers_and_flags_lossy(bench):
    s = summarize(bench["records"])
    text = render_markdown(s, {})
    table = text.split("\n\n")[2]
    lossy_row = next(line for line in table.splitlines() if line.startswith("| lossy"))
    assert "output differs from `none`" in lossy_row
    same, n = s.matches["lossy"]
    assert f"{same}/{n}" in lossy_row
    for name in drafters_under_test():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert "differs" not in row
        assert f"{s.speedup[name]['QA']:.2f}x" in row and f"{s.speedup[name][OVERALL]:.2f}x" in row
        assert f"{s.tokens_per_s[name]:.1f}" in row


def test_report_files_and_machine(bench):
    path = render_report(bench["records"], json.loads((bench["out"] / "run.json").read_text()), bench["out"])
    text = path.read_text()
    meta = json.loads((bench["out"] / "run.json").read_text())
    assert meta["settings"]["max_new_tokens"] == MAX_NEW and meta["machine"]["dtype"] == "float64"
    assert "- Model: `tiny-0`, dtype float64" in text and meta["machine"]["cpu"] in text
    for png in ("speedup.png", "accepted.png"):
        assert (bench["out"] / png).read_bytes()[:4] == b"\x89PNG"
        assert f"({png})" in text


def test_interrupted_run_keeps_records_and_resume_skips_them(tmp_path, questions):
    engine, log = tiny_engine_for(), []
    names = ["none"] + drafters_under_test()
    first = (
        [Logged(engine, "none", log)]
        + [Interrupted(engine, d, log, at_call=4) for d in names[1:2]]
        + [Logged(engine, d, log) for d in names[2:]]
    )
    with pytest.raises(KeyboardInterrupt):
        run_bench(engine, questions, first, max_new_tokens=MAX_NEW, out_dir=tmp_path, progress=False)
    kept = read_records(tmp_path / RECORDS)
    assert kept and len(kept) < 5 * len(names)
    with pytest.raises(LeapError, match="--resume"):
        run_bench(engine, questions, names, max_new_tokens=MAX_NEW, out_dir=tmp_path, progress=False)
    log.clear()
    again = [Logged(engine, n, log) for n in names]
    records = run_bench(
        engine,
        questions,
        again,
        max_new_tokens=MAX_NEW,
        out_dir=tmp_path,
        resume=True,
        progress=False,
        warmup=False,
    )
    done = {(r["method"], r["question_id"], r["turn"]) for r in kept}
    assert len(records) == 5 * len(names) and len(by_key(records)) == len(records)
    assert read_records(tmp_path / RECORDS) == records
    assert len(log) == len(records) - len(done)  # only the missing (method, question, turn) ran
    assert all(r["lossless"] for r in records if r["method"] != "none")
    log.clear()
    assert (
        run_bench(
            engine, questions, again, max_new_tokens=MAX_NEW, out_dir=tmp_path, resume=True, progress=False
        )
        == records
    )
    assert log == []  # nothing left to run: not even a warm-up


def test_resume_drops_a_record_cut_short_by_an_interruption(tmp_path, questions):
    engine = tiny_engine_for()
    qs = questions[2:3]
    run_bench(engine, qs, ["none"], max_new_tokens=4, out_dir=tmp_path, progress=False, warmup=False)
    path = tmp_path / RECORDS
    path.write_text(path.read_text() + '{"method": "pld", "question_')
    records = run_bench(
        engine,
        qs,
        ["none", "pld"],
        max_new_tokens=4,
        out_dir=tmp_path,
        resume=True,
        progress=False,
        warmup=False,
    )
    assert [r["method"] for r in read_records(path)] == ["none", "pld"] == [r["method"] for r in records]


def test_resume_refuses_other_settings(tmp_path, questions):
    engine = tiny_engine_for()
    run_bench(
        engine, questions[2:3], ["none"], max_new_tokens=4, out_dir=tmp_path, progress=False, warmup=False
    )
    with pytest.raises(LeapError, match="max_new_tokens=4"):
        run_bench(
            engine,
            questions[2:3],
            ["none"],
            max_new_tokens=5,
            out_dir=tmp_path,
            resume=True,
            progress=False,
            warmup=False,
        )


def test_sampling_runs_are_not_compared(questions):
    engine = tiny_engine_for()
    records = run_bench(
        engine,
        questions[2:3],
        ["none", "pld"],
        max_new_tokens=6,
        progress=False,
        sampling=SamplingParams(temperature=0.8, seed=1),
        warmup=False,
    )
    assert len(records) == 2 and all(r["lossless"] is None for r in records)


def test_unknown_method_and_duplicates_are_errors(questions):
    engine = tiny_engine_for()
    with pytest.raises(LeapError, match="unknown drafter 'nope'"):
        run_bench(engine, questions, ["none", "nope"], progress=False)
    with pytest.raises(LeapError, match="pld given twice"):
        run_bench(engine, questions, ["pld", "pld"], progress=False)
    with pytest.raises(LeapError, match="no questions"):
        run_bench(engine, [], ["none"], progress=False)


def test_report_needs_the_baseline():
    with pytest.raises(LeapError, match="no `none` run"):
        summarize(
            [
                {
                    "method": "pld",
                    "question_id": 1,
                    "turn": 1,
                    "category": "qa",
                    "new_tokens": 1,
                    "wall_s": 1.0,
                    "output_ids": [1],
                }
            ]
        )
