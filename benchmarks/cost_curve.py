"""The verification cost curve of a model per kernel build: seconds of a forward of k new tokens after
256 and 2048 cached ones (`leapdecode.costmodel.measure`, as `auto` sees it), relative to k = 1.

Each build runs in its own process (a process loads one build), the builds alternating over `--rounds`;
the best time of every cell is kept. The builds give the same bits; they differ in speed only.

    M=~/.cache/leapdecode/models
    .venv/bin/python benchmarks/cost_curve.py --model $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --isas avx512,amx --threads 2 --out bench_results/cost_curve_qwen15.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

KS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def child(model: str, threads: int, contexts: list[int]) -> None:
    """Measure in this process (the build chosen by LEAPDECODE_ISA) and print the curves as JSON."""
    import torch

    from leapdecode.costmodel import measure
    from leapdecode.kernels.build import best_isa
    from leapdecode.kernels.native import kernel_scope
    from leapdecode.model.backends import load_runner

    torch.set_num_threads(threads)
    runner = load_runner(model or None).runner
    out = {"isa": best_isa(), "curves": {}}
    with kernel_scope(threads):
        for c in contexts:
            curve = measure(runner, KS, c, repeats=3, budget_s=1.0)
            out["curves"][str(c)] = dict(zip(curve.ks, curve.seconds, strict=True))
    print(json.dumps(out))


def run_round(args: argparse.Namespace, isa: str) -> dict:
    env = dict(os.environ, LEAPDECODE_ISA=isa)
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--threads", str(args.threads)]
    cmd += ["--contexts", args.contexts]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(best: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| build | context | k=1 | " + " | ".join(f"k={k}" for k in KS[1:]) + " |"]
    lines.append("|---|---|---|" + "---|" * (len(KS) - 1))
    for isa, curves in best.items():
        for c, cells in curves.items():
            one = cells["1"]
            ratios = " | ".join(f"{cells[str(k)] / one:.2f}x" for k in KS[1:] if str(k) in cells)
            lines.append(f"| {isa} | {c} | {one * 1e3:.1f} ms | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="GGUF file (default: the bundled model)")
    ap.add_argument("--isas", default="avx512,amx", help="kernel builds to compare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="256,2048")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.child:
        return child(args.model, args.threads, contexts)
    best: dict[str, dict[str, dict[str, float]]] = {}
    for _ in range(args.rounds):
        for isa in args.isas.split(","):
            got = run_round(args, isa)["curves"]
            mine = best.setdefault(isa, {})
            for c, cells in got.items():
                keep = mine.setdefault(c, {})
                for k, s in cells.items():
                    keep[k] = min(s, keep.get(k, float("inf")))
    print(
        f"model {Path(args.model).name or 'bundled'}, {args.threads} threads, best of {args.rounds} rounds\n"
    )
    print(table(best))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
