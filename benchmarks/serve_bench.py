"""Serving benchmark: throughput and time to first token of `leap serve` at 1, 4 and 16 concurrent
clients, with and without speculation, on one model over loopback. Prints a markdown table.

Everything runs from this one script, side by side: one server per (drafter, concurrency), by default
`leap serve` in its own process as a deployment runs it (--server thread: the app on a thread of this
process, whose clients then share the server's interpreter and lock), the same Spec-Bench questions
(first turns, spread over the categories) for every row, greedy decoding.
Clients stream chat completions through the official `openai` client and pull the next question from a
shared list, so a level with c clients keeps c requests in flight. Server slots: --max-concurrency, else
one per client when batching (a batch holds the active requests only) and 4 without (interleaving more
only lengthens every stream's steps); more clients than slots queue.

    python benchmarks/serve_bench.py                      # 1/4/16 clients, none vs auto (or a lookup drafter)
    python benchmarks/serve_bench.py --concurrency 1 2 --requests 2 --max-tokens 8   # a smoke run
    python benchmarks/serve_bench.py --prefix 700         # time to first token with a shared prefix
    python benchmarks/serve_bench.py --llamacpp-server BIN   # also llama.cpp's server, same clients

Columns: tok/s = completion tokens of all requests / wall time of the level; "x none" = that throughput
over the plain-decoding row at the same concurrency (a ratio from this run only); TTFT = from sending a
request to its first text; ITL = a request's time from its first to its last text per token after the
first (inter-token latency, mean over requests); mean acc = tokens committed per verification step
(bonus included);
same = requests whose text equals plain decoding's (fewest clients) for the same question: greedy
decoding is lossless whatever the drafter and however many requests share the server.

--prefix N: the prefix cache instead. Each pair of requests shares a system message of N tokens (cut
from Spec-Bench questions, different for every pair) and asks two different short questions (at most 40
tokens, as a new chat turn would be): the first request finds nothing cached (cold), the second reuses
the first's prefix (warm). Pairs alternate which question goes first, one request at a time. Columns:
TTFT of each, their ratio, the prompt tokens reused, and whether the warm answer equals the same prompt
generated without a prefix cache.

--batch on (default)|off|both: the server batches the active requests' forwards (`leap serve`'s
default) or not (`--no-batch`); "x fewest clients" = a row's throughput over the same drafter and batch
mode with the fewest clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import torch

from leapdecode.bench.data import SPEC_BENCH
from leapdecode.cpu import cpu_model
from leapdecode.drafters import available
from leapdecode.engine import Engine, GenerationConfig
from leapdecode.model.source import default_model_path
from leapdecode.prefix_cache import DEFAULT_MB
from leapdecode.server import BackgroundServer, ServerConfig, ServerProcess, build_app

PEER = "llama.cpp"  # the drafter column of llama-server's rows (--llamacpp-server)
SERVER_KINDS = {"process": "its own process", "thread": "a thread of the clients' process"}


@dataclass
class Level:
    drafter: str
    clients: int
    batch: bool = False  # the server batches the active requests' forwards (--batch)
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)  # per request: seconds per token after the first
    tokens: int = 0
    steps: int = 0
    accepted: int = 0
    errors: int = 0
    texts: dict[int, str] = field(default_factory=dict)  # question index -> text

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def mean_accepted(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


def load_questions(path: Path, n: int) -> list[str]:
    """n first turns, taken round-robin over the categories so every run mixes the tasks."""
    if not path.is_file():
        sys.exit(f"serve_bench: Spec-Bench questions not found at {path} (pass --data PATH)")
    by_cat: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            by_cat.setdefault(q["category"], []).append(q["turns"][0])
    cats = sorted(by_cat)
    picked = [by_cat[c][i] for i in range(max(map(len, by_cat.values()))) for c in cats if i < len(by_cat[c])]
    return picked[:n]


async def one_request(client, model: str, question: str, max_tokens: int, level: Level, index: int) -> None:
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, first, last, tokens = [], None, None, 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            stats = (chunk.model_extra or {}).get("leap_stats")  # a peer server sends none
            tokens = chunk.usage.completion_tokens
            level.tokens += tokens
            if stats is not None:
                level.steps += stats["steps"]
                level.accepted += stats["accepted"]
    level.ttft.append((first or time.perf_counter()) - t0)
    if first is not None and last is not None and tokens > 1:
        level.itl.append((last - first) / (tokens - 1))
    level.texts[index] = "".join(pieces)


async def drive(url: str, model: str, questions: list[str], level: Level, max_tokens: int) -> None:
    todo = list(enumerate(questions))

    async def client_loop(client):
        while todo:
            index, question = todo.pop(0)
            try:
                await one_request(client, model, question, max_tokens, level, index)
            except openai.APIError as exc:
                level.errors += 1
                print(f"serve_bench: request failed: {exc}", file=sys.stderr)

    # a request whose connection drops before any answer is sent again (llama-server closed 2 of 32
    # kept-alive connections in one run); an answer that fails midway is still an error
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=2, timeout=3600
    ) as client:
        await one_request(client, model, "Hi", 4, Level("warmup", 1), -1)  # warm the server path
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(level.clients)))
        level.wall_s = time.perf_counter() - t0


def run_level(engine: Engine, drafter: str, clients: int, batch: bool, questions: list[str], args) -> Level:
    config = ServerConfig(
        drafter=drafter,
        max_concurrency=slots(args, clients, batch),
        max_queue=1024,
        prefix_cache_mb=args.prefix_cache_mb,
        batching=batch,
    )
    level = Level(drafter, clients, batch)
    with served(engine, config, args) as url:
        asyncio.run(drive(url, engine.name, questions, level, args.max_tokens))
    report(level)
    return level


def run_peer_level(engine: Engine, clients: int, questions: list[str], args) -> Level:
    """The same clients against llama.cpp's llama-server on the same file and threads, one slot per
    client (its continuous batching)."""
    level = Level(PEER, clients, True)
    with ServerProcess(llamacpp_args(engine, clients, args), command=[args.llamacpp_server]) as url:
        asyncio.run(drive(url, engine.name, questions, level, args.max_tokens))
    report(level)
    return level


def llamacpp_args(engine: Engine, clients: int, args) -> list[str]:
    """llama-server's arguments: the model file, threads, one slot per client with room for the longest
    prompt and answer of this run."""
    model = str(Path(args.model) if args.model else default_model_path())
    threads = str(args.threads or os.cpu_count() or 1)
    context = clients * (max(len(engine.encode_prompt(q)) for q in args.questions) + args.max_tokens + 64)
    argv = ["-m", model, "--alias", engine.name, "-t", threads, "-tb", threads, "-np", str(clients)]
    return argv + ["-c", str(context)]


def report(level: Level) -> None:
    drafter, clients, batch = level.drafter, level.clients, level.batch
    print(
        f"serve_bench: {drafter:>10} x{clients:<3} batch {'on ' if batch else 'off'} "
        f"{level.throughput:7.1f} tok/s, "
        f"TTFT p50 {_stat(statistics.median, level.ttft):.2f}s, "
        f"ITL {_stat(statistics.mean, level.itl) * 1e3:.1f} ms",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def served(engine: Engine, config: ServerConfig, args) -> Iterator[str]:
    """The URL of a server with `config`: `leap serve` as its own process (--server process), or the app on
    a thread of this process, sharing its engine and its interpreter with the clients (--server thread)."""
    if args.server == "thread":
        with BackgroundServer(build_app(engine, config)) as srv:
            yield srv.url
        return
    with ServerProcess(serve_args(engine, config, args)) as url:
        yield url


def serve_args(engine: Engine, config: ServerConfig, args) -> list[str]:
    """`leap serve`'s arguments for `config` and the engine's options."""
    argv = ["--drafter", config.drafter, "--max-concurrency", str(config.max_concurrency)]
    argv += ["--max-queue", str(config.max_queue), "--prefix-cache-mb", str(config.prefix_cache_mb)]
    argv += ["--served-model-name", engine.name, "--dtype", args.dtype, "--backend", args.backend]
    argv += ["--kv-cache", args.kv_cache]
    argv += ["--model", args.model] if args.model else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    return argv + (["--batch"] if config.batching else ["--no-batch"])


def slots(args, clients: int, batch: bool) -> int:
    """Server slots: --max-concurrency, else one per client batched and 4 unbatched (module docstring)."""
    return args.max_concurrency or (clients if batch else 4)


def _stat(fn, values: list[float]) -> float:
    return fn(values) if values else float("nan")


def table(levels: list[Level], engine: Engine, args) -> str:
    plain = {(lv.clients, lv.batch): lv for lv in levels if lv.drafter == "none"}
    ours = plain[min(plain)].texts if plain else {}  # plain decoding with the fewest clients
    peer = [lv for lv in levels if lv.drafter == PEER]
    theirs = min(peer, key=lambda lv: lv.clients).texts if peer else {}  # llama.cpp against itself
    single = {(lv.drafter, lv.batch): lv for lv in sorted(levels, key=lambda lv: -lv.clients)}
    lines = [
        (
            f"Model {engine.name}, dtype {args.dtype}, torch {torch.__version__} with "
            f"{torch.get_num_threads()} "
            f"threads ({engine.backend}, kernels {engine.kernels}); {cpu_model()}, {os.cpu_count()} logical "
            f"CPUs; server: {SERVER_KINDS[args.server]}; "
            f"server slots {args.max_concurrency or '4 unbatched, one per client batched'}; "
            f"{len(args.questions)} chat requests per row, max_tokens {args.max_tokens}, greedy."
        ),
        "",
        (
            "| drafter | batch | clients | tok/s | x none | x fewest clients | TTFT mean (s) | TTFT p50 (s) "
            "| TTFT max (s) | ITL mean (ms) | mean acc | same | errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        base, one = plain.get((lv.clients, lv.batch)), single[(lv.drafter, lv.batch)]
        reference = theirs if lv.drafter == PEER else ours
        acc = f"{lv.mean_accepted:.2f}" if lv.steps else "-"
        ratio = f"{lv.throughput / base.throughput:.2f}" if base and base.throughput else "-"
        scale = f"{lv.throughput / one.throughput:.2f}" if one.throughput else "-"
        same = sum(lv.texts.get(i) == t for i, t in reference.items())
        lines.append(
            f"| {lv.drafter} | {'on' if lv.batch else 'off'} | {lv.clients} | {lv.throughput:.1f} | "
            f"{ratio} | {scale} | "
            f"{_stat(statistics.mean, lv.ttft):.2f} | {_stat(statistics.median, lv.ttft):.2f} | "
            f"{_stat(max, lv.ttft):.2f} | {_stat(statistics.mean, lv.itl) * 1e3:.1f} | "
            f"{acc} | {same}/{len(reference)} | "
            f"{lv.errors} |"
        )
    return "\n".join(lines)


@dataclass
class PrefixPair:
    drafter: str
    prompt_tokens: int = 0
    ttft: dict[str, float] = field(default_factory=dict)  # "cold", "warm" -> seconds
    reused: int = 0  # prompt tokens the warm request took from the cache
    warm: list[dict] = field(default_factory=list)  # the warm request's messages
    text: str = ""  # the warm request's answer
    same: bool = False


def shared_prefixes(engine: Engine, questions: list[str], tokens: int, n: int) -> list[str]:
    """n system messages of `tokens` tokens each (cut from questions), none starting like another."""
    out, pool, tok = [], list(questions), engine.tokenizer
    for i in range(n):
        ids = tok.encode(f"Reference notes, set {i + 1}:")
        while len(ids) < tokens and pool:
            ids += tok.encode("\n" + pool.pop(0))
        out.append(tok.decode(ids[:tokens]))
    return out


def short_questions(engine: Engine, questions: list[str], most: int = 40) -> list[str]:
    """The questions of at most `most` tokens: a new turn after a long shared context."""
    return [q for q in questions if len(engine.tokenizer.encode(q)) <= most]


async def timed_chat(client, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    """TTFT, text and leap_stats of one streamed greedy chat request."""
    t0, first, pieces, stats = time.perf_counter(), None, [], {}
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        stats = (chunk.model_extra or {}).get("leap_stats", stats)
    return (first or time.perf_counter()) - t0, "".join(pieces), stats


async def drive_pairs(url: str, model: str, prefixes: list[str], asks: list[str], pairs, max_tokens):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        await timed_chat(client, model, [{"role": "user", "content": "Hi"}], 4)  # warm the server path
        for i, (system, pair) in enumerate(zip(prefixes, pairs)):
            order = (asks[2 * i], asks[2 * i + 1]) if i % 2 == 0 else (asks[2 * i + 1], asks[2 * i])
            for kind, ask in zip(("cold", "warm"), order):
                messages = [{"role": "system", "content": system}, {"role": "user", "content": ask}]
                pair.ttft[kind], text, stats = await timed_chat(client, model, messages, max_tokens)
            pair.prompt_tokens, pair.reused = stats["prompt_tokens"], stats["prefix_cached_tokens"]
            pair.warm, pair.text = messages, text


def run_prefix(engine: Engine, drafter: str, questions: list[str], args) -> list[PrefixPair]:
    n, asks = args.requests, short_questions(engine, questions)[: 2 * args.requests]
    prefixes = shared_prefixes(engine, [q for q in questions if q not in asks], args.prefix, n)
    pairs = [PrefixPair(drafter) for _ in range(n)]
    config = ServerConfig(drafter=drafter, max_queue=1024, prefix_cache_mb=args.prefix_cache_mb)
    with served(engine, config, args) as url:
        asyncio.run(drive_pairs(url, engine.name, prefixes, asks, pairs, args.max_tokens))
    engine.prefix_cache = None  # the reference: the warm prompts generated from scratch
    gen = GenerationConfig(max_new_tokens=args.max_tokens, drafter=drafter)
    for pair in pairs:
        pair.same = engine.generate(pair.warm, gen).text == pair.text
    return pairs


def prefix_table(rows: list[PrefixPair], engine: Engine, args) -> str:
    lines = [
        (
            f"Model {engine.name} ({engine.backend}, kernels {engine.kernels}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {cpu_model()}, {os.cpu_count()} logical CPUs; shared system "
            f"message of ~{args.prefix} tokens, {args.requests} pairs per drafter, max_tokens "
            f"{args.max_tokens}, greedy; one request at a time."
        ),
        "",
        "| drafter | pair | prompt tokens | reused | TTFT cold (s) | TTFT warm (s) | warm/cold | same |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        ratio = r.ttft["warm"] / r.ttft["cold"]
        lines.append(
            f"| {r.drafter} | {i % args.requests + 1} | {r.prompt_tokens} | {r.reused} | "
            f"{r.ttft['cold']:.3f} | {r.ttft['warm']:.3f} | {ratio:.3f} | {'yes' if r.same else 'NO'} |"
        )
    for drafter in dict.fromkeys(r.drafter for r in rows):
        mine = [r for r in rows if r.drafter == drafter]
        cold = statistics.median(r.ttft["cold"] for r in mine)
        warm = statistics.median(r.ttft["warm"] for r in mine)
        lines.append(f"| {drafter} | median | | | {cold:.3f} | {warm:.3f} | {warm / cold:.3f} | |")
    return "\n".join(lines)


def default_drafters() -> list[str]:
    spec = next((d for d in ("auto", "suffix", "pld", "recycling", "copy") if d in available()), None)
    return ["none"] + ([spec] if spec else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model", default=None, help="GGUF file or folder (default: the bundled model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--data", type=Path, default=SPEC_BENCH, help="question.jsonl (default: the bundled Spec-Bench)"
    )
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per row"
    )
    p.add_argument("--drafters", nargs="+", default=None, help="default: none and auto (or a lookup drafter)")
    p.add_argument(
        "--requests", type=int, default=16, help="requests per row (the same questions in every row)"
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="server slots (default: 4, the server's, unbatched; one per client batched)",
    )
    p.add_argument(
        "--batch",
        choices=["off", "on", "both"],
        default="on",
        help="on: the server batches (its default), off: --no-batch, both: each row twice",
    )
    p.add_argument("--backend", default="auto", help="auto (native where it runs), native or torch")
    p.add_argument("--kv-cache", default="float32", help="the key/value cache's format: float32 or int8")
    p.add_argument(
        "--server",
        choices=["process", "thread"],
        default="process",
        help="process: `leap serve` in its own process, as deployed (default); thread: the app on a thread "
        "of this process, sharing the interpreter with the clients",
    )
    p.add_argument(
        "--prefix", type=int, default=0, help="measure the prefix cache with a shared prefix of ~N tokens"
    )
    p.add_argument(
        "--prefix-cache-mb", type=int, default=DEFAULT_MB, help=f"the server's (default: {DEFAULT_MB})"
    )
    p.add_argument(
        "--llamacpp-server",
        default=None,
        metavar="BIN",
        help="also run llama.cpp's llama-server (this binary) on the same file, threads, clients and "
        "questions, one slot per client (rows 'llama.cpp'; 'same' compares with its own fewest clients)",
    )
    args = p.parse_args(argv)
    drafters = args.drafters or default_drafters()
    if "none" not in drafters:
        drafters = ["none"] + drafters  # the baseline every ratio needs
    engine = Engine.load(
        args.model, dtype=args.dtype, threads=args.threads, backend=args.backend, kv_cache=args.kv_cache
    )
    if args.prefix:
        questions = load_questions(args.data.resolve(), 10_000)
        rows = [row for d in drafters for row in run_prefix(engine, d, questions, args)]
        print(prefix_table(rows, engine, args))
        return 0
    args.questions = load_questions(args.data.resolve(), args.requests)
    batches = {"off": [False], "on": [True], "both": [False, True]}[args.batch]
    levels = [
        run_level(engine, d, c, b, args.questions, args)
        for d in drafters
        for c in args.concurrency
        for b in batches  # side by side: the two modes of one level run one after the other
    ]
    if args.llamacpp_server:
        levels += [run_peer_level(engine, c, args.questions, args) for c in args.concurrency]
    print(table(levels, engine, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
