"""`leap bench`: Spec-Bench questions through every method and peer; records, report and plots.

Thin: it checks the arguments (before any model loads), builds the engine and the peers, and calls
`run_bench` and `render_report`. `leap bench --report DIR` re-renders a saved run without a model.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from leapdecode.bench.data import load_questions, spec_bench_path
from leapdecode.bench.peers import PEERS, PeerContext, check_peers, make_peers
from leapdecode.bench.report import main_table, pyplot, render_dir, render_report, summarize
from leapdecode.bench.runner import BASELINE, RECORDS, read_meta, run_bench
from leapdecode.checks import non_negative_int, positive_int
from leapdecode.commands.common import add_model_arguments, load_engine
from leapdecode.drafters import available
from leapdecode.engine import Engine
from leapdecode.errors import LeapError
from leapdecode.model.source import default_model_path
from leapdecode.sampling import SamplingParams

DRAFT_MODEL = "draft-model"  # the drafter that runs only with --draft-model PATH
DEFAULT_OUT = "bench_results"
MAX_PEER_CTX = 8192


def add_arguments(p) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="question.jsonl (question_id, category, turns; default: Spec-Bench's, bundled)",
    )
    p.add_argument(
        "--categories",
        nargs="+",
        default=None,
        help="only these categories (comma or space separated; mt_bench = its 8 categories)",
    )
    p.add_argument("--per-category", type=positive_int, default=None, help="first N questions per category")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated drafters (default: every available one); `{BASELINE}` always runs",
    )
    p.add_argument("--peers", default="", help=f"comma-separated peers: {', '.join(PEERS)} (default: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default; outputs are compared)"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    p.add_argument(
        "--max-draft", type=non_negative_int, default=64, help="most draft tokens verified per step"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue the records in --out, skipping done runs")
    p.add_argument("--report", default=None, metavar="DIR", help="only re-render the report of a saved run")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each contender")
    add_model_arguments(p)


def split_list(values) -> list[str]:
    items = values if isinstance(values, list) else [values]
    return [x.strip() for v in items if v for x in v.split(",") if x.strip()]


def choose_methods(text: str | None, draft_model: str | None) -> list[str]:
    names = available()
    if text is None:
        return [n for n in names if n != DRAFT_MODEL or draft_model]
    chosen = split_list(text)
    for n in chosen:
        if n not in names:
            raise LeapError(f"--methods: unknown method {n!r}; expected one of: {', '.join(names)}")
    if DRAFT_MODEL in chosen and not draft_model:
        raise LeapError("--methods draft-model needs --draft-model PATH")
    return chosen


def run(args) -> int:
    pyplot()  # the report draws plots: a missing matplotlib fails now, not after the run
    if args.report:
        print(render_dir(args.report))
        return 0
    methods = choose_methods(args.methods, args.draft_model)
    peers = split_list(args.peers)
    check_peers(peers)
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
    questions = load_questions(
        args.data or spec_bench_path(), split_list(args.categories) or None, args.per_category
    )
    if (Path(args.out) / RECORDS).is_file() and not args.resume:
        raise LeapError(f"--out: {Path(args.out) / RECORDS} already exists; pass --resume or another --out")
    engine = load_engine(args)
    contenders = make_peers(peers, _peer_context(args, engine))
    records = run_bench(
        engine,
        questions,
        methods,
        contenders,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        max_draft=args.max_draft,
        out_dir=args.out,
        resume=args.resume,
        warmup=not args.no_warmup,
        progress=True,
        meta=_meta(args, methods, peers),
    )
    path = render_report(records, read_meta(args.out), args.out)
    print(f"{len(records)} records in {Path(args.out) / RECORDS}; report: {path}", file=sys.stderr)
    print("\n".join(main_table(summarize(records))))
    return 0


def _peer_context(args, engine: Engine) -> PeerContext:
    path = Path(args.model).expanduser() if args.model else default_model_path()
    return PeerContext(
        model_path=path,
        dtype=engine.model.dtype,
        eos_ids=frozenset(engine.tokenizer.eos_ids),
        threads=torch.get_num_threads(),
        n_ctx=min(engine.model.cfg.max_seq_len, MAX_PEER_CTX),
    )


def _meta(args, methods: list[str], peers: list[str]) -> dict:
    cmd = ["leap", "bench"] + (["--data", args.data] if args.data else [])
    if args.categories:
        cmd += ["--categories", ",".join(split_list(args.categories))]
    if args.per_category:
        cmd += ["--per-category", str(args.per_category)]
    cmd += ["--methods", ",".join(methods)] + (["--peers", ",".join(peers)] if peers else [])
    cmd += [
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--temperature",
        str(args.temperature),
        "--dtype",
        args.dtype,
    ]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--model", args.model] if args.model else []
    for flag in ("backend", "quant", "activations"):
        cmd += [f"--{flag}", getattr(args, flag)] if getattr(args, flag) != "auto" else []
    cmd += ["--kv-cache", args.kv_cache] if args.kv_cache != "float32" else []
    return {
        "command": shlex.join(cmd),
        "data": args.data or "Spec-Bench (bundled)",
        "settings": {
            "categories": split_list(args.categories) or None,
            "per_category": args.per_category,
            "max_draft": args.max_draft,
            "kv_cache": args.kv_cache,
            "methods": methods,
            "peers": peers,
        },
    }
