"""`leap train-drafter --kind eagle|medusa --out DIR`: train a drafter head for a model on CPU.

Self-distillation: the model answers the project's own training prompts (leapdecode/train/prompts.py),
its hidden states are recorded, and the head learns to predict its next tokens. Every stage is saved
in DIR, so running the same command again resumes; the head is DIR/<kind>.safetensors, for
``--drafter <kind>`` with the drafter option ``path`` (or shipped in the package for the bundled model).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from leapdecode.checks import positive_int
from leapdecode.commands.common import add_model_arguments, load_engine
from leapdecode.model.source import open_source
from leapdecode.train.loop import KINDS, TrainConfig
from leapdecode.train.pipeline import DataConfig
from leapdecode.train.pipeline import run as run_pipeline


def add_arguments(p) -> None:
    p.add_argument("--kind", required=True, choices=KINDS, help="eagle (one-layer feature head) or medusa")
    p.add_argument("--out", required=True, help="folder for the data, checkpoints and the head file")
    p.add_argument("--prompts", type=positive_int, default=DataConfig.prompts, help="conversations answered")
    p.add_argument("--max-new-tokens", type=positive_int, default=DataConfig.max_new_tokens)
    p.add_argument(
        "--vocab", type=positive_int, default=DataConfig.vocab, help="ids the head's output covers"
    )
    p.add_argument("--epochs", type=positive_int, default=TrainConfig.epochs)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument(
        "--unroll", type=positive_int, default=TrainConfig.unroll, help="eagle: drafting depth trained"
    )
    p.add_argument("--heads", type=positive_int, default=TrainConfig.heads, help="medusa: number of heads")
    add_model_arguments(p)


def _progress(desc: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=5, leave=False)
    return bar.update


def _say(msg: str) -> None:
    print(f"leap train-drafter: {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    tc = TrainConfig(
        args.kind, epochs=args.epochs, lr=args.lr, seed=args.seed, unroll=args.unroll, heads=args.heads
    )
    dc = DataConfig(args.prompts, args.max_new_tokens, args.vocab)
    torch.manual_seed(args.seed)
    engine = load_engine(args)
    source, _, _ = open_source(args.model)
    t0 = time.perf_counter()
    path, curve = run_pipeline(engine, source, Path(args.out), tc, dc, _progress, _say)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    for row in curve:
        print(f"epoch {row['epoch']}: held-out top-1 " + " ".join(f"{a:.3f}" for a in row["top1"]))
    return 0
