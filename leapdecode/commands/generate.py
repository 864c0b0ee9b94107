"""`leap generate PROMPT`: stream one answer (chat template applied unless --raw)."""

from __future__ import annotations

import json
import sys

from leapdecode.commands.common import (
    add_generation_arguments,
    add_model_arguments,
    format_stats,
    generation_config,
    load_engine,
)


def add_arguments(p) -> None:
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as given")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    add_model_arguments(p)
    add_generation_arguments(p)


def run(args) -> int:
    config = generation_config(args)  # validate arguments before the model loads
    engine = load_engine(args)
    prompt = args.prompt
    if args.system is not None and not args.raw:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    gen = engine.stream(prompt, config, raw=args.raw)
    for piece in gen:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = gen.result
    assert result is not None  # set once the stream is exhausted
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        sys.stdout.write("\n")
    if args.stats:
        print(format_stats(result.stats), file=sys.stderr)
    return 0
