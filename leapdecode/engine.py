"""The engine: load a model, then generate with any drafter through one decoding loop.

Plain decoding is the same loop with an empty draft, so every drafter is checked against the very code
path it accelerates. See `leapdecode.draft` for the terms (root, draft, accepted, bonus).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from leapdecode.checks import check_int
from leapdecode.costmodel import CostModel
from leapdecode.costmodel import cached as cached_cost
from leapdecode.cpu import cpu_flags, cpu_model
from leapdecode.draft import Draft, StepResult, tree_inputs
from leapdecode.drafters.base import Drafter, DrafterHost, RequestContext, make_drafter
from leapdecode.errors import LeapError
from leapdecode.kernels.build import best_isa, cache_dir
from leapdecode.kernels.native import kernel_scope
from leapdecode.model.backends import load_runner
from leapdecode.model.linear import LinearSpec
from leapdecode.model.runner import FULL, LAST, Plan, Runner
from leapdecode.model.tokenizer import Tokenizer
from leapdecode.prefix_cache import PrefixCache
from leapdecode.sampling import SamplingParams, sample, target_probs
from leapdecode.stats import Stats
from leapdecode.streaming import TextStream
from leapdecode.verify import accept

Prompt = str | Sequence[dict] | Sequence[int]
# forward plans by whether the drafter reads the target's hidden states (returning them costs no compute)
PREFILL = {False: LAST, True: Plan(rows="last", hidden=True)}
VERIFY = {False: FULL, True: Plan(hidden=True)}


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    drafter: str = "auto"
    max_draft: int = 64  # most draft nodes verified in one forward

    def __post_init__(self):
        check_int("max_new_tokens", self.max_new_tokens)
        check_int("max_draft", self.max_draft, 0, 512)
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise LeapError("stop strings must be non-empty strings")


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: Stats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


class Generation:
    """An iterator of text pieces; `result` is set once it is exhausted (or closed)."""

    def __init__(self, make_pieces: Callable[[Generation], Generator[str, None, None]]):
        self.result: Result | None = None
        self._pieces = make_pieces(self)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


class Engine:
    """Generation with any drafter on one model runner (see `leapdecode.model.runner`)."""

    def __init__(
        self,
        model: Runner,
        tokenizer: Tokenizer,
        name: str = "model",
        drafter_options: dict[str, dict] | None = None,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.drafter_options = dict(drafter_options or {})
        self._drafters: dict[str, Drafter] = {}
        self._cost_curve: CostModel | None = None
        self._seq_ids = itertools.count()
        self.prefix_cache: PrefixCache | None = None  # K/V reused across requests (server, chat)
        self.host = DrafterHost(model, tokenizer, self.drafter_options, self.cost_curve, self.new_drafter)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
        drafter_options: dict[str, dict] | None = None,
        backend: str = "auto",
        quant: str = "auto",
        activations: str = "auto",
        kv_cache: str = "float32",
    ) -> Engine:
        """Load a model (None = the bundled default). `drafter_options` maps a drafter name to the
        keyword arguments it is built with (e.g. {"draft-model": {"path": ...}}). `backend`, `quant` and
        `activations` choose the linear kernels and weight format, `kv_cache` the key/value cache's format
        (see `leapdecode.model.linear`)."""
        spec = LinearSpec(backend, quant, activations, kv_cache)  # bad names fail before the model loads
        if threads is not None:
            torch.set_num_threads(check_int("threads", threads))
        loaded = load_runner(model, dtype, device, spec)
        return cls(loaded.runner, loaded.tokenizer, name=loaded.path.name, drafter_options=drafter_options)

    # ------------------------------------------------------------ prompts and drafters

    def encode_prompt(self, prompt: Prompt, raw: bool = False) -> list[int]:
        """A string gets the chat template unless `raw`; a list of messages always does; ids pass as is."""
        if isinstance(prompt, str):
            ids = (
                self.tokenizer.encode(prompt)
                if raw
                else self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            )
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat([m for m in prompt if isinstance(m, dict)])
        elif prompt and all(isinstance(t, int) for t in prompt):
            ids = [t for t in prompt if isinstance(t, int)]
        else:
            raise LeapError("prompt must be a non-empty string, list of messages or list of token ids")
        if not ids:
            raise LeapError("the prompt is empty after tokenization")
        if len(ids) >= self.model.cfg.max_seq_len:
            raise LeapError(
                f"the prompt has {len(ids)} tokens; the model's context holds {self.model.cfg.max_seq_len}"
            )
        if max(ids) >= self.model.cfg.vocab_size or min(ids) < 0:
            raise LeapError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size})")
        return ids

    def drafter(self, name: str) -> Drafter:
        """The engine's drafter of that name; one instance per name, so learned state persists."""
        if name not in self._drafters:
            self._drafters[name] = self.new_drafter(name)
        return self._drafters[name]

    def new_drafter(self, name: str) -> Drafter:
        """A fresh drafter bound to this engine (e.g. one per server slot for concurrent requests)."""
        d = make_drafter(name, **self.drafter_options.get(name, {}))
        d.bind(self.host)
        return d

    def cost_curve(self) -> CostModel:
        """Measured seconds of a verification forward of k tokens after a given context (measured once,
        on first use; saved per machine, model and code)."""
        if self._cost_curve is None:
            key = self._hardware_key()  # outside the scope, which runs torch itself on one thread
            with self.compute_scope():
                self._cost_curve = cached_cost(self.model, key, cache_dir(), _say_measuring)
        return self._cost_curve

    def compute_scope(self) -> AbstractContextManager:
        """Where a step runs: with native kernels, torch stays single-threaded so that its idle OpenMP
        threads never compete with the kernels' threads (see `kernel_scope`)."""
        return kernel_scope() if self.model.backend == "native" else nullcontext()

    def _hardware_key(self) -> dict:
        """What a verify-cost measurement depends on; random-weight models built in code are not cached."""

        return {
            "model": self.name,
            "config": repr(self.model.cfg),
            "backend": self.backend,
            "dtype": str(self.model.dtype),
            "device": str(self.model.device),
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "flags": cpu_flags(),
        }

    # ------------------------------------------------------------ generation

    def generate(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        raw: bool = False,
        drafter: Drafter | None = None,
    ) -> Result:
        gen = self.stream(prompt, config, raw, drafter)
        for _ in gen:
            pass
        assert gen.result is not None  # set when the pieces run out
        return gen.result

    def stream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        raw: bool = False,
        drafter: Drafter | None = None,
    ) -> Generation:
        """Text pieces as they are committed. `drafter` (an instance) overrides `config.drafter`."""
        config = config or GenerationConfig()
        ids = self.encode_prompt(prompt, raw)
        drafter = drafter or self.drafter(config.drafter)  # validates the name before any work
        if drafter.uses_cost:
            self.cost_curve()  # measured before the request (once per machine), not inside its timing
        return Generation(lambda g: self._pieces(ids, config, drafter, g))

    def _pieces(self, prompt_ids, config, drafter, generation) -> Generator[str, None, None]:
        stats = Stats(
            prompt_tokens=len(prompt_ids), drafter=drafter.name, backend=self.backend, kernels=self.kernels
        )
        text = TextStream(self.tokenizer, config.stop)
        out: list[int] = []
        seen = list(prompt_ids)  # every committed token; the cache holds all but the last
        cache = self.model.new_cache(len(prompt_ids) + config.max_new_tokens + config.max_draft + 1)
        drafter.start(RequestContext(tuple(prompt_ids), cache, config.sampling, next(self._seq_ids)))
        t0 = time.perf_counter()
        between_steps = False  # whether the cache holds exactly `seen`'s K/V when we stop
        try:
            for committed in self._token_steps(prompt_ids, cache, config, drafter, stats):
                seen += committed
                fresh, stats.finish_reason = self._take(committed, out, config)
                piece, stopped = text.push(fresh)
                stats.finish_reason = "stop" if stopped else stats.finish_reason
                if piece:
                    yield piece
                if stats.finish_reason:
                    break
            else:
                stats.finish_reason = "length"  # the context is full
            tail = text.flush()
            between_steps = True
            if tail:
                yield tail
        except GeneratorExit:  # closed at a yield: between steps
            between_steps = True
            raise
        finally:
            drafter.stop()
            if between_steps and self.prefix_cache is not None:
                self.prefix_cache.store(seen, cache)
            stats.new_tokens = len(out)
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            generation.result = Result(text.text, out, list(prompt_ids), stats)

    def _take(self, committed: list[int], out: list[int], config: GenerationConfig) -> tuple[list[int], str]:
        """Append committed tokens up to EOS or the token budget; returns (appended, finish reason)."""
        fresh: list[int] = []
        for t in committed:
            if t in self.tokenizer.eos_ids:
                return fresh, "stop"
            fresh.append(t)
            out.append(t)
            if len(out) >= config.max_new_tokens:
                return fresh, "length"
        return fresh, ""

    def _token_steps(self, prompt_ids, cache, config, drafter, stats) -> Iterator[list[int]]:
        """Yields the tokens each step commits: first the prefill's token, then accepted + bonus."""
        model, params = self.model, config.sampling
        rng = params.generator()
        t0 = time.perf_counter()
        hidden = drafter.wants_hidden
        reused = self._reuse_prefix(prompt_ids, cache, hidden)
        stats.prefix_cached_tokens = reused
        ids = torch.tensor(prompt_ids[reused:], device=model.device)  # [P - reused]
        with self.compute_scope():
            positions = torch.arange(reused, len(prompt_ids), device=model.device)
            out = model.forward(ids, positions, cache, plan=PREFILL[hidden])
            root = self._pick(out.logits[-1], params, rng)
            if self.prefix_cache is not None:  # at once: concurrent requests with this prompt share it
                self.prefix_cache.store(prompt_ids, cache)
            if hidden:  # a trained head reads the prompt's states
                drafter.observe(
                    StepResult(Draft(), list(prompt_ids), out.logits, [], root, hidden=out.hidden)
                )
        stats.prefill_s = time.perf_counter() - t0
        yield [root]
        tokens = list(prompt_ids) + [root]
        while (room := cache.max_len - cache.length - 1) >= 0:
            with self.compute_scope():  # per step: nothing leaks to the caller between yields
                t1 = time.perf_counter()
                budget = min(config.max_draft, room)
                draft = drafter.propose(tokens, budget).truncated(budget)
                t2 = time.perf_counter()
                step = self.verify(draft, root, cache, params, rng, hidden)
                t3 = time.perf_counter()
                drafter.observe(step)  # learning from the step is drafting cost too
                t4 = time.perf_counter()
            stats.observe_step(len(draft), len(step.accepted), t2 - t1 + t4 - t3, t3 - t2)
            tokens += step.committed
            root = step.bonus
            yield step.committed

    def _reuse_prefix(self, prompt_ids: list[int], cache, hidden: bool) -> int:
        """Prompt tokens whose K/V the prefix cache put in `cache` (not prefilled). A drafter that reads
        the prompt's hidden states (`hidden`) needs every row computed, so it gets no reuse."""
        if self.prefix_cache is None or hidden:
            return 0
        return self.prefix_cache.restore(prompt_ids, cache)

    def verify(self, draft, root: int, cache, params: SamplingParams, rng, hidden=False) -> StepResult:
        """One forward over [root] + draft, acceptance, and the cache compacted to the accepted path;
        `hidden`: the step carries the committed rows' hidden states (see `StepResult`)."""
        start = cache.length
        tokens, positions, mask = tree_inputs(draft, root, start, self.model.device)
        t0 = time.perf_counter()
        out = self.model.forward(tokens, positions, cache, mask, plan=VERIFY[hidden])
        logits = out.logits  # [1+n, V]
        forward_s = time.perf_counter() - t0
        accepted, bonus = accept(draft, logits, params, rng)
        cache.keep([start] + [start + 1 + i for i in accepted], start)
        states = None if out.hidden is None else out.hidden[[0] + [1 + i for i in accepted]]  # [1+a, D]
        return StepResult(draft, tokens.tolist(), logits, accepted, bonus, forward_s, states)

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, rng) -> int:
        if params.greedy:
            return int(logits.argmax())
        return sample(target_probs(logits.cpu(), params), rng)

    @property
    def kernels(self) -> str:
        """The instruction set the native kernels were built for on this machine (chosen once), or torch."""
        return best_isa() if self.model.backend == "native" else "torch"

    @property
    def backend(self) -> str:
        spec = self.model.spec
        return spec.describe() if isinstance(spec, LinearSpec) else self.model.backend


def _say_measuring() -> None:
    """The first request on a machine measures the verification cost; say so once, since it takes a while."""
    print(
        "leap: measuring what verifying k tokens costs on this machine (once per model and machine)",
        file=sys.stderr,
    )
