"""The int8 key/value cache against float32: seconds of a forward of k new tokens (k = 1: a decoding step;
8, 16: verifying a draft) after 256 and 2048 cached tokens, one runner, the two cache formats alternating
in every round; the best time of each cell is kept. The caches hold random keys and values (a forward's
cost does not depend on them), as `leapdecode.costmodel.measure` does.

`--quality N`: the same runner's next-token distributions on N Spec-Bench documents (as `leap eval`
reads them) with an int8 cache against a float32 one: perplexity of each, mean KL(float32 || int8) and
top-1 agreement. Unlike `leap eval --kv-cache` it needs no float32 torch reference (6 GB for a 1.5B model).

`--streams`: k counts sequences instead, each with its own cache of that many tokens, and the time is of
one batched forward of one new row in each (a round of `leap serve --batch`).

    M=~/.cache/leapdecode/models
    .venv/bin/python benchmarks/kv_cache.py --threads 2
    .venv/bin/python benchmarks/kv_cache.py --model $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --threads 2
    .venv/bin/python benchmarks/kv_cache.py --threads 2 --streams --ks 1,8,32 --contexts 16,300,700
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leapdecode.cache import KVCache
from leapdecode.kernels.build import best_isa
from leapdecode.kernels.native import kernel_scope
from leapdecode.model.backends import load_runner
from leapdecode.model.linear import LinearSpec
from leapdecode.model.runner import FULL, BatchItem, forward_batch

FORMATS = ("float32", "int8")


def filled_cache(runner, kv: str, context: int, rows: int) -> KVCache:
    cfg, g = runner.cfg, torch.Generator().manual_seed(0)
    cache = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, context + rows, kv_dtype=kv)
    for t in cache.tensors():
        if t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8))
        else:
            t.copy_(torch.rand(t.shape, generator=g) * (0.02 if t.dim() == 4 else 1.0))
    cache.advance(context)
    return cache


def time_forward(runner, cache: KVCache, context: int, k: int) -> float:
    x = torch.randint(0, runner.cfg.vocab_size, (k,), generator=torch.Generator().manual_seed(k))
    cache.truncate(context)
    t0 = time.perf_counter()
    runner.forward(x, torch.arange(context, context + k), cache)
    return time.perf_counter() - t0


def time_streams(runner, caches: list[KVCache], context: int) -> float:
    """One batched forward of one new row in each of the caches (a round of batched serving)."""
    items = []
    for i, cache in enumerate(caches):
        cache.truncate(context)
        items.append(BatchItem(torch.tensor([100 + i]), torch.tensor([context]), cache, None, FULL))
    t0 = time.perf_counter()
    forward_batch(runner, items)
    return time.perf_counter() - t0


def measure(runner, contexts: list[int], ks: list[int], rounds: int, streams: bool = False) -> dict:
    """Best seconds per (format, context, k); with `streams`, k is the number of sequences, one new row
    each."""
    count, depth = (max(ks), 1) if streams else (1, max(ks))  # caches per cell, rows past the context
    cells = [(kv, c) for kv in FORMATS for c in contexts]
    caches = {(kv, c): [filled_cache(runner, kv, c, depth) for _ in range(count)] for kv, c in cells}
    best: dict[tuple[str, int, int], float] = {}
    for _ in range(rounds):
        for c in contexts:
            for k in ks:
                for kv in FORMATS:  # alternating, so drifting machine load hits both alike
                    if streams:
                        took = time_streams(runner, caches[kv, c][:k], c)
                    else:
                        took = time_forward(runner, caches[kv, c][0], c, k)
                    best[kv, c, k] = min(best.get((kv, c, k), float("inf")), took)
    return {f"{kv}/{c}/{k}": s for (kv, c, k), s in best.items()}


def quality(runner, tokenizer, docs: int, max_tokens: int) -> dict:
    from leapdecode.bench.data import spec_bench_path
    from leapdecode.commands.evaluate import Score, load_texts

    texts = load_texts(spec_bench_path(), "summarization", docs)
    windows = [ids[:max_tokens] for ids in (tokenizer.encode(t) for t in texts) if len(ids) >= 2]
    ref, score = Score(), Score()
    for ids in windows:
        x, pos, cfg = torch.tensor(ids), torch.arange(len(ids)), runner.cfg
        logp = {}
        for kv in FORMATS:
            cache = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, len(ids), kv_dtype=kv)
            logp[kv] = torch.log_softmax(runner.forward(x, pos, cache).logits[:-1].double(), dim=-1)
        ref.add(logp["float32"], logp["float32"], torch.tensor(ids[1:]))
        score.add(logp["float32"], logp["int8"], torch.tensor(ids[1:]))
    return {"float32": ref.to_dict(), "int8": score.to_dict(), "documents": len(windows)}


def table(best: dict, contexts: list[int], ks: list[int], streams: bool = False) -> str:
    rows = "streams (one new row each)" if streams else "new rows"
    lines = [f"| cached tokens | {rows} | float32 cache | int8 cache | int8 / float32 |", "|---" * 5 + "|"]
    for c in contexts:
        for k in ks:
            f, i = best[f"float32/{c}/{k}"], best[f"int8/{c}/{k}"]
            lines.append(f"| {c} | {k} | {f * 1e3:.1f} ms | {i * 1e3:.1f} ms | {i / f:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="256,2048")
    ap.add_argument("--ks", default="1,8,16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--streams",
        action="store_true",
        help="--ks counts sequences instead: one batched forward of one new row in each (batched serving)",
    )
    ap.add_argument("--quality", type=int, default=0, help="documents to compare the outputs on (0: none)")
    ap.add_argument("--max-tokens", type=int, default=512, help="tokens per document window")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    contexts, ks = [int(c) for c in args.contexts.split(",")], [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(args.threads)
    loaded = load_runner(args.model, spec=LinearSpec("native"))
    with kernel_scope(args.threads):
        best = measure(loaded.runner, contexts, ks, args.rounds, args.streams)
        scores = (
            quality(loaded.runner, loaded.tokenizer, args.quality, args.max_tokens) if args.quality else {}
        )
    spec = loaded.runner.spec.describe()
    head = f"{loaded.path.name}: {spec}, kernels {best_isa()}, {args.threads} threads"
    if args.json:
        print(json.dumps({"model": loaded.path.name, "seconds": best, "quality": scores}))
        return
    print(head)
    print(table(best, contexts, ks, args.streams))
    if scores:
        f, i = scores["float32"], scores["int8"]
        print(f"\n{scores['documents']} documents, {i['tokens']} predicted tokens")
        print(f"perplexity float32 cache {f['perplexity']:.4f}, int8 cache {i['perplexity']:.4f}")
        agree = 100 * i["top1_agreement"]
        print(f"int8 against float32: mean KL {i['mean_kl']:.5f}, top-1 agreement {agree:.2f}%")


if __name__ == "__main__":
    main()
