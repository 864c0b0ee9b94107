"""Peers: other engines answering the same token ids from the same model file, in the same process.

- ``hf``: transformers ``generate`` (greedy unless a temperature is given), the GGUF dequantized to our
  dtype; ``hf-pld``: the same with ``prompt_lookup_num_tokens=10``.
- ``llamacpp``: llama-cpp-python on the GGUF itself, so it computes in the file's quantized format (our
  engine and transformers dequantize it); ``llamacpp-pld``: with ``LlamaPromptLookupDecoding(10)``.

Peers get our chat-templated token ids directly (never text), so tokenizer differences cannot matter, and
stop at the same end-of-turn ids with the same token budget. llama.cpp and transformers use the thread
count torch was given.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leapdecode.bench.machine import package_version
from leapdecode.bench.methods import Contender, Run
from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams

PROMPT_LOOKUP_TOKENS = 10
SETUP = "benchmarks/setup_peers.sh"


@dataclass(frozen=True)
class PeerSpec:
    module: str  # what must be importable
    package: str  # what to pip install
    build: Callable[[PeerContext], Contender]


@dataclass
class PeerContext:
    """What every peer is built from; loaded peer models are shared between the variants of one peer."""

    model_path: Path
    dtype: torch.dtype
    eos_ids: frozenset[int]
    threads: int
    n_ctx: int
    seed: int = 0
    _loaded: dict | None = None

    def shared(self, key: str, load: Callable):
        self._loaded = self._loaded if self._loaded is not None else {}
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]


def cut_at_eos(ids: Sequence[int], eos_ids: frozenset[int]) -> list[int]:
    """New tokens up to (not including) the first end-of-turn token."""
    out = []
    for t in ids:
        if t in eos_ids:
            break
        out.append(int(t))
    return out


# ------------------------------------------------------------------ transformers


class HFPeer(Contender):
    kind = "peer"

    def __init__(self, name: str, model, eos_ids: frozenset[int], prompt_lookup: int | None = None):
        self.name, self.model, self.eos_ids, self.prompt_lookup = (
            name,
            model,
            frozenset(eos_ids),
            prompt_lookup,
        )

    def run(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> Run:
        x = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)  # [1, P]
        kwargs = self._generate_kwargs(max_new_tokens, sampling)
        if not sampling.greedy and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), **kwargs)  # [1, P + N]
        wall = time.perf_counter() - t0
        return Run(cut_at_eos(out[0, len(prompt_ids) :].tolist(), self.eos_ids), wall)

    def _generate_kwargs(self, max_new_tokens: int, sampling: SamplingParams) -> dict:
        eos = sorted(self.eos_ids)
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": 0,
            "eos_token_id": eos or None,
            "pad_token_id": eos[0] if eos else 0,
            "num_beams": 1,
            "repetition_penalty": 1.0,
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_k=sampling.top_k or None,
                top_p=sampling.top_p,
            )
        if self.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        return kwargs

    def describe(self) -> dict:
        return {
            "engine": "transformers",
            "version": package_version("transformers"),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "prompt_lookup_num_tokens": self.prompt_lookup,
            "compute": "GGUF dequantized to the benchmark dtype (as ours)",
        }


def load_hf_model(path: Path, dtype: torch.dtype):
    import transformers

    transformers.logging.set_verbosity_error()  # generation-config notices are not results
    if path.is_dir():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
    return model.eval()


def _hf(prompt_lookup: int | None) -> Callable[[PeerContext], Contender]:
    def build(ctx: PeerContext) -> Contender:
        model = ctx.shared("hf", lambda: load_hf_model(ctx.model_path, ctx.dtype))
        return HFPeer("hf-pld" if prompt_lookup else "hf", model, ctx.eos_ids, prompt_lookup)

    return build


# ------------------------------------------------------------------ llama.cpp


class LlamaCppPeer(Contender):
    kind = "peer"

    def __init__(
        self, name: str, llm, eos_ids: frozenset[int], weights: str, prompt_lookup: int | None = None
    ):
        self.name, self.llm, self.eos_ids = name, llm, frozenset(eos_ids)
        self.weights, self.prompt_lookup = weights, prompt_lookup

    def run(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> Run:
        self.llm.reset()  # no reuse of the previous prompt's cache: every contender prefills in full
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        out: list[int] = []
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, **self._sampling_kwargs(sampling)):
            if tok in self.eos_ids:
                break
            out.append(int(tok))
            if len(out) >= max_new_tokens:
                break
        wall = time.perf_counter() - t0
        return Run(out, wall)

    @staticmethod
    def _sampling_kwargs(sampling: SamplingParams) -> dict:
        # temp 0 is llama.cpp's greedy sampler; penalties off as in every other contender
        return {
            "temp": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "min_p": 0.0,
            "typical_p": 1.0,
            "repeat_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "reset": True,
        }

    def describe(self) -> dict:
        return {
            "engine": "llama.cpp via llama-cpp-python",
            "version": package_version("llama_cpp_python"),
            "build": llama_build(),
            "num_pred_tokens": self.prompt_lookup,
            "compute": f"quantized: llama.cpp computes with the GGUF's {self.weights} weights",
        }


def gguf_weight_format(path: Path) -> str:
    """The GGUF's file type (e.g. Q4_1), as llama.cpp computes with it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.contents())
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {value}"


def llama_build() -> str:
    """How benchmarks/setup_peers.sh built llama.cpp here (e.g. without AMX), or "unknown"."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return "not installed"
    marker = Path(spec.origin).with_name("leap_build.txt")
    return marker.read_text().strip() if marker.is_file() else "unknown (not built by setup_peers.sh)"


def _llamacpp(prompt_lookup: int | None) -> Callable[[PeerContext], Contender]:
    def build(ctx: PeerContext) -> Contender:
        if ctx.model_path.is_dir():
            raise LeapError("--peers llamacpp needs a GGUF model file (--model FILE.gguf), not a folder")
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        extra: dict[str, Any] = {}
        if prompt_lookup:
            # logits_all: without it llama-cpp-python sizes its score buffer by n_batch rows and fails
            # once prompt + output pass n_batch tokens
            extra = {
                "draft_model": LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup),
                "logits_all": True,
            }
        llm = Llama(
            model_path=str(ctx.model_path),
            n_ctx=ctx.n_ctx,
            n_threads=ctx.threads,
            n_threads_batch=ctx.threads,
            seed=ctx.seed,
            verbose=False,
            **extra,
        )
        weights = ctx.shared("gguf-format", lambda: gguf_weight_format(ctx.model_path))
        return LlamaCppPeer(
            "llamacpp-pld" if prompt_lookup else "llamacpp", llm, ctx.eos_ids, weights, prompt_lookup
        )

    return build


PEERS: dict[str, PeerSpec] = {
    "hf": PeerSpec("transformers", "transformers", _hf(None)),
    "hf-pld": PeerSpec("transformers", "transformers", _hf(PROMPT_LOOKUP_TOKENS)),
    "llamacpp": PeerSpec("llama_cpp", "llama-cpp-python", _llamacpp(None)),
    "llamacpp-pld": PeerSpec("llama_cpp", "llama-cpp-python", _llamacpp(PROMPT_LOOKUP_TOKENS)),
}


def check_peers(names: Sequence[str]) -> None:
    """Unknown or not-installed peers fail here, in one line, before any model loads."""
    for name in names:
        if name not in PEERS:
            raise LeapError(f"--peers: unknown peer {name!r}; expected one of: {', '.join(PEERS)}")
        spec = PEERS[name]
        if importlib.util.find_spec(spec.module) is None:
            raise LeapError(
                f"--peers {name}: {spec.package} is not installed; install the peers with "
                f"`{SETUP}` (or `pip install {spec.package}`)"
            )


def make_peers(names: Sequence[str], ctx: PeerContext) -> list[Contender]:
    check_peers(names)
    return [_build(name, ctx) for name in names]


def _build(name: str, ctx: PeerContext) -> Contender:
    try:
        return PEERS[name].build(ctx)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if isinstance(exc, LeapError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeapError(f"--peers {name}: cannot load {ctx.model_path.name}: {first}") from exc
