"""Time every linear layer of the bundled model, per backend and weight format, side by side.

For M = 1, 2, 4, ... new tokens it runs all the model's linears (per layer fused q/k/v, o, fused
gate/up, down; then the output layer) with distinct weights, so nothing stays in cache between
layers, exactly as one forward does. Formats come from the bundled GGUF itself (its Q4_1/Q8_0 blocks,
and int8/int4/float32 made from its weights). Configurations are interleaved within each repeat so
machine noise hits them alike. Also prints the memory-bandwidth bound: weight bytes / measured read
bandwidth.

    .venv/bin/python benchmarks/kernel_speed.py --threads 2 --ms 1,2,4,8,16,32 --repeats 5

`--layer N,K` instead times one layer shape in GGUF's Q4_K and Q6_K blocks (random blocks, as stored) against
our q4_1 and q8_0, `--copies` distinct copies in turn (more bytes than the caches hold), and prints the
read rate of one row and the cost of more rows relative to one:

    .venv/bin/python benchmarks/kernel_speed.py --threads 2 --layer 17920,1536 --ms 1,8

With `--isas avx512,amx` the layer mode times the K-quant formats (or `--formats q4_1,q8_0`) in each
kernel build the CPU runs, interleaved in one process, every cost relative to the first build's one row
(the builds give the same bits; they differ in speed only):

    .venv/bin/python benchmarks/kernel_speed.py --threads 2 --layer 17920,1536 --ms 1,2,4,8,16 \
        --isas avx512,amx
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from leapdecode.kernels import native
from leapdecode.kernels.native import kernel_args, run_linear
from leapdecode.model import quant as Q
from leapdecode.model.config import ModelConfig
from leapdecode.model.gguf import GGUFSource
from leapdecode.model.source import default_model_path
from leapdecode.model.weights import linear_groups


def weights_by_format(cfg: ModelConfig) -> dict[str, list[list[Q.QuantWeight]]]:
    source = GGUFSource(default_model_path())
    gguf = [[source.stored(n) for n in names] for names in linear_groups(cfg)]
    floats = [torch.cat([Q.dequantize(p) for p in parts]) for parts in gguf]
    last = len(floats) - 1
    return {
        "f32": [[Q.quantize(w, "f32")] for w in floats],
        "int8": [[Q.quantize(w, "q8_0")] for w in floats],
        "int4": [[Q.quantize(w, "q8_0" if i == last else "q4_1")] for i, w in enumerate(floats)],
        "gguf": [[Q.concat(parts)] for parts in gguf],
    }


def configs(weights) -> dict[str, tuple]:
    """name -> (kind, per-layer payload, activations)."""
    out = {
        "torch f32": ("torch", [Q.dequantize(p[0]) for p in weights["f32"]], "float32"),
        "native f32": ("native", weights["f32"], "float32"),
    }
    for quant in ("gguf", "int8", "int4"):
        for act in ("int8", "float32"):
            out[f"native {quant} act-{act}"] = ("native", weights[quant], act)
    return out


def make_runner(kind: str, layers, act: str, m: int):
    xs = {
        k: torch.randn(m, k) for k in {(w.shape[1] if kind == "torch" else w[0].in_features) for w in layers}
    }
    if kind == "torch":
        return lambda: [F.linear(xs[w.shape[1]], w) for w in layers]
    calls = [
        (kernel_args(parts[0], "float32" if parts[0].fmt == "f32" else act), parts[0]) for parts in layers
    ]
    ys = [torch.empty(m, qw.out_features) for _, qw in calls]
    return lambda: [run_linear([c], xs[qw.in_features], y) for (c, qw), y in zip(calls, ys)]


def random_blocks(fmt: str, n: int, k: int, seed: int) -> Q.QuantWeight:
    """A weight of GGUF block format `fmt` with random bytes and ordinary fp16 scales."""
    weights, size = Q.BLOCK_FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // weights, size), dtype=torch.uint8, generator=gen)
    scale = torch.full((n, k // weights, 1), 0.01, dtype=torch.float16).view(torch.uint8)
    for offset in {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q5_0": (0,)}[fmt]:
        raw[..., offset : offset + 2] = scale
    return Q.QuantWeight(fmt, n, k, qs=raw.reshape(n, -1))


def layer_formats(
    n: int, k: int, copies: int, wanted: tuple[str, ...] = ("q4_k", "q6_k", "q4_1", "q8_0")
) -> dict[str, list[Q.QuantWeight]]:
    w = torch.randn(n, k) * 0.02
    make = {
        "q4_k": lambda i: random_blocks("q4_k", n, k, i),
        "q6_k": lambda i: random_blocks("q6_k", n, k, i),
        "q4_1": lambda i: Q.quantize(w + i * 1e-3, "q4_1"),
        "q8_0": lambda i: Q.quantize(w + i * 1e-3, "q8_0"),
    }
    return {f: [make[f](i) for i in range(copies)] for f in wanted}


def time_layer(args: argparse.Namespace) -> None:
    """One layer shape per format: ms per pass over `--copies` copies, GB/s, and k rows / 1 row."""
    n, k = (int(v) for v in args.layer.split(","))
    formats = layer_formats(n, k, args.copies)
    ms = [int(m) for m in args.ms.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    for m in ms:
        x, y = torch.randn(m, k), torch.empty(m, n)
        calls = {f: [kernel_args(w, "int8") for w in ws] for f, ws in formats.items()}
        for r in range(args.repeats + 1):
            for f, cs in calls.items():
                t0 = time.perf_counter()
                for c in cs:
                    run_linear([c], x, y)
                if r:
                    times.setdefault((f, m), []).append(time.perf_counter() - t0)
    print(
        f"layer [{n}, {k}] x {args.copies} copies, int8 activations, {args.threads} threads, "
        f"median of {args.repeats}; read bandwidth {read_bandwidth() / 1e9:.1f} GB/s\n"
    )
    print(
        "| format | MB | "
        + " | ".join(f"M={m} ms" for m in ms)
        + " | GB/s at M=1 | "
        + " | ".join(f"{m}/1" for m in ms[1:])
        + " |"
    )
    print("|---|---|" + "---|" * (2 * len(ms)))
    for f, ws in formats.items():
        mb = sum(w.nbytes for w in ws) / 1e6
        med = {m: statistics.median(times[(f, m)]) for m in ms}
        ratios = " | ".join(f"{med[m] / med[ms[0]]:.2f}" for m in ms[1:])
        cells = " | ".join(f"{med[m] * 1e3:.2f}" for m in ms)
        print(f"| {f} | {mb:.0f} | {cells} | {mb / 1e3 / med[ms[0]]:.1f} | {ratios} |")


def time_builds(args: argparse.Namespace) -> None:
    """Formats of one layer shape (`--formats`) in several kernel builds, interleaved: ms per copy and the
    ratio to the first build's one row."""
    n, k = (int(v) for v in args.layer.split(","))
    isas, ms = args.isas.split(","), [int(m) for m in args.ms.split(",")]
    formats = layer_formats(n, k, args.copies, tuple(args.formats.split(",")))
    times: dict[tuple[str, str, int], list[float]] = {}
    xs = {m: (torch.randn(m, k), torch.empty(m, n)) for m in ms}
    for r in range(args.repeats + 1):  # every configuration once per round, so drift hits them alike
        for m, (x, y) in xs.items():
            for f, ws in formats.items():
                for isa in isas:
                    t0 = time.perf_counter()
                    for w in ws:
                        native.linear_into(
                            y, x, f, "int8", n, k, qs=w.qs, d=w.d, m=w.m, threads=args.threads, isa=isa
                        )
                    if r:
                        times.setdefault((f, isa, m), []).append((time.perf_counter() - t0) / len(ws))
    print(
        f"layer [{n}, {k}], int8 activations, {args.threads} threads, median of {args.repeats}, ms per copy\n"
    )
    print("| format | build | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|---|" + "---|" * len(ms))
    for f in formats:
        one = statistics.median(times[(f, isas[0], ms[0])])
        for isa in isas:
            cells = [statistics.median(times[(f, isa, m)]) for m in ms]
            print(f"| {f} | {isa} | " + " | ".join(f"{c * 1e3:.2f} ({c / one:.2f}x)" for c in cells) + " |")


def read_bandwidth(gb: float = 0.5) -> float:
    """Bytes per second of a streaming read (a float32 sum over `gb` GB, best of 5)."""
    x = torch.ones(int(gb * 1e9 / 4))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ms", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated substrings of configuration names to keep")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this thread's CPU time, steadier on a busy machine (with --threads 1 only)",
    )
    ap.add_argument("--layer", default="", help="N,K: time one layer shape per format instead (see above)")
    ap.add_argument("--copies", type=int, default=24, help="with --layer: distinct copies of the layer")
    ap.add_argument("--isas", default="", help="with --layer: kernel builds to compare, e.g. avx512,amx")
    ap.add_argument(
        "--formats",
        default="q4_k,q6_k",
        help="with --layer --isas: weight formats to time (q4_k, q6_k, q4_1, q8_0)",
    )
    args = ap.parse_args()
    unknown = set(args.formats.split(",")) - {"q4_k", "q6_k", "q4_1", "q8_0"}
    if unknown:
        ap.error(f"--formats: unknown {', '.join(sorted(unknown))} (expected q4_k, q6_k, q4_1, q8_0)")
    if args.layer:
        torch.set_num_threads(args.threads)
        return time_builds(args) if args.isas else time_layer(args)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    from gguf import GGUFReader

    from leapdecode.model.loader import gguf_config

    cfg = gguf_config(GGUFReader(str(default_model_path())))
    weights = weights_by_format(cfg)
    cfgs = configs(weights)
    if args.only:
        cfgs = {k: v for k, v in cfgs.items() if any(s in k for s in args.only.split(","))}
    ms = [int(m) for m in args.ms.split(",")]
    table = {}
    for m in ms:
        runners = {name: make_runner(kind, layers, act, m) for name, (kind, layers, act) in cfgs.items()}
        times = {name: [] for name in runners}
        for r in range(args.repeats + 1):
            for name, run in runners.items():
                t0 = clock()
                run()
                if r:  # the first round warms up
                    times[name].append(clock() - t0)
                if cfgs[name][0] == "torch":  # torch's idle OpenMP threads spin for a while after a
                    time.sleep(0.2)  # parallel op: let them sleep before our pool runs
        table[m] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    bw = read_bandwidth()
    print(
        f"{len(weights['f32'])} linear layers (fused q/k/v and gate/up of {cfg.n_layers} blocks, "
        "and the output "
        f"layer), {args.threads} threads, {args.clock} clock, median of {args.repeats} (ms per forward); "
        f"read bandwidth {bw / 1e9:.1f} GB/s\n"
    )
    names = list(cfgs)
    print("| M | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for m in ms:
        print(f"| {m} | " + " | ".join(f"{table[m][n]:.2f}" for n in names) + " |")
    mb = {
        n: sum(
            p.nbytes for parts in (cfgs[n][1] if cfgs[n][0] == "native" else weights["f32"]) for p in parts
        )
        for n in names
    }
    print("| weight MB | " + " | ".join(f"{mb[n] / 1e6:.0f}" for n in names) + " |")
    print("| bandwidth bound, ms | " + " | ".join(f"{mb[n] / bw * 1e3:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
