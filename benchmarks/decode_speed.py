"""Plain decoding: our engine vs transformers `generate`, same model, prompts, dtype and threads, one run.

    .venv/bin/python benchmarks/decode_speed.py [--model PATH] [--max-new-tokens 128] [--threads 2]
        [--backend torch --quant none --activations float32]   (the default: float32 like transformers)

Prints a markdown table (tokens/s each, ratio, machine) and the fraction of the memory-bandwidth bound
that our decoding reaches (weight bytes read per token vs. measured read bandwidth). This host's
bandwidth drifts by tens of percent within minutes, so the bound is also taken pairwise: a bandwidth
reading right before and right after each prompt's plain decoding, one share per prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from leapdecode.bench.data import SPEC_BENCH, load_questions
from leapdecode.bench.machine import describe_machine
from leapdecode.bench.peers import PeerContext, make_peers
from leapdecode.bench.runner import run_bench
from leapdecode.engine import Engine, GenerationConfig

CATEGORIES = ["writing", "translation", "summarization", "qa", "math_reasoning", "rag"]


class StreamProbe:
    """GB/s of a streaming read (a sum over a buffer far larger than the caches), as often as asked: the
    buffer is allocated once, since allocating and filling it costs more than a reading."""

    def __init__(self, threads: int, gib: float = 1.0):
        self.threads = threads
        self.x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)

    def __call__(self, repeats: int = 5) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.x.sum()
            best = min(best, time.perf_counter() - t0)
        torch.set_num_threads(before)
        time.sleep(0.05)  # torch's threads spin for a while after the sum: let them park before timed work
        return self.x.numel() * 4 / best / 1e9


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """One reading of `StreamProbe`."""
    return StreamProbe(threads, gib)(repeats)


def weight_bytes_per_token(engine: Engine) -> int:
    """Bytes of every weight matrix a one-token forward reads (embedding lookup excluded: one row)."""
    return engine.model.nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--data", default=str(SPEC_BENCH), help="question.jsonl (default: the bundled Spec-Bench)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", default=None, help="results folder (default: bench_results/decode_speed-<date-time>)"
    )
    ap.add_argument("--backend", default="torch", help="torch (default: the reference path) or native")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--activations", default="float32")
    ap.add_argument("--peers", default="hf", help="comma-separated peers to run beside ours, or 'none'")
    args = ap.parse_args()
    args.out = args.out or time.strftime("bench_results/decode_speed-%Y%m%d-%H%M%S")
    if Path(args.out, "records.jsonl").exists():  # checked before minutes of loading, not after
        ap.error(f"--out: {args.out} already holds results; choose another folder")
    bw = {t: read_bandwidth(t) for t in (1, args.threads)}
    torch.set_num_threads(args.threads)
    engine = Engine.load(
        args.model, threads=args.threads, backend=args.backend, quant=args.quant, activations=args.activations
    )
    questions = load_questions(args.data, categories=CATEGORIES[1:], per_category=1)  # single-turn groups
    ctx = PeerContext(
        model_path=engine_path(engine, args.model),
        dtype=engine.model.dtype,
        eos_ids=frozenset(engine.tokenizer.eos_ids),
        threads=args.threads,
        n_ctx=min(engine.model.cfg.max_seq_len, 4096),
    )
    records = run_bench(
        engine,
        questions,
        ["none"],
        make_peers([] if args.peers == "none" else args.peers.split(","), ctx),
        max_new_tokens=args.max_new_tokens,
        out_dir=args.out,
    )
    after = {t: read_bandwidth(t) for t in (1, args.threads)}  # this host's bandwidth drifts: read it twice
    bw = {t: (bw[t] + after[t]) / 2 for t in bw}
    print(table(records, engine, bw, args))
    print()
    print(paired_shares(engine, questions, args))
    return 0


def kv_bytes_per_position(engine: Engine) -> int:
    """Bytes of cached keys and values a step reads per position of context (every layer, float32)."""
    cfg = engine.model.cfg
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4


def paired_shares(engine: Engine, questions, args) -> str:
    """Share of the bound per prompt, the bandwidth read just before and just after that prompt's run.
    The bytes a step must read: every weight matrix, plus the cached keys and values of its context (on
    average the prompt and half the new tokens)."""
    wbytes, kv = weight_bytes_per_token(engine), kv_bytes_per_position(engine)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, drafter="none")
    rows, shares = [], []
    probe = StreamProbe(args.threads)
    for q in questions:
        before = probe()
        torch.set_num_threads(args.threads)
        stats = engine.generate(q.turns[0], config).stats
        gbs = (before + probe()) / 2
        tps = (stats.new_tokens - 1) / stats.decode_s
        step_bytes = wbytes + kv * (stats.prompt_tokens + stats.new_tokens / 2)
        shares.append(tps / (gbs * 1e9 / step_bytes))
        rows.append(
            f"| {q.question_id} ({q.category}) | {stats.prompt_tokens} | {step_bytes / 1e6:.0f} MB | "
            f"{tps:.1f} | "
            f"{gbs:.1f} GB/s | {shares[-1]:.0%} |"
        )
    shares.sort()
    head = [
        "| prompt | prompt tokens | bytes per step | decode tok/s | bandwidth around it | share of bound |",
        "|---|---|---|---|---|---|",
    ]
    summary = (
        f"Paired share of the bound: median {shares[len(shares) // 2]:.0%}, "
        f"lowest {shares[0]:.0%}, highest {shares[-1]:.0%}."
    )
    return "\n".join(head + rows + ["", summary])


def engine_path(engine: Engine, model: str | None) -> Path:
    from leapdecode.model.source import default_model_path

    return Path(model) if model else default_model_path()


def table(records: list[dict], engine: Engine, bw: dict[int, float], args) -> str:
    def tps(method: str) -> float:
        rs = [r for r in records if r["method"] == method]
        return sum(r["new_tokens"] for r in rs) / sum(r["wall_s"] for r in rs)

    def decode_tps() -> float:
        rs = [r for r in records if r["method"] == "none"]
        return sum(r["new_tokens"] - 1 for r in rs) / sum(r["wall_s"] - r["prefill_s"] for r in rs)

    ours = tps("none")
    hf = tps("hf") if any(r["method"] == "hf" for r in records) else None
    rows = [f"| leapdecode plain (`--drafter none`) | {ours:.1f} | - |"]
    if hf is not None:
        rows = [
            f"| transformers `generate` | {hf:.1f} | 1.00x |",
            f"| leapdecode plain (`--drafter none`) | {ours:.1f} | {ours / hf:.2f}x |",
        ]
    wbytes = weight_bytes_per_token(engine)
    bound = bw[args.threads] * 1e9 / wbytes
    m = describe_machine(engine)
    lines = [
        (
            f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cpus']} CPUs, "
            f"threads {args.threads}, "
            f"dtype {m['dtype']}, backend {engine.backend}, torch {m['torch']}, model {m['model']}, "
            f"{len({r['question_id'] for r in records})} Spec-Bench prompts, "
            f"{args.max_new_tokens} new tokens, greedy, one warm-up run each."
        ),
        "",
        "| engine | tokens/s (prefill included) | ratio vs transformers |",
        "|---|---|---|",
        *rows,
        "",
        (
            f"Decode-only: {decode_tps():.1f} tokens/s. Weights read per token: {wbytes / 1e6:.0f} MB; read "
            f"bandwidth (mean of a reading before and after the runs) {bw[1]:.1f} GB/s (1 thread), "
            f"{bw[args.threads]:.1f} GB/s ({args.threads} threads): "
            f"bound {bound:.1f} tokens/s, so decoding reaches {decode_tps() / bound:.0%} of it."
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
