"""`leap chat`: an interactive multi-turn chat that keeps the conversation (and the drafter's state)."""

from __future__ import annotations

import sys

from leapdecode.commands.common import (
    add_generation_arguments,
    add_model_arguments,
    add_prefix_cache_argument,
    format_stats,
    generation_config,
    load_engine,
)
from leapdecode.prefix_cache import PrefixCache

HELP = "Commands: /reset clears the conversation, /exit quits (or Ctrl-D)."


def add_arguments(p) -> None:
    p.add_argument("--system", default=None, help="system message")
    add_model_arguments(p)
    add_generation_arguments(p)
    add_prefix_cache_argument(p)


def run(args) -> int:
    config = generation_config(args)
    engine = load_engine(args)
    engine.prefix_cache = PrefixCache.from_mb(args.prefix_cache_mb)  # each turn prefills only its new tokens
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        print(f"leap chat ({engine.name}, drafter {config.drafter}). {HELP}")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(system)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        gen = engine.stream(messages, config)
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = gen.result
        assert result is not None  # set once the stream is exhausted
        messages.append({"role": "assistant", "content": result.text})
        if args.stats:
            print(format_stats(result.stats), file=sys.stderr)
    return 0
