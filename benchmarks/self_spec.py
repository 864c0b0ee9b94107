"""Self-speculation (swift, ffn-skip, early-exit) against plain decoding, side by side in one process.

    python benchmarks/self_spec.py --per-group 1 --max-new-tokens 128
    python benchmarks/self_spec.py --methods none,swift --options '{"swift": {"max_opt_iter": 100}}'

Every method answers the same chat-templated first turn of Spec-Bench questions (the first N of each
Spec-Bench group), greedy, in a rotating order per question after one untimed warm-up each. SWIFT's
skip-set search runs inside the timed requests (it is part of its cost); the table also gives its
speed on the questions after the search stopped, when there are any. Speeds are ratios to plain
decoding measured in the same run; outputs are compared with plain decoding token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pick_per_group(questions, per_group: int, groups: list[str] | None = None):
    """The first `per_group` questions of each Spec-Bench group (in the file's order)."""
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for q in questions:
        if (groups and q.group not in groups) or taken[q.group] >= per_group:
            continue
        taken[q.group] += 1
        chosen.append(q)
    return chosen


def common_arguments(p: argparse.ArgumentParser, methods: str) -> None:
    p.add_argument("--data", default=None, help="question.jsonl (default: the bundled Spec-Bench)")
    p.add_argument("--per-group", type=int, default=1, help="questions per Spec-Bench group")
    p.add_argument("--groups", default=None, help="comma-separated group titles (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default=methods, help="comma-separated (default: %(default)s)")
    p.add_argument("--options", default="{}", help="JSON: drafter name -> options")
    p.add_argument("--json", default=None, help="also write every run to this JSON file")


def load_selected(args, engine):
    from leapdecode.bench.data import load_questions, spec_bench_path

    data = Path(args.data) if args.data else spec_bench_path()
    data = data if data.is_absolute() or data.exists() else REPO / data
    groups = args.groups.split(",") if args.groups else None
    questions = pick_per_group(load_questions(data), args.per_group, groups)
    return [(q, engine.encode_prompt(q.turns[0])) for q in questions]


def run_rotating(contenders, prompts, max_new_tokens: int, on_run=None, probe=None) -> list[dict]:
    """Each question by every contender, the order rotating per question; one untimed warm-up each.
    With `probe` (a callable giving the host's read bandwidth in GB/s), each record also holds
    `host_gbs`, the mean of a reading just before and just after its run."""
    from leapdecode.sampling import SamplingParams

    greedy = SamplingParams()
    for c in contenders:
        c.run(prompts[0][1], 8, greedy)
    records = []
    for i, (q, ids) in enumerate(prompts):
        order = contenders[i % len(contenders) :] + contenders[: i % len(contenders)]
        for c in order:
            before = probe() if probe else None
            run = c.run(ids, max_new_tokens, greedy)
            host = (before + probe()) / 2 if probe else None
            records.append(
                {
                    "method": c.name,
                    "question_id": q.question_id,
                    "group": q.group,
                    "index": i,
                    "prompt_tokens": len(ids),
                    "new_tokens": len(run.token_ids),
                    "wall_s": run.wall_s,
                    "prefill_s": run.prefill_s,
                    "steps": run.steps,
                    "accepted": run.accepted,
                    "draft_s": run.draft_s,
                    "host_gbs": host,
                    "token_ids": run.token_ids,
                }
            )
            if on_run:
                on_run(c, q, i)
            print(
                f"  q{q.question_id} {c.name:<14} {len(run.token_ids):4d} tokens {run.wall_s:7.2f} s",
                file=sys.stderr,
            )
    return records


def table(records: list[dict], baseline: str = "none", subset=None) -> str:
    """Markdown: per method, tok/s over all its runs, speed-up vs the baseline (with prefill, and of the
    decode phase alone: wall time after the target's prefill, a draft model's own prefill included),
    acceptance, equality."""
    rows = [r for r in records if subset is None or subset(r)]
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    base_runs = {r["index"]: r for r in by_method.get(baseline, [])}
    base_speed = _speed(by_method.get(baseline, []))
    base_decode = _speed(by_method.get(baseline, []), decode_only=True)
    lines = [
        "| method | questions | new tokens | tok/s | vs "
        + baseline
        + " | decode phase vs "
        + baseline
        + " | mean accepted | draft time share | same tokens as "
        + baseline
        + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in by_method.items():
        speed = _speed(runs)
        steps = sum(r["steps"] or 0 for r in runs)
        accepted = sum(r["accepted"] or 0 for r in runs)
        mean_acc = f"{(accepted + steps) / steps:.2f}" if steps else "-"
        share = (
            f"{sum(r['draft_s'] or 0 for r in runs) / sum(r['wall_s'] for r in runs):.0%}"
            if any(r["draft_s"] for r in runs)
            else "-"
        )
        same = sum(
            1
            for r in runs
            if r["index"] in base_runs and r["token_ids"] == base_runs[r["index"]]["token_ids"]
        )
        ratio = f"{speed / base_speed:.2f}x" if base_speed else "-"
        decode = _speed(runs, decode_only=True)
        decode_ratio = f"{decode / base_decode:.2f}x" if decode and base_decode else "-"
        lines.append(
            f"| {method} | {len(runs)} | {sum(r['new_tokens'] for r in runs)} | {speed:.2f} | {ratio} "
            f"| {decode_ratio} | {mean_acc} | {share} | {same}/{len(runs)} |"
        )
    return "\n".join(lines)


def _speed(runs: list[dict], decode_only: bool = False) -> float:
    """New tokens per second over `runs`; with `decode_only`, per second after prefill (0.0 when a run
    does not know its prefill time, e.g. a peer's)."""
    if decode_only and any(r.get("prefill_s") is None for r in runs):
        return 0.0
    wall = sum(r["wall_s"] - (r["prefill_s"] if decode_only else 0.0) for r in runs)
    return sum(r["new_tokens"] for r in runs) / wall if wall > 0 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF or Hugging Face folder (default: the bundled model)")
    common_arguments(p, "none,swift,ffn-skip,early-exit")
    args = p.parse_args(argv)

    from leapdecode.bench.methods import DrafterMethod
    from leapdecode.engine import Engine

    options = json.loads(args.options)
    engine = Engine.load(args.model, args.dtype, threads=args.threads, drafter_options=options)
    prompts = load_selected(args, engine)
    contenders = [DrafterMethod(engine, m) for m in args.methods.split(",")]
    swift = engine.drafter("swift") if "swift" in args.methods.split(",") else None
    searching_until: list[int] = []

    def note_search(c, q, i):
        if c.name == "swift" and swift.search.done and not searching_until:
            searching_until.append(i)

    print(
        f"{len(prompts)} questions, {args.max_new_tokens} new tokens, {engine.name}, {args.dtype}, "
        f"{args.threads} threads",
        file=sys.stderr,
    )
    records = run_rotating(contenders, prompts, args.max_new_tokens, note_search)
    print(
        f"## Self-speculation on {engine.name} ({args.dtype}, {args.threads} threads, greedy, "
        f"{args.max_new_tokens} new tokens)\n"
    )
    print(
        "Command: python benchmarks/self_spec.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "\n"
    )
    print(table(records))
    if swift is not None:
        print(
            f"\nswift: skip set {swift.skip_layers}, {swift.search.iterations} candidates scored, "
            "best window "
            f"score {swift.search.best_score}, search {'stopped' if swift.search.done else 'still running'}"
        )
        if swift.options.search and searching_until and searching_until[0] + 1 < len(prompts):
            after = searching_until[0] + 1
            print(f"\nQuestions after the search stopped ({len(prompts) - after}):\n")
            print(table(records, subset=lambda r: r["index"] >= after))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
