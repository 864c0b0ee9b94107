"""llama.cpp's own draft-model speculative decoding against its own plain decoding, side by side.

    benchmarks/setup_peers.sh --speculative              # once: builds llama.cpp's tools (see there)
    python benchmarks/models.py fetch qwen-pair          # once: both GGUF files into the user cache
    python benchmarks/llamacpp_speculative.py --per-category 2 --max-new-tokens 64 --threads 2 \\
        --json bench_results/llamacpp_speculative.json

Both contenders are llama.cpp command-line tools from one build (the llama.cpp that llama-cpp-python,
the `llamacpp` peer of `leap bench`, vendors, built with the same flags): `llama-completion` decodes
plainly, `llama-speculative-simple --spec-type draft-simple` has the draft model propose up to
`--draft-max` tokens (llama.cpp's default: 3) that the target verifies in one batch. Greedy (temp 0,
top-k 1), the same threads for target and draft, a fresh process per turn (the timings are the tools'
own, which leave model loading out).

The questions are `leap bench`'s: Spec-Bench's, the first N of each category, MT-bench's with both
turns (the second after the contender's own first answer), each turn formatted by the target's chat
template as `leap bench` formats it (our tokenizer renders the text; llama.cpp reads its special tokens
back as the same ids, which the prompt token counts check). Contenders alternate question by question
in a rotating order after one untimed warm-up each. Tokens/s counts every sampled token (an end-of-text
one included) over prefill + decoding ("with prefill"), or over decoding alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import model_path

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # benchmarks/setup_peers.sh's
PLAIN, SPECULATIVE = "llama.cpp plain", "llama.cpp draft-model"
WARMUP_PROMPT = "Say hello."


@dataclass(frozen=True)
class Timing:
    """One run as the tool printed it."""

    prompt_tokens: int
    prefill_s: float
    new_tokens: int
    decode_s: float
    drafted: int = 0
    accepted: int = 0


_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
_SPEC_RES = {
    "encoded": re.compile(rf"encoded\s+(\d+) tokens in\s+{_NUMBER} seconds"),
    "decoded": re.compile(rf"decoded\s+(\d+) tokens in\s+{_NUMBER} seconds"),
    "drafted": re.compile(r"n_drafted\s*=\s*(\d+)"),
    "accepted": re.compile(r"n_accept\s*=\s*(\d+)"),
}
_PERF_RES = {
    "prompt": re.compile(rf"prompt eval time =\s*{_NUMBER} ms /\s*(\d+) tokens"),
    "eval": re.compile(rf"\beval time =\s*{_NUMBER} ms /\s*(\d+) runs"),
    "sampling": re.compile(rf"sampling time =\s*{_NUMBER} ms"),
}


def _find(pattern: re.Pattern, log: str, what: str) -> tuple[str, ...]:
    found = pattern.findall(log)
    if not found:
        raise ValueError(f"llama.cpp's log has no {what} line (expected /{pattern.pattern}/)")
    last = found[-1]  # the target's line where the draft model prints one too
    return last if isinstance(last, tuple) else (last,)


def parse_speculative(log: str) -> Timing:
    """`llama-speculative-simple`'s summary: prefill is the "encoded" span (the target's and the draft
    model's prefill), decoding the "decoded" span (drafting, verification and sampling)."""
    n_in, enc = _find(_SPEC_RES["encoded"], log, "'encoded N tokens'")
    n_out, dec = _find(_SPEC_RES["decoded"], log, "'decoded N tokens'")
    (drafted,) = _find(_SPEC_RES["drafted"], log, "n_drafted")
    (accepted,) = _find(_SPEC_RES["accepted"], log, "n_accept")
    return Timing(int(n_in), float(enc), int(n_out), float(dec), int(drafted), int(accepted))


def parse_completion(log: str) -> Timing:
    """`llama-completion`'s perf summary: prefill is the prompt's evaluation, decoding the evaluation
    of every sampled token but the last plus all sampling; sampled tokens = evaluations + 1."""
    p_ms, p_tokens = _find(_PERF_RES["prompt"], log, "'prompt eval time'")
    e_ms, runs = _find(_PERF_RES["eval"], log, "'eval time'")
    (s_ms,) = _find(_PERF_RES["sampling"], log, "'sampling time'")
    decode_s = (float(e_ms) + float(s_ms)) / 1000
    return Timing(int(p_tokens), float(p_ms) / 1000, int(runs) + 1, decode_s)


def speculative_answer(stdout: bytes, prompt: str) -> str:
    """The generated text: the tool echoes the prompt's tokens after two newlines, then the answer,
    then two newlines for the end of decoding and two more at exit."""
    head = b"\n\n" + prompt.encode()
    if not stdout.startswith(head):
        raise ValueError("llama-speculative-simple did not echo the prompt as sent (tokenization differs)")
    return stdout[len(head) :].removesuffix(b"\n\n\n\n").decode(errors="replace")


def completion_answer(stdout: bytes) -> str:
    """The generated text of `llama-completion --no-display-prompt`, without its end markers."""
    text = stdout.removesuffix(b"\n\n").removesuffix(b" [end of text]\n")
    return text.decode(errors="replace")


@dataclass(frozen=True)
class Tools:
    """Where the tools are and what the run passes to every one of them."""

    bin: Path
    target: Path
    draft: Path
    threads: int
    ctx: int

    def common(self, prompt: str, max_new_tokens: int) -> list[str]:
        return [
            *("-m", str(self.target), "-p", prompt, "-n", str(max_new_tokens)),
            *("-t", str(self.threads), "-tb", str(self.threads), "-c", str(self.ctx)),
            *("--temp", "0", "--top-k", "1", "--seed", "0", "--no-escape"),
        ]

    def plain(self, prompt: str, max_new_tokens: int) -> list[str]:
        exe = str(self.bin / "llama-completion")
        return [exe, *self.common(prompt, max_new_tokens), "-no-cnv", "--no-display-prompt"]

    def speculative(self, prompt: str, max_new_tokens: int, draft_max: int) -> list[str]:
        # the tool samples one token past -n: ask for one fewer so both sample max_new_tokens
        exe = str(self.bin / "llama-speculative-simple")
        args = [exe, *self.common(prompt, max_new_tokens - 1), "--spec-type", "draft-simple"]
        return args + [
            *("-md", str(self.draft), "--spec-draft-n-max", str(draft_max)),
            *("-td", str(self.threads), "-tbd", str(self.threads)),
        ]


@dataclass(frozen=True)
class Contender:
    name: str
    draft_max: int  # 0: plain decoding

    def run(self, tools: Tools, prompt: str, max_new_tokens: int) -> tuple[Timing, str]:
        if self.draft_max == 0:
            out = _run_tool(tools.plain(prompt, max_new_tokens))
            return parse_completion(out.stderr.decode(errors="replace")), completion_answer(out.stdout)
        out = _run_tool(tools.speculative(prompt, max_new_tokens, self.draft_max))
        answer = speculative_answer(out.stdout, prompt)
        return parse_speculative(out.stderr.decode(errors="replace")), answer


def _run_tool(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    if out.returncode != 0:
        tail = out.stderr.decode(errors="replace")[-2000:]
        raise SystemExit(f"{Path(cmd[0]).name} exited with {out.returncode}:\n{tail}")
    return out


def run_question(contender: Contender, tools: Tools, tokenizer, q, max_new_tokens: int) -> list[dict]:
    """Every turn of one question, each after the contender's own previous answers (as `leap bench`)."""
    messages: list[dict] = []
    records = []
    for turn, text in enumerate(q.turns, start=1):
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.render_chat(messages)
        timing, answer = contender.run(tools, prompt, max_new_tokens)
        ours = len(tokenizer.encode_chat(messages))
        records.append(_record(contender, q, turn, ours, timing, answer))
        messages.append({"role": "assistant", "content": answer})
    return records


def _record(contender: Contender, q, turn: int, our_prompt_tokens: int, timing: Timing, answer: str) -> dict:
    return {
        "method": contender.name,
        "draft_max": contender.draft_max,
        "question_id": q.question_id,
        "category": q.category,
        "group": q.group,
        "turn": turn,
        "our_prompt_tokens": our_prompt_tokens,  # llama.cpp's count (prompt_tokens) must equal it
        **asdict(timing),
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine slows llama.cpp's thread barriers
        "answer": answer,
    }


def run_rotating(contenders: list[Contender], tools: Tools, tokenizer, questions, max_new_tokens: int, save):
    """Each question by every contender, the order rotating per question; one untimed warm-up each.
    `save(records)` runs after every question, so an interrupted run keeps what it measured."""
    for c in contenders:
        c.run(tools, tokenizer.render_chat([{"role": "user", "content": WARMUP_PROMPT}]), 8)
    records: list[dict] = []
    for i, q in enumerate(questions):
        shift = i % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            records += run_question(c, tools, tokenizer, q, max_new_tokens)
            last = records[-1]
            print(
                f"q{q.question_id} {c.name}: {last['new_tokens']} tokens, {_tps(last):.2f} tok/s", flush=True
            )
        save(records)
    return records


def _tps(rec: dict, prefill: bool = True) -> float:
    return rec["new_tokens"] / (rec["decode_s"] + (rec["prefill_s"] if prefill else 0.0))


def summarize(records: list[dict], method: str) -> dict:
    """Sums over one contender's turns. Every verification step of llama-speculative-simple samples
    its accepted draft tokens plus one, so steps = sampled - accepted."""
    mine = [r for r in records if r["method"] == method]
    tot = {k: sum(r[k] for r in mine) for k in ("new_tokens", "prefill_s", "decode_s", "drafted", "accepted")}
    return {
        "turns": len(mine),
        **tot,
        "tps": tot["new_tokens"] / (tot["prefill_s"] + tot["decode_s"]),
        "decode_tps": tot["new_tokens"] / tot["decode_s"],
        "acceptance": tot["accepted"] / tot["drafted"] if tot["drafted"] else None,
        "tokens_per_step": tot["new_tokens"] / (tot["new_tokens"] - tot["accepted"]),
        "same_prompt": sum(r["prompt_tokens"] == r["our_prompt_tokens"] for r in mine),
    }


def same_answers(records: list[dict], method: str) -> tuple[int, int]:
    """(turns whose answer agrees with plain decoding's up to the shorter of the two, turns compared).
    The speculative tool stops after the step that reaches the budget, up to a draft's length late."""
    plain = {(r["question_id"], r["turn"]): r["answer"] for r in records if r["method"] == PLAIN}
    mine = [r for r in records if r["method"] == method and (r["question_id"], r["turn"]) in plain]
    agree = 0
    for r in mine:
        a, b = sorted((r["answer"], plain[(r["question_id"], r["turn"])]), key=len)
        agree += b.startswith(a)
    return agree, len(mine)


def paired_median(records: list[dict], method: str) -> float:
    """Median over turns of the method's tokens/s (with prefill) over plain decoding's on the same turn:
    a turn that met a burst of other work on the machine moves it less than it moves the sums."""
    plain = {(r["question_id"], r["turn"]): _tps(r) for r in records if r["method"] == PLAIN}
    ratios = sorted(
        _tps(r) / plain[(r["question_id"], r["turn"])]
        for r in records
        if r["method"] == method and (r["question_id"], r["turn"]) in plain
    )
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def table(records: list[dict], methods: list[str]) -> str:
    base = summarize(records, PLAIN)
    columns = [
        "method",
        "turns",
        "tok/s (with prefill)",
        "vs plain",
        "median of turns' ratios",
        "decode tok/s",
        "vs plain",
        "tokens per step",
        "acceptance (accepted / drafted)",
        "answer agrees with plain",
        "prompt tokens as ours",
    ]
    rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for m in methods:
        s = summarize(records, m)
        same, n = same_answers(records, m)
        acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.1%} ({s['accepted']} / {s['drafted']})"
        rows.append(
            f"| {m} | {s['turns']} | {s['tps']:.2f} | {s['tps'] / base['tps']:.2f}x "
            f"| {paired_median(records, m):.2f}x | {s['decode_tps']:.2f} "
            f"| {s['decode_tps'] / base['decode_tps']:.2f}x | {s['tokens_per_step']:.2f} | {acc} "
            f"| {same}/{n} | {s['same_prompt']}/{s['turns']} |"
        )
    return "\n".join(rows)


def group_table(records: list[dict], methods: list[str]) -> str:
    """Speculative tokens/s (with prefill) over plain's, per Spec-Bench group."""
    groups = list(dict.fromkeys(r["group"] for r in records))
    rows = ["| method | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for m in methods[1:]:
        cells = []
        for g in groups:
            mine = [r for r in records if r["group"] == g]
            cells.append(f"{summarize(mine, m)['tps'] / summarize(mine, PLAIN)['tps']:.2f}x")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def build_dir() -> Path:
    cache = os.environ.get("LEAPDECODE_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leapdecode"
    )
    return Path(cache) / "peers" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}" / "build-tools"


def build_flags(bin_dir: Path) -> str:
    stamp = bin_dir.parent / "leap_build.txt"
    return " / ".join(stamp.read_text().split("\n")).strip(" /") if stamp.is_file() else "unknown"


def header(args, tools: Tools, n_questions: int) -> str:
    from leapdecode.cpu import cpu_model

    return "\n".join(
        [
            f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs",
            f"- llama.cpp: llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s, {build_flags(tools.bin)}",
            f"- target {tools.target.name}, draft {tools.draft.name}; {tools.threads} threads each",
            (
                f"- prompts: Spec-Bench, the first {args.per_category} of each category "
                f"({n_questions} questions; MT-bench with both turns), chat template; "
                f"{args.max_new_tokens} new tokens, greedy"
            ),
        ]
    )


def _cached(given: str | None, name: str) -> Path:
    path = Path(given).expanduser() if given else model_path(name)
    if not path.is_file():
        hint = "" if given else "; run: python benchmarks/models.py fetch qwen-pair"
        raise SystemExit(f"model file not found: {path}{hint}")
    return path


def _tools(args) -> Tools:
    bin_dir = Path(args.bin).expanduser() if args.bin else build_dir() / "bin"
    for exe in ("llama-completion", "llama-speculative-simple"):
        if not (bin_dir / exe).is_file():
            raise SystemExit(f"{bin_dir / exe} is missing; run: benchmarks/setup_peers.sh --speculative")
    target, draft = _cached(args.target, "qwen-1.5b"), _cached(args.draft, "qwen-0.5b")
    return Tools(bin_dir, target, draft, args.threads, args.ctx)


def _draft_maxes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"--draft-max: expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="target GGUF (default: the cached qwen-1.5b)")
    p.add_argument("--draft", default=None, help="draft GGUF (default: the cached qwen-0.5b)")
    p.add_argument("--bin", default=None, help="llama.cpp tools folder (default: setup_peers.sh's build)")
    p.add_argument("--data", default=None, help="question.jsonl (default: the bundled Spec-Bench)")
    p.add_argument("--categories", default=None, help="comma-separated (default: all)")
    p.add_argument("--per-category", type=int, default=2, help="first N questions of each category")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=4096, help="context size of both models")
    p.add_argument("--draft-max", default="3", help="comma-separated draft lengths, one contender each")
    p.add_argument("--json", default=None, help="also write the records and the tables to this JSON file")
    p.add_argument(
        "--report", default=None, help="only print the tables of a --json file (even a partial one)"
    )
    args = p.parse_args(argv)
    if args.max_new_tokens < 2 or args.threads < 1 or args.per_category < 1:
        p.error("--max-new-tokens must be >= 2, --threads and --per-category >= 1")
    return args


def main(argv=None) -> int:
    from leapdecode.bench.data import load_questions, spec_bench_path
    from leapdecode.model.source import open_source

    args = parse_args(argv)
    tools = _tools(args)
    if args.report:
        return report_only(args, tools)
    maxes = _draft_maxes(args.draft_max)
    names = [SPECULATIVE] if len(maxes) == 1 else [f"{SPECULATIVE} (max {n})" for n in maxes]
    contenders = [Contender(PLAIN, 0)] + [Contender(name, n) for name, n in zip(names, maxes)]
    categories = args.categories.split(",") if args.categories else None
    questions = load_questions(args.data or spec_bench_path(), categories, args.per_category)
    _, tokenizer, _ = open_source(tools.target)
    methods = [c.name for c in contenders]

    def save(records: list[dict], report: str | None = None) -> None:
        if args.json:
            doc = {"report": report, "args": vars(args), "records": records}
            Path(args.json).write_text(json.dumps(doc, indent=1))

    records = run_rotating(contenders, tools, tokenizer, questions, args.max_new_tokens, save)
    report = render(records, methods, header(args, tools, len(questions)))
    print("\n" + report)
    save(records, report)
    return 0


def report_only(args, tools: Tools) -> int:
    doc = json.loads(Path(args.report).read_text())
    records = doc["records"]
    for key in ("per_category", "max_new_tokens"):
        setattr(args, key, doc["args"][key])
    methods = list(dict.fromkeys(r["method"] for r in records))
    n_questions = len({r["question_id"] for r in records})
    print(render(records, methods, header(args, tools, n_questions)))
    return 0


def render(records: list[dict], methods: list[str], head: str) -> str:
    loads = [r["loadavg_1m"] for r in records if "loadavg_1m" in r]
    if loads:
        head += f"\n- 1-minute load average at the runs' ends: {min(loads):.1f}-{max(loads):.1f}"
    report = "\n\n".join([head, table(records, methods)])
    return report + "\n\nPer group, tokens/s (with prefill) over plain:\n\n" + group_table(records, methods)


if __name__ == "__main__":
    sys.exit(main())
