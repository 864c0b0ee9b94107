"""Options shared by the subcommands that load a model and generate."""

from __future__ import annotations

import argparse

from leapdecode.checks import int_at_least, non_negative_int, positive_int
from leapdecode.drafters import available
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.prefix_cache import DEFAULT_MB, MAX_MB
from leapdecode.sampling import SamplingParams


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=None, help="GGUF file or Hugging Face folder (default: bundled SmolLM2-135M)"
    )
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float64")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    g.add_argument(
        "--backend", default="auto", help="linear kernels: auto (native where it runs), native or torch"
    )
    g.add_argument(
        "--quant",
        default="auto",
        help="weights: auto (a GGUF's own blocks on native), gguf, none (float32), int8 or int4",
    )
    g.add_argument(
        "--activations", default="auto", help="auto (int8 with quantized weights on native), int8 or float32"
    )
    g.add_argument(
        "--kv-cache",
        default="float32",
        help="key/value cache: float32 (default) or int8 (one scale per token and head: a quarter of the "
        "bytes attention reads; outputs differ slightly from float32's, see `leap eval --kv-cache`)",
    )
    g.add_argument(
        "--draft-model", default=None, help="GGUF/folder of the draft model for --drafter draft-model"
    )


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument(
        "--drafter", default="auto", help="speculative drafter: auto (default), none, pld, suffix, ..."
    )
    g.add_argument(
        "--max-draft", type=non_negative_int, default=64, help="most draft tokens verified per step"
    )
    g.add_argument("--stats", action="store_true", help="print speculative statistics to stderr")


def add_prefix_cache_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--prefix-cache-mb",
        type=int_at_least(0, MAX_MB),
        default=DEFAULT_MB,
        help=f"MiB of keys/values kept to reuse earlier prompts' prefixes (least recently used go first; "
        f"0: off; default: {DEFAULT_MB})",
    )


def load_engine(args: argparse.Namespace) -> Engine:
    """The engine that the model options (`add_model_arguments`) describe."""
    options = {"draft-model": {"path": args.draft_model}} if args.draft_model else {}
    if getattr(args, "drafter", None) == "draft-model" and not args.draft_model:
        raise LeapError("--drafter draft-model needs --draft-model PATH")
    return Engine.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        drafter_options=options,
        backend=args.backend,
        quant=args.quant,
        activations=args.activations,
        kv_cache=args.kv_cache,
    )


def generation_config(args) -> GenerationConfig:
    if args.drafter not in available():  # before the model loads
        raise LeapError(f"unknown drafter {args.drafter!r}; expected one of: {', '.join(available())}")
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop=tuple(args.stop),
        drafter=args.drafter,
        max_draft=args.max_draft,
    )


def format_stats(stats) -> str:
    s = stats
    depth = " ".join(str(n) for n in s.accepted_by_depth) or "-"
    return (
        f"[{s.drafter} | backend {s.backend}, kernels {s.kernels}] "
        f"prompt {s.prompt_tokens} tok ({s.prefix_cached_tokens} cached), new {s.new_tokens} tok | "
        f"prefill {s.prefill_s:.2f}s | decode {s.decode_tokens_per_s:.1f} tok/s, overall "
        f"{s.tokens_per_s:.1f} tok/s | steps {s.steps}, drafted {s.drafted}, accepted {s.accepted}, "
        f"mean accepted {s.mean_accepted:.2f} | accepted by depth {depth} | "
        f"draft {s.draft_s:.2f}s verify {s.verify_s:.2f}s | finish {s.finish_reason}"
    )
