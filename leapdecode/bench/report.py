"""The benchmark report, computed from records only: markdown in Spec-Bench's layout and PNG plots.

Speedup of a contender in a group = its throughput / plain decoding's (`none`) throughput, where
throughput = sum of new tokens / sum of wall seconds over the (question, turn) pairs that both answered
in that group. Rendering needs nothing but ``records.jsonl`` (and ``run.json`` for the machine), so a
saved run can be re-rendered at any time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from leapdecode.bench.data import GROUPS, group_of
from leapdecode.bench.runner import BASELINE, RECORDS, read_meta, read_records
from leapdecode.errors import LeapError

OVERALL = "Overall"
HIST_CAP = 16
DEFINITIONS = (
    "Speedup = (sum of new tokens / sum of wall seconds) of a method divided by the same for our plain "
    "decoding `none`, over the (question, turn) pairs both answered in that group; wall time is the whole "
    "generate call (prefill included), every contender in the same process, alternating question by "
    "question. #Mean Accepted Tokens = tokens committed per verification step, the bonus token included "
    '(1.00 = plain decoding). "Same output" compares the output token ids with `none`\'s on the same '
    "question and turn (Spec-Bench's equal.py check)."
)  # accepted-token histogram: longer steps are counted in the last bar


DECODE_DEFINITIONS = (
    "Decode speedup = (new tokens - 1) / (wall - prefill seconds) of a method over the same for `none`: "
    "the steps after the prompt's forward, which is the same for every method. Draft ms/step counts "
    "proposing and learning from each step; verify ms/step the target's forward over the draft and the "
    "acceptance."
)


def throughput(records: Sequence[dict]) -> float | None:
    wall = sum(r["wall_s"] for r in records)
    return sum(r["new_tokens"] for r in records) / wall if wall > 0 else None


def decode_throughput(records: Sequence[dict]) -> float | None:
    """Tokens per second after prefill: the first token comes from the prefill, the rest from steps."""
    if any(r.get("prefill_s") is None for r in records):
        return None  # peers do not report their prefill
    wall = sum(r["wall_s"] - r["prefill_s"] for r in records)
    return sum(r["new_tokens"] - 1 for r in records) / wall if wall > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class Summary:
    contenders: list[str]
    kinds: dict[str, str]
    groups: list[str]
    categories: list[str]
    speedup: dict[str, dict[str, float | None]] = field(
        default_factory=dict
    )  # [c][group | category | Overall]
    tokens_per_s: dict[str, float | None] = field(default_factory=dict)
    mean_accepted: dict[str, float | None] = field(default_factory=dict)
    decode_speedup: dict[str, dict[str, float | None]] = field(
        default_factory=dict
    )  # as speedup, prefill out
    step_ms: dict[str, tuple[float, float] | None] = field(
        default_factory=dict
    )  # c -> (draft, verify) per step
    matches: dict[str, tuple[int, int]] = field(default_factory=dict)  # c -> (equal to none, compared)
    accepted_hist: dict[str, list[int]] = field(default_factory=dict)
    best: str = BASELINE
    versus_peers: dict[str, dict[str, float | None]] = field(default_factory=dict)  # peer -> {best, none}


def summarize(records: Sequence[dict]) -> Summary:
    if not records:
        raise LeapError("no records to report")
    by: dict[str, dict[tuple, dict]] = {}
    kinds: dict[str, str] = {}
    for r in records:
        by.setdefault(r["method"], {})[(r["question_id"], r["turn"])] = r
        kinds.setdefault(r["method"], r.get("kind", "method"))
    if BASELINE not in by:
        raise LeapError(f"the records have no `{BASELINE}` run: it is the baseline of every ratio")
    contenders = [BASELINE] + [c for c in by if c != BASELINE]
    group_names = {group_of(r["category"]) for r in records}
    groups = list(GROUPS) + sorted(group_names - set(GROUPS))  # Spec-Bench's six columns, always
    categories = sorted({r["category"] for r in records})
    s = Summary(contenders, kinds, groups, categories)
    for c in contenders:
        _fill(s, c, by[c], by[BASELINE])
    s.best = max((c for c in contenders if kinds[c] == "method"), key=lambda c: s.speedup[c][OVERALL] or 0.0)
    for peer in (c for c in contenders if kinds[c] == "peer"):
        s.versus_peers[peer] = {name: _pair_ratio(by[name], by[peer]) for name in (s.best, BASELINE)}
    return s


def _fill(s: Summary, c: str, mine: dict[tuple, dict], base: dict[tuple, dict]) -> None:
    shared = [k for k in mine if k in base]

    def speed(keep, of=throughput) -> float | None:
        keys = [k for k in shared if keep(mine[k])]
        return ratio(of([mine[k] for k in keys]), of([base[k] for k in keys])) if keys else None

    for table, of in ((s.speedup, throughput), (s.decode_speedup, decode_throughput)):
        table[c] = {g: speed(lambda r, g=g: group_of(r["category"]) == g, of) for g in s.groups}
        table[c].update({cat: speed(lambda r, cat=cat: r["category"] == cat, of) for cat in s.categories})
        table[c][OVERALL] = speed(lambda r: True, of)
    s.tokens_per_s[c] = throughput(list(mine.values()))
    steps = [r for r in mine.values() if r.get("steps")]
    n_steps = sum(r["steps"] for r in steps)
    s.mean_accepted[c] = (sum(r["accepted"] for r in steps) + n_steps) / n_steps if n_steps else None
    timed = [r for r in steps if r.get("draft_s") is not None and r.get("verify_s") is not None]
    n_timed = sum(r["steps"] for r in timed)
    s.step_ms[c] = (
        (1e3 * sum(r["draft_s"] for r in timed) / n_timed, 1e3 * sum(r["verify_s"] for r in timed) / n_timed)
        if n_timed
        else None
    )
    checked = [r["lossless"] for r in mine.values() if r.get("lossless") is not None]
    s.matches[c] = (sum(checked), len(checked))
    hist: list[int] = []
    for r in mine.values():
        for k, n in enumerate(r.get("accepted_hist") or []):
            hist.extend([0] * (k + 1 - len(hist)))
            hist[k] += n
    s.accepted_hist[c] = hist


def _pair_ratio(ours: dict[tuple, dict], peer: dict[tuple, dict]) -> float | None:
    keys = [k for k in ours if k in peer]
    return ratio(throughput([ours[k] for k in keys]), throughput([peer[k] for k in keys])) if keys else None


# ------------------------------------------------------------------ markdown


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _label(s: Summary, c: str) -> str:
    same, n = s.matches[c]
    if s.kinds[c] == "method" and same < n:
        return f"{c} **(output differs from `none`!)**"
    return c if s.kinds[c] == "method" else f"{c} (peer)"


def _match(s: Summary, c: str) -> str:
    same, n = s.matches[c]
    return "baseline" if c == BASELINE else ("-" if n == 0 else f"{same}/{n} ({100 * same / n:.0f}%)")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def main_table(s: Summary) -> list[str]:
    header = ["Method"] + s.groups + ["#Mean Accepted Tokens", OVERALL, "tokens/s", "same output as `none`"]
    rows = [
        [_label(s, c)]
        + [_x(s.speedup[c][g]) for g in s.groups]
        + [_num(s.mean_accepted[c]), _x(s.speedup[c][OVERALL]), _num(s.tokens_per_s[c], 1), _match(s, c)]
        for c in s.contenders
    ]
    return _table(header, rows)


def decode_table(s: Summary) -> list[str]:
    """The decode phase alone: prefill is the same computation for every method, and on a CPU it can
    take half the wall time of a long prompt, which hides what speculation does to the steps."""

    def ms(c: str, i: int) -> str:
        step = s.step_ms.get(c)
        return "-" if step is None else f"{step[i]:.2f}"

    methods = [c for c in s.contenders if s.kinds[c] == "method"]
    rows = [
        [c]
        + [_x(s.decode_speedup[c][g]) for g in s.groups]
        + [_x(s.decode_speedup[c][OVERALL]), ms(c, 0), ms(c, 1)]
        for c in methods
    ]
    return _table(["Method"] + s.groups + [OVERALL, "draft ms/step", "verify ms/step"], rows)


def category_table(s: Summary) -> list[str]:
    rows = [[_label(s, c)] + [_x(s.speedup[c][cat]) for cat in s.categories] for c in s.contenders]
    return _table(["Method"] + s.categories, rows)


def peers_table(s: Summary) -> list[str]:
    ours = [s.best, BASELINE] if s.best != BASELINE else [BASELINE]
    rows = [[p] + [_x(v[name]) for name in ours] + [_match(s, p)] for p, v in s.versus_peers.items()]
    return _table(
        ["Peer"]
        + [f"speedup of our `{name}` over it" for name in ours]
        + [f"same output as our `{BASELINE}`"],
        rows,
    )


def machine_lines(meta: dict) -> list[str]:
    m, st = meta.get("machine", {}), meta.get("settings", {})
    if not m:
        return ["(no run.json: machine not recorded)"]
    flags = ", ".join(m.get("cpu_flags") or []) or "flags unknown"
    cpu = f"{m.get('cpu')} ({flags}); {m.get('physical_cores')} cores, {m.get('logical_cpus')} logical CPUs"
    lines = [
        f"- CPU: {cpu}; {m.get('threads')} threads",
        (
            f"- Model: `{st.get('model', m.get('model'))}`, dtype {st.get('dtype', m.get('dtype'))}, "
            f"kernels {m.get('backend', 'torch')} ({m.get('kernels', 'instruction set not recorded')})"
        ),
        f"- torch {m.get('torch')}, Python {m.get('python')}, {m.get('os')}, "
        + f"leapdecode {m.get('leapdecode')}",
        f"- Date: {m.get('date')}"
        + (f" (resumed {', '.join(meta['resumed'])})" if meta.get("resumed") else ""),
        f"- Budget: max {st.get('max_new_tokens')} new tokens, temperature {st.get('temperature')}",
    ]
    if meta.get("command"):
        lines.append(f"- Command: `{meta['command']}`")
    return lines


def peer_lines(meta: dict, s: Summary) -> list[str]:
    lines = []
    for name in (c for c in s.contenders if s.kinds[c] == "peer"):
        d = meta.get("contenders", {}).get(name, {})
        version = f" {d['version']}" if d.get("version") else ""
        build = f", build: {d['build']}" if d.get("build") else ""
        lines.append(
            f"- `{name}`: {d.get('engine', name)}{version}{build}; {d.get('compute', 'compute not recorded')}"
        )
    return lines


def render_markdown(s: Summary, meta: dict, plots: Sequence[str] = ()) -> str:
    out = ["# leapdecode on Spec-Bench", "", "## Speedup over plain decoding (`none`)", ""]
    out += main_table(s)
    out += ["", DEFINITIONS]
    if (meta.get("settings", {}).get("temperature") or 0) > 0:
        out += ["", "Sampling (temperature > 0): outputs differ by chance, so they are not compared."]
    if s.versus_peers:
        out += ["", "## Against the peers (same model file, prompts as token ids, threads, budget)", ""]
        out += peers_table(s) + [""] + peer_lines(meta, s)
    out += ["", "## Decode phase: speedup with prefill excluded, and time per step", ""] + decode_table(s)
    out += ["", DECODE_DEFINITIONS]
    out += ["", "## Per category", ""] + category_table(s)
    out += ["", "## Machine", ""] + machine_lines(meta)
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ plots


def pyplot():
    """matplotlib's pyplot, drawing to files; an optional extra, so its absence is a user's error."""
    try:
        import matplotlib
    except ImportError:
        raise LeapError(
            "the report's plots need matplotlib, an optional extra: pip install 'leapdecode[report]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedups(s: Summary, path: Path) -> None:
    plt = pyplot()
    shown = [c for c in s.contenders if c != BASELINE]
    cols = [g for g in s.groups if s.speedup[BASELINE][g] is not None] + [OVERALL]  # groups that ran
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cols)) + 1.8, 4.0))
    width = 0.8 / max(1, len(shown))
    for i, c in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cols))]
        hatch = "//" if s.kinds[c] == "peer" else None  # peers stand out from our methods
        ax.bar(xs, [s.speedup[c][g] or 0.0 for g in cols], width, label=c, hatch=hatch)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_ylabel(f"speedup over {BASELINE} (plain decoding)")
    ax.set_title("Speedup per Spec-Bench group")
    if shown:  # beside the axes: with many contenders a legend inside hides bars
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def capped(hist: list[int], cap: int = HIST_CAP) -> list[int]:
    return hist[:cap] + [sum(hist[cap:])] if len(hist) > cap else list(hist)


def plot_accepted(s: Summary, path: Path) -> None:
    plt = pyplot()
    shown = [c for c in s.contenders if s.accepted_hist.get(c) and c != BASELINE] or [BASELINE]
    hists = {c: capped(s.accepted_hist.get(c) or [0]) for c in shown}
    n = max(len(h) for h in hists.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n + 2) + 1.8, 4.0))
    width = 0.8 / len(shown)
    for i, c in enumerate(shown):
        total = sum(hists[c]) or 1
        xs = [k + 1 + (i - (len(shown) - 1) / 2) * width for k in range(len(hists[c]))]
        ax.bar(xs, [v / total for v in hists[c]], width, label=c)
    labels = [str(k + 1) for k in range(n)]
    if any(len(s.accepted_hist.get(c) or []) > HIST_CAP for c in shown):
        labels[-1] += "+"
    ax.set_xticks(range(1, n + 1), labels)
    ax.set_xlabel("tokens committed per step (accepted draft tokens + 1)")
    ax.set_ylabel("fraction of steps")
    ax.set_title("Accepted tokens per verification step")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(records: Sequence[dict], meta: dict, out_dir: str | Path) -> Path:
    """Write report.md, speedup.png and accepted.png into `out_dir`; returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(records)
    plots = [out / "speedup.png", out / "accepted.png"]
    plot_speedups(s, plots[0])
    plot_accepted(s, plots[1])
    path = out / "report.md"
    path.write_text(render_markdown(s, meta, [str(p) for p in plots]), encoding="utf-8")
    return path


def render_dir(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Re-render the report of a saved run from its records.jsonl (and run.json)."""
    run = Path(run_dir)
    if not (run / RECORDS).is_file():
        raise LeapError(f"--report: no {RECORDS} in {run_dir}")
    return render_report(read_records(run / RECORDS), read_meta(run), out_dir or run)
