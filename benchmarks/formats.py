"""End-to-end speed per backend and weight format, side by side in one process.

For each configuration (backend/quant/activations) of the bundled model: the cost of one forward of k
new tokens (`leapdecode.costmodel.measure`) and greedy decoding speed with drafter none and pld on a few
Spec-Bench prompts. Configurations take turns per prompt so machine noise hits them alike. Ratios
against the float32 torch reference are printed with the table.

    .venv/bin/python benchmarks/formats.py --data ../shared/data/spec_bench/question.jsonl --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from leapdecode.costmodel import measure as measure_cost
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.model.linear import convert_linears
from leapdecode.model.source import default_model_path

DEFAULT_CONFIGS = "torch:none:float32,native:none:float32,native:gguf:float32,native:gguf:int8,native:int8:int8,native:int4:int8"


def prompts(path: Path, n: int) -> list[str]:
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[str]] = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it["turns"][0])
    cats = sorted(by_cat)
    return [by_cat[cats[i % len(cats)]][i // len(cats)] for i in range(n)]  # spread over categories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="Spec-Bench question.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated backend:quant:activations")
    ap.add_argument("--ks", default="1,2,4,8,16,32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = Engine.load()
    engines = {}
    for spec in args.configs.split(","):
        backend, quant, act = spec.split(":")
        model = copy.deepcopy(base.model)
        convert_linears(model, backend, quant, default_model_path(), act)
        engines[spec] = Engine(model, base.tokenizer, name=spec)
    ks = [int(k) for k in args.ks.split(",")]
    curves = {spec: measure_cost(e.model, tuple(sorted(set(ks)))) for spec, e in engines.items()}
    cost = {spec: dict(zip(c.ks, c.seconds)) for spec, c in curves.items()}
    speed = {(spec, d): [] for spec in engines for d in ("none", "pld")}
    same = {spec: True for spec in engines}
    for text in prompts(Path(args.data), args.prompts):
        for spec, eng in engines.items():
            out = {}
            for drafter in ("none", "pld"):
                r = eng.generate(text, GenerationConfig(max_new_tokens=args.max_new_tokens, drafter=drafter))
                speed[(spec, drafter)].append(r.stats.decode_tokens_per_s)
                out[drafter] = r.token_ids
            same[spec] &= out["none"] == out["pld"]
    ref = next(iter(engines))
    print(f"bundled model, {args.threads} threads, {args.prompts} prompts x {args.max_new_tokens} new tokens; "
          f"forward of k tokens after 128 cached (ms, median of 3)\n")
    print("| config | " + " | ".join(f"k={k}" for k in ks) + " | decode tok/s (none) | pld | pld == none |")
    print("|---|" + "---|" * (len(ks) + 3))
    for spec in engines:
        tps = {d: statistics.mean(speed[(spec, d)]) for d in ("none", "pld")}
        ratio = tps["none"] / statistics.mean(speed[(ref, "none")])
        print(f"| {spec} | " + " | ".join(f"{cost[spec][k] * 1e3:.1f}" for k in ks)
              + f" | {tps['none']:.1f} ({ratio:.2f}x) | {tps['pld']:.1f} | {same[spec]} |")


if __name__ == "__main__":
    main()
