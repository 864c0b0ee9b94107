"""`leap`: the command line. Thin: it parses arguments and calls the Python API.

Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`; every user error
(LeapError, a missing file, a bad value) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from leapdecode.errors import LeapError

SUBCOMMANDS = {
    "generate": ("leapdecode.commands.generate", "generate text for one prompt (streams the answer)"),
    "chat": ("leapdecode.commands.chat", "interactive multi-turn chat"),
    "bench": ("leapdecode.bench.command", "benchmark every method on Spec-Bench against peers"),
    "serve": ("leapdecode.server.command", "OpenAI-compatible HTTP server"),
    "train-drafter": ("leapdecode.commands.train_drafter", "train an eagle or medusa drafter head on CPU"),
    "eval": ("leapdecode.commands.evaluate", "quality of a weight format: perplexity, KL, top-1 agreement"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as for every other user error
        self.exit(2, f"leap: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="leap", description="Lossless speculative decoding for Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except LeapError as exc:
        print(f"leap: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"leap: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
