"""Every weight format side by side in one run: plain and `auto` per format, against llama.cpp.

For each configuration (backend:quant:activations) of the bundled model, our engine answers the same
Spec-Bench questions with drafter `none` and `auto`; llama.cpp (plain and prompt lookup) answers them on
the same GGUF. Everything runs through `leap bench`'s harness (contenders alternate question by
question, one warm-up each). Prints, per configuration: the verify cost curve, tokens/s (prefill
included), `auto` over plain, each over llama.cpp, and whether `auto`'s output equals plain decoding
*within that configuration* (the lossless check; different formats legitimately differ from each other).

    .venv/bin/python benchmarks/formats.py --per-group 5
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from leapdecode.bench.data import SPEC_BENCH, load_questions
from leapdecode.bench.methods import DrafterMethod
from leapdecode.bench.peers import PeerContext, make_peers
from leapdecode.bench.runner import run_bench
from leapdecode.costmodel import measure as measure_cost
from leapdecode.engine import Engine
from leapdecode.model.backends import build_runner
from leapdecode.model.linear import LinearSpec
from leapdecode.model.source import default_model_path, open_source

DEFAULT_CONFIGS = (
    "torch:none:float32,native:none:float32,native:gguf:float32,native:gguf:int8,native:int8:int8,"
    "native:int4:int8"
)
GROUPS = ["writing", "translation", "summarization", "qa", "math_reasoning", "rag"]


def method_name(drafter: str, config: str, configs: list[str]) -> str:
    """`drafter@config`; plain decoding on the first configuration is the harness's baseline, `none`."""
    return "none" if drafter == "none" and config == configs[0] else f"{drafter}@{config}"


class FormatMethod(DrafterMethod):
    """A drafter on one configuration's engine."""

    def __init__(self, engine: Engine, drafter: str, name: str):
        super().__init__(engine, drafter)
        self.name = name


def engines_for(configs: list[str]) -> dict[str, Engine]:
    source, tokenizer, path = open_source(None)
    out = {}
    for spec in configs:
        backend, quant, act = spec.split(":")
        runner, _ = build_runner(source, LinearSpec(backend, quant, act))
        out[spec] = Engine(runner, tokenizer, name=f"{path.name}:{spec}")
    return out


def summarize(records: list[dict], configs: list[str], ks: list[int], curves: dict) -> str:
    tok, sec, outs = defaultdict(int), defaultdict(float), defaultdict(dict)
    for r in records:
        tok[r["method"]] += r["new_tokens"]
        sec[r["method"]] += r["wall_s"]
        outs[r["method"]][(r["question_id"], r["turn"])] = r["output_ids"]

    def tps(m):
        return tok[m] / sec[m] if sec[m] else float("nan")

    lc = tps("llamacpp")
    lines = [
        "| config | " + " | ".join(f"k={k}" for k in ks) + " | plain tok/s | auto tok/s | auto / plain "
        "| plain / llama.cpp | auto / llama.cpp | auto output == plain |",
        "|---|" + "---|" * (len(ks) + 6),
    ]
    for spec in configs:
        plain, auto = method_name("none", spec, configs), method_name("auto", spec, configs)
        same = sum(outs[auto].get(key) == out for key, out in outs[plain].items())
        lines.append(
            f"| {spec} | "
            + " | ".join(f"{curves[spec][k] * 1e3:.1f}" for k in ks)
            + f" | {tps(plain):.1f} | {tps(auto):.1f} | {tps(auto) / tps(plain):.2f}x"
            f" | {tps(plain) / lc:.2f}x"
            f" | {tps(auto) / lc:.2f}x | {same}/{len(outs[plain])} |"
        )
    lines.append(
        f"\nllama.cpp plain {lc:.1f} tok/s, prompt lookup {tps('llamacpp-pld'):.1f} tok/s; "
        "k columns: ms for a forward of k tokens after 256 cached (best of 3)."
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default=str(SPEC_BENCH), help="question.jsonl (default: the bundled Spec-Bench)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-group", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated backend:quant:activations")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--out", default=None, help="results folder (default: bench_results/formats-<date-time>)")
    args = ap.parse_args()
    args.out = args.out or time.strftime("bench_results/formats-%Y%m%d-%H%M%S")
    if Path(args.out, "records.jsonl").exists():  # checked before minutes of loading, not after
        ap.error(f"--out: {args.out} already holds results; choose another folder")
    torch.set_num_threads(args.threads)
    configs, ks = args.configs.split(","), [int(k) for k in args.ks.split(",")]
    engines = engines_for(configs)
    curves = {}
    for spec, eng in engines.items():
        with eng.compute_scope():
            curve = measure_cost(eng.model, tuple(sorted(set(ks))))
        curves[spec] = dict(zip(curve.ks, curve.seconds))
    methods = [
        FormatMethod(eng, d, method_name(d, spec, configs))
        for spec, eng in engines.items()
        for d in ("none", "auto")
    ]
    ctx = PeerContext(
        model_path=default_model_path(),
        dtype=torch.float32,
        eos_ids=frozenset(next(iter(engines.values())).tokenizer.eos_ids),
        threads=args.threads,
        n_ctx=4096,
    )
    questions = load_questions(args.data, categories=GROUPS, per_category=args.per_group)
    base = engines[configs[0]]
    records = run_bench(
        base,
        questions,
        methods,
        make_peers(["llamacpp", "llamacpp-pld"], ctx),
        max_new_tokens=args.max_new_tokens,
        out_dir=args.out,
    )
    text = summarize(records, configs, ks, curves)
    Path(args.out, "formats.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
