"""Verify cost on a GPU, and the tree size `auto` picks from it, next to the CPU's.

Builds a Llama-architecture model with random weights directly on the device (no download; the speed
of a forward does not depend on the values), measures the cost model `auto` uses (a forward of k new
tokens after 256 and 2048 cached ones), and prints, for one fixed set of proposals, the tree size that
maximises expected tokens per second under that curve and under a curve saved on another machine
(`--compare`, a `cost-*.json` from leapdecode's cache folder). Also checks on the device that greedy
output with each drafter equals plain decoding (float64, a small random model).

    python benchmarks/gpu_cost.py --device cuda --dtype bfloat16 --compare cpu-cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from leapdecode.costmodel import CostCurve, CostModel, measure_model
from leapdecode.drafters.auto import Auto, _Node
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.model.config import ModelConfig
from leapdecode.model.loader import build_model, expected_shapes
from leapdecode.model.tokenizer import Tokenizer

PRESETS = {  # Llama-3-8B, a 1B-class shape, and a tiny one for trying the script on a CPU
    "8b": ModelConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        max_seq_len=4096,
        rope_theta=500000.0,
    ),
    "1b": ModelConfig(
        vocab_size=32000,
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        intermediate_size=5632,
        max_seq_len=4096,
    ),
    "tiny": ModelConfig(
        vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=256, max_seq_len=4096
    ),
}


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=gen, dtype=dtype, device=device) / fan_in**0.5
    return build_model(state, cfg, dtype, device)


def proposals(depth: int = 16, width: int = 4) -> list[_Node]:
    """A fixed tree: `width` branches of `depth` nodes; the first branch is likely (0.8 per step), the
    others less so (0.3), as when a long suffix match competes with weaker lookups."""
    nodes = []
    for b in range(width):
        rate = 0.8 if b == 0 else 0.3
        prob, parent = 1.0, -1
        for d in range(depth):
            prob *= rate
            nodes.append(_Node(token=b * depth + d, parent=parent, depth=d + 1, prob=prob))
            parent = len(nodes) - 1
    return nodes


def chosen(curve, context: int) -> tuple[int, float]:
    """(tree size, expected tokens per forward-time of one token) that auto picks under `curve`."""
    auto = Auto()
    auto.engine = type("E", (), {"cost_curve": staticmethod(lambda: curve)})()
    nodes = proposals()
    picked = auto._choose(nodes, len(nodes), context)
    expected = 1 + sum(n.prob for n in picked)
    return len(picked), expected / (curve(1 + len(picked), context) / curve(1, context))


def lossless_check(device: str) -> str:
    cfg = ModelConfig(
        vocab_size=64,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=128,
        max_seq_len=512,
        norm_eps=1e-6,
    )
    model = random_model(cfg, torch.float64, device, seed=1)
    vocab = {chr(0x41 + i) if i < 26 else f"t{i}": i for i in range(64)}
    import tokenizers
    from tokenizers import decoders, models

    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    eng = Engine(model, Tokenizer(backend, bos_id=None, eos_ids=set(), chat_template=None, add_bos=False))
    out = []
    for seed in range(5):
        prompt = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(seed)).tolist() * 2
        plain = eng.generate(prompt, GenerationConfig(max_new_tokens=48, drafter="none"))
        for name in ("pld", "suffix", "recycling", "copy", "auto"):
            r = eng.generate(prompt, GenerationConfig(max_new_tokens=48, drafter=name))
            out.append((name, r.token_ids == plain.token_ids))
    same = sum(ok for _, ok in out)
    return f"greedy output equal to plain decoding on {device} (float64): {same}/{len(out)}"


def load_curve(path: str) -> CostModel:
    saved = json.loads(Path(path).read_text())
    curves = saved["seconds"] if isinstance(saved["seconds"][0], list) else [saved["seconds"]]
    contexts = saved.get("contexts", [256])
    return CostModel(tuple(contexts), tuple(CostCurve(tuple(saved["ks"]), tuple(t)) for t in curves))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    ap.add_argument("--compare", default=None, help="a saved cost-*.json to compare against")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(lossless_check(args.device))
    t0 = time.perf_counter()
    model = random_model(PRESETS[args.preset], dtype, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{args.preset} random model on {name}, {args.dtype}, built in {time.perf_counter() - t0:.0f} s")
    cost = measure_model(model)
    rows = [("this device", cost)] + ([("--compare", load_curve(args.compare))] if args.compare else [])
    ks = cost.curves[0].ks
    print(
        "\n| curve | context | k=1 ms | "
        + " | ".join(f"k={k}" for k in ks[1:])
        + " | tree auto picks | tokens per 1-token time |"
    )
    print("|---|---|---|" + "---|" * (len(ks) - 1) + "---|---|")
    for label, model_cost in rows:
        for ctx in model_cost.contexts:
            rel = model_cost.relative(ctx)
            n, gain = chosen(model_cost, ctx)
            print(
                f"| {label} | {ctx} | {model_cost(1, ctx) * 1e3:.2f} | "
                + " | ".join(f"{rel[k]:.2f}x" for k in ks[1:])
                + f" | {n} nodes | {gain:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
