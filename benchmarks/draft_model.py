"""Draft-model speculation (Qwen2.5-Coder 0.5B drafting for 1.5B) against plain decoding and against
transformers' assisted generation on the same pair, in one script.

    python benchmarks/models.py fetch qwen-pair          # once: both GGUF files into the user cache
    python benchmarks/draft_model.py --per-group 3 --max-new-tokens 128 --threads 2
        [--quant none --activations float32]     the target's kernels and weights (default: as `leap` picks)
        [--draft-quant int8 --draft-activations int8]   the draft model's (default: its `auto`, see
                                                          leapdecode.drafters.draft_model.draft_spec)

Each of our runs is bracketed by two readings of the host's streaming bandwidth (it switches between
two states here), and the ratios are also given over the questions that met each state.

Phase 1 runs our engine (plain, then draft-model, rotating per question); phase 2 frees it and runs
transformers on the same GGUF files dequantized to the same dtype: `generate` plain and with
`assistant_model=` (its default assistant schedule). Both phases answer the same chat-templated token
ids (the first turn of the first N questions of each Spec-Bench group), greedy. Ratios are to our plain
decoding and to transformers' plain decoding measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_speed import StreamProbe
from models import model_path
from self_spec import common_arguments, load_selected, run_rotating, table

#: GB/s between this host's two streaming states (~45 and ~80 GB/s read by two threads)
FAST_HOST_GBS = 60.0


def cached(name: str) -> str:
    path = model_path(name)
    if not path.is_file():
        raise SystemExit(f"{name} is not cached; run: python benchmarks/models.py fetch qwen-pair")
    return str(path)


def our_phase(args, methods: list[str]):
    from leapdecode.bench.methods import DrafterMethod
    from leapdecode.engine import Engine

    chain = {
        k: getattr(args, k)
        for k in ("num_draft", "branch", "threshold", "stop")
        if getattr(args, k) is not None
    }
    options = {
        "path": args.draft,
        **chain,  # the drafter's own defaults unless given
        "backend": args.draft_backend,
        "quant": args.draft_quant,
        "activations": args.draft_activations,
    }
    engine = Engine.load(
        args.target,
        args.dtype,
        threads=args.threads,
        drafter_options={"draft-model": options},
        backend=args.backend,
        quant=args.quant,
        activations=args.activations,
    )
    prompts = load_selected(args, engine)
    contenders = [DrafterMethod(engine, m) for m in methods]  # loads the draft model
    draft = engine.drafter("draft-model").model if "draft-model" in methods else None
    print(f"target kernels {engine.backend}" + (f", draft kernels {draft.spec.describe()}" if draft else ""))
    probe = StreamProbe(args.threads)
    records = run_rotating(contenders, prompts, args.max_new_tokens, probe=probe) if contenders else []
    return records, prompts, frozenset(engine.tokenizer.eos_ids)


def hf_phase(args, methods: list[str], prompts, eos_ids) -> list[dict]:
    import torch

    from leapdecode.bench.peers import HFPeer, load_hf_model
    from leapdecode.model.source import parse_dtype

    class AssistedHF(HFPeer):
        def __init__(self, model, assistant, eos):
            super().__init__("hf-assisted", model, eos)
            self.assistant = assistant

        def _generate_kwargs(self, max_new_tokens, sampling):
            return {**super()._generate_kwargs(max_new_tokens, sampling), "assistant_model": self.assistant}

    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    target = load_hf_model(Path(args.target), dtype)
    contenders = []
    if "hf" in methods:
        contenders.append(HFPeer("hf", target, eos_ids))
    if "hf-assisted" in methods:
        contenders.append(AssistedHF(target, load_hf_model(Path(args.draft), dtype), eos_ids))
    return run_rotating(contenders, prompts, args.max_new_tokens)


def host_split(records: list[dict]) -> str:
    """Our methods' tables over the questions whose every run of ours met the host streaming below, and
    above, FAST_HOST_GBS. Plain decoding is bound by memory and speeds up with it; a verification step
    is bound by arithmetic as much, so speculation gains most where memory is slow."""
    ours = [r for r in records if r["method"] in ("none", "draft-model", "auto") and r.get("host_gbs")]
    readings: dict[int, list[float]] = {}
    for r in ours:
        readings.setdefault(r["index"], []).append(r["host_gbs"])
    states = {
        "slower": {i for i, v in readings.items() if max(v) < FAST_HOST_GBS},
        "faster": {i for i, v in readings.items() if min(v) >= FAST_HOST_GBS},
    }
    parts = []
    for label, chosen in states.items():
        if chosen:
            gbs = [g for i in chosen for g in readings[i]]
            parts.append(
                f"Questions whose runs all met the host streaming {label} than {FAST_HOST_GBS:.0f} GB/s "
                f"({len(chosen)}, readings {min(gbs):.0f}-{max(gbs):.0f} GB/s):\n\n"
                + table(ours, "none", subset=lambda r, c=chosen: r["index"] in c)
            )
    parts.append(f"({len(readings) - sum(map(len, states.values()))} questions met the host in both states.)")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    from leapdecode.drafters.draft_model import STOP_RULES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="target GGUF (default: the cached qwen-1.5b)")
    p.add_argument("--draft", default=None, help="draft GGUF (default: the cached qwen-0.5b)")
    p.add_argument("--num-draft", type=int, default=None, help="deepest chain (default: the drafter's)")
    p.add_argument("--branch", type=int, default=None, help="children per depth (default: the drafter's)")
    p.add_argument("--threshold", type=float, default=None, help="stop confidence (default: the drafter's)")
    p.add_argument("--stop", choices=STOP_RULES, default=None, help="stop rule (default: the drafter's)")
    for prefix, who in (("", "the target's"), ("draft-", "the draft model's")):
        p.add_argument(f"--{prefix}backend", default="auto", help=f"{who} linear kernels")
        p.add_argument(f"--{prefix}quant", default="auto", help=f"{who} weights")
        p.add_argument(f"--{prefix}activations", default="auto", help=f"{who} activations")
    common_arguments(p, "none,draft-model,auto,hf,hf-assisted")
    p.set_defaults(per_group=3)
    args = p.parse_args(argv)
    args.target = args.target or cached("qwen-1.5b")
    args.draft = args.draft or cached("qwen-0.5b")
    methods = args.methods.split(",")

    records, prompts, eos_ids = our_phase(args, [m for m in methods if m in ("none", "draft-model", "auto")])
    gc.collect()
    if {"hf", "hf-assisted"} & set(methods):
        records += hf_phase(args, methods, prompts, eos_ids)  # same question indexes: tokens comparable
    print(
        f"## Draft-model speculation: {Path(args.draft).name} drafting for {Path(args.target).name} "
        f"({args.dtype}, {args.threads} threads, greedy, {args.max_new_tokens} new tokens, "
        f"{len(prompts)} questions)\n"
    )
    print(
        "Command: python benchmarks/draft_model.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "\n"
    )
    print(table(records, "none") if any(r["method"] == "none" for r in records) else "")
    if any(r.get("host_gbs") for r in records):
        print("\n" + host_split(records))
    if any(r["method"] == "hf" for r in records):
        print("\nAgainst transformers' plain decoding:\n")
        print(table(records, "hf"))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
