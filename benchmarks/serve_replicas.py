"""`leap serve --replicas`: aggregate throughput of one process against engine replicas on Ray Serve, and
what prefix affinity keeps of multi-turn conversations. Prints two markdown tables.

Servers, one after the other, each given the same CPUs in all (--cpus, default 2):
  single    the single-process server (`leap serve`, which is --replicas 1), its engine on --cpus threads;
  single 1 thread   the same on one thread (for throughput);
  ray x2    two replicas on Ray Serve with --cpus/2 CPUs each (`leap serve --replicas 2`).
Every server has the server's default slots (4 per process) and the bundled model unless --model. For
throughput each is `leap serve` in a process of its own; the multi-turn runs serve from this process
(only they can switch affinity off).

Throughput: at 8 and 32 concurrent streams, chat completions of Spec-Bench first turns (greedy, drafter
none, --max-tokens each), 2 requests per stream; tok/s = completion tokens / wall time, the best of
--repeats rounds (each round starts every server in turn).

Multi-turn: --conversations Spec-Bench questions as conversations of their two turns and a third ("Now
say that again in one sentence."), run concurrently, each turn after the previous answer, with --drafter;
mean acc = tokens committed per verification step over turns 2 and 3 (bonus included), cached = their
prompt tokens reused from a prefix cache; compared with affinity routing and without it (every request
to the least-loaded replica). same = conversations whose every turn equals the single server's (greedy
decoding is lossless wherever a request runs).

    python benchmarks/serve_replicas.py                       # the full run (a few minutes on 2 cores)
    python benchmarks/serve_replicas.py --levels 2 --max-tokens 8 --conversations 2 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before Ray loads gRPC: no line per fork of a subprocess

import openai

from leapdecode.bench.data import SPEC_BENCH
from leapdecode.cpu import cpu_model
from leapdecode.engine import Engine
from leapdecode.server import BackgroundServer, ServerConfig, ServerProcess, build_app
from leapdecode.server.ray_app import RayOptions, ReplicaServer
from leapdecode.server.ray_replica import ReplicaSpec

THIRD_TURN = "Now say that again in one sentence."
KINDS = ("single", "single 1 thread", "ray x2")


def questions() -> list[list[str]]:
    return [json.loads(line)["turns"] for line in SPEC_BENCH.read_text().splitlines() if line.strip()]


def serve_args(kind: str, args) -> list[str]:
    """`leap serve`'s arguments for a server of that kind, drafter none."""
    argv = ["--drafter", "none"]
    argv += ["--served-model-name", "m", "--max-queue", "1024", "--log-level", "warning"]
    argv += ["--model", args.model] if args.model else []
    if kind.startswith("single"):
        return argv + ["--threads", "1" if kind.endswith("1 thread") else str(args.cpus)]
    n = int(kind.split("x")[1])
    return argv + ["--replicas", str(n), "--replica-cpus", str(args.cpus // n)]


def process(kind: str, args) -> ServerProcess:
    """`leap serve` of that kind run as its own process (the clients here share no GIL with it)."""
    return ServerProcess(serve_args(kind, args))


@contextlib.contextmanager
def server(kind: str, args, drafter: str, affinity: bool = True) -> Iterator[str]:
    """The URL of a server of that kind ("single", "ray xN") in this process."""
    config = ServerConfig(drafter=drafter, model_name="m", max_queue=1024)
    if kind == "single":
        engine = Engine.load(args.model, threads=args.cpus)
        with BackgroundServer(build_app(engine, config)) as srv:
            yield srv.url
        return
    n = int(kind.split("x")[1])
    spec = ReplicaSpec({"model": args.model}, config, args.cpus // n)
    with (
        ReplicaServer(RayOptions(n, args.cpus // n), spec) as rs,
        BackgroundServer(rs.app(affinity=affinity)) as srv,
    ):
        yield srv.url


async def chat(client, messages: list[dict], max_tokens: int) -> tuple[str, dict, int]:
    resp = await client.chat.completions.create(
        model="m", messages=messages, max_tokens=max_tokens, temperature=0
    )
    return resp.choices[0].message.content, resp.model_extra["leap_stats"], resp.usage.completion_tokens


def client_for(url: str):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)


async def throughput(url: str, streams: int, max_tokens: int) -> float:
    todo = [turns[0] for turns in questions()][: 2 * streams]
    tokens = 0

    async def one_stream(client):
        nonlocal tokens
        while todo:
            text = todo.pop(0)
            stream = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                tokens += chunk.usage.completion_tokens if chunk.usage else 0

    async with client_for(url) as client:
        await chat(client, [{"role": "user", "content": "Hi"}], 4)  # warm every path
        t0 = time.perf_counter()
        await asyncio.gather(*(one_stream(client) for _ in range(streams)))
        return tokens / (time.perf_counter() - t0)


async def conversations(url: str, n: int, max_tokens: int) -> tuple[list[list[str]], list[dict]]:
    """Each conversation's answers, and the leap_stats of its later turns."""

    async def one(client, turns: list[str]):
        messages: list[dict] = []
        answers, later = [], []
        for i, question in enumerate([*turns, THIRD_TURN]):
            messages.append({"role": "user", "content": question})
            answer, stats, _ = await chat(client, messages, max_tokens)
            messages.append({"role": "assistant", "content": answer})
            answers.append(answer)
            later += [stats] if i else []
        return answers, later

    async with client_for(url) as client:
        done = await asyncio.gather(*(one(client, turns) for turns in questions()[:n]))
    return [a for a, _ in done], [s for _, stats in done for s in stats]


def summary(stats: list[dict]) -> tuple[float, float]:
    steps = sum(s["steps"] for s in stats)
    accepted = sum(s["accepted"] for s in stats)
    cached = sum(s["prefix_cached_tokens"] for s in stats) / max(1, sum(s["prompt_tokens"] for s in stats))
    return (accepted + steps) / max(1, steps), cached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or folder (default: the bundled model)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of each server in all (default: 2)")
    p.add_argument(
        "--levels", type=int, nargs="+", default=[8, 32], help="concurrent streams (default: 8 32)"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--repeats", type=int, default=2, help="rounds over the servers; the best counts (default: 2)"
    )
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--drafter", default="suffix", help="drafter of the multi-turn runs (default: suffix)")
    args = p.parse_args(argv)

    rates: dict[tuple[str, int], float] = {}
    turns: dict[str, tuple[list[list[str]], list[dict]]] = {}
    for _ in range(args.repeats):  # rounds over the servers, so that a busy spell hits them all alike
        for kind in KINDS:
            with process(kind, args) as url:
                for level in args.levels:
                    rate = asyncio.run(throughput(url, level, args.max_tokens))
                    rates[kind, level] = max(rate, rates.get((kind, level), 0.0))
                    print(f"serve_replicas: {kind} x{level}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
    for kind, affinity in (("single", True), ("ray x2", True), ("ray x2", False)):
        name = f"{kind}{'' if kind == 'single' else ', affinity' if affinity else ', least-loaded'}"
        with server(kind, args, args.drafter, affinity) as url:
            turns[name] = asyncio.run(conversations(url, args.conversations, args.max_tokens))

    print(f"CPU: {cpu_model()}, {args.cpus} CPUs per server; --max-tokens {args.max_tokens}\n")
    print("| streams | " + " | ".join(f"{k} tok/s" for k in KINDS) + " |")
    print("|---:|" + "---:|" * len(KINDS))
    for level in args.levels:
        print(f"| {level} | " + " | ".join(f"{rates[k, level]:.1f}" for k in KINDS) + " |")
    print(f"\n| {args.conversations} conversations, drafter {args.drafter} | mean acc | cached | same |")
    print("|---|---:|---:|---:|")
    reference = turns["single"][0]
    for name, (answers, stats) in turns.items():
        acc, cached = summary(stats)
        same = sum(a == r for a, r in zip(answers, reference))
        print(f"| {name} | {acc:.2f} | {cached:.0%} | {same}/{len(reference)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
