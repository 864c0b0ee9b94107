"""Time every linear layer of the bundled model, per backend and weight format, side by side.

For M = 1, 2, 4, ... new tokens it runs all the model's linears (per layer fused q/k/v, o, fused
gate/up, down; then the output layer) with distinct weights, so nothing stays in cache between
layers, exactly as one forward does. Formats come from the bundled GGUF itself (its Q4_1/Q8_0 blocks,
and int8/int4/float32 made from its weights). Configurations are interleaved within each repeat so
machine noise hits them alike. Also prints the memory-bandwidth bound: weight bytes / measured read
bandwidth.

    .venv/bin/python benchmarks/kernels.py --threads 2 --ms 1,2,4,8,16,32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

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
    args = ap.parse_args()
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
