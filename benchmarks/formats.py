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
    ap.add_argument("--drafters", default="none,pld,auto", help="comma-separated; the first is the baseline")
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
    drafters = args.drafters.split(",")
    speed = {(spec, d): [] for spec in engines for d in drafters}  # (tokens, seconds) incl. prefill
    same = {(spec, d): 0 for spec in engines for d in drafters}
    texts = prompts(Path(args.data), args.prompts)
    for text in texts:
        for spec, eng in engines.items():
            out = {}
            for d in drafters:
                r = eng.generate(text, GenerationConfig(max_new_tokens=args.max_new_tokens, drafter=d))
                speed[(spec, d)].append((r.stats.new_tokens, r.stats.prefill_s + r.stats.decode_s))
                out[d] = r.token_ids
                same[(spec, d)] += out[d] == out[drafters[0]]

    def tps(spec, d):
        return sum(n for n, _ in speed[(spec, d)]) / sum(t for _, t in speed[(spec, d)])

    ref = next(iter(engines))
    print(f"bundled model, {args.threads} threads, {len(texts)} prompts x {args.max_new_tokens} new tokens, greedy; "
          f"forward of k tokens after 256 cached (ms, best of 3); tokens/s include prefill\n")
    print("| config | " + " | ".join(f"k={k}" for k in ks) + " | "
          + " | ".join(f"{d} tok/s" for d in drafters) + f" | {drafters[0]} vs {ref} | output == {drafters[0]} |")
    print("|---|" + "---|" * (len(ks) + len(drafters) + 2))
    for spec in engines:
        rates = " | ".join(f"{tps(spec, d):.1f}" + ("" if d == drafters[0] else
                                                   f" ({tps(spec, d) / tps(spec, drafters[0]):.2f}x)")
                           for d in drafters)
        match = ", ".join(f"{d} {same[(spec, d)]}/{len(texts)}" for d in drafters[1:])
        print(f"| {spec} | " + " | ".join(f"{cost[spec][k] * 1e3:.1f}" for k in ks)
              + f" | {rates} | {tps(spec, drafters[0]) / tps(ref, drafters[0]):.2f}x | {match} |")

if __name__ == "__main__":
    main()
