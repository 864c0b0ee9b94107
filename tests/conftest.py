"""Shared fixtures: tiny random-weight models (no download) and the bundled model (loaded once)."""

from __future__ import annotations

import pytest
import tokenizers
import torch
from tokenizers import decoders, models

from leapdecode.bench.data import SPEC_BENCH
from leapdecode.engine import Engine
from leapdecode.model.backends import build_runner
from leapdecode.model.config import ModelConfig
from leapdecode.model.linear import LinearSpec
from leapdecode.model.loader import build_model
from leapdecode.model.tokenizer import Tokenizer
from leapdecode.model.torch_runner import TorchRunner
from leapdecode.model.weights import StateSource, expected_shapes

# Tests run mostly tiny models, for which a second OpenMP thread costs more in synchronisation than it
# saves (and suffers badly when the machine is shared); one thread keeps them fast and steady.
torch.set_num_threads(1)


def tiny_config(
    vocab=64,
    dim=32,
    layers=2,
    heads=4,
    kv_heads=2,
    inter=64,
    max_seq=512,
    tie=False,
    qkv_bias=False,
    rope_theta=10000.0,
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        intermediate_size=inter,
        max_seq_len=max_seq,
        tie_embeddings=tie,
        qkv_bias=qkv_bias,
        rope_theta=rope_theta,
        norm_eps=1e-6,
    )


def random_state(cfg: ModelConfig, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Random weights in Hugging Face naming; norms near 1 so activations stay lively."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=gen, dtype=torch.float64) * scale / fan_in**0.5
    state["model.embed_tokens.weight"] *= 4.0  # embeddings are not scaled by fan-in in Llama models
    return state


def char_tokenizer(vocab: int) -> Tokenizer:
    """One token per character; no EOS, so generation runs to max_new_tokens."""
    chars = [chr(0x41 + i) if i < 26 else chr(0x61 + (i - 26) % 26) + str(i // 52) for i in range(vocab)]
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, bos_id=None, eos_ids=set(), chat_template=None, add_bos=False)


def tiny_engine_for(
    cfg: ModelConfig | None = None, seed: int = 0, dtype=torch.float64, spec: LinearSpec | None = None
) -> Engine:
    """A random-weight model's engine: torch in `dtype`, or the runner `spec` chooses (float32)."""
    cfg = cfg or tiny_config()
    runner = tiny_runner(cfg, seed, dtype, spec)
    return Engine(runner, char_tokenizer(cfg.vocab_size), name=f"tiny-{seed}")


def tiny_runner(cfg: ModelConfig, seed: int = 0, dtype=torch.float64, spec: LinearSpec | None = None):
    """The runner of a random-weight model: torch in `dtype`, or the backend `spec` names."""
    source = StateSource(random_state(cfg, seed), cfg)
    if spec is None:
        return TorchRunner(build_model(source, dtype))
    return build_runner(source, spec, dtype)[0]


@pytest.fixture
def tiny_engine() -> Engine:
    return tiny_engine_for()


@pytest.fixture(scope="session")
def bundled_engine() -> Engine:
    """The bundled model on the reference path (torch kernels, float32 weights), as transformers runs it."""
    return Engine.load(backend="torch", quant="none", activations="float32")


@pytest.fixture(scope="session")
def default_engine() -> Engine:
    """The bundled model as `leap generate` runs it by default (the fastest backend available)."""
    return Engine.load()


@pytest.fixture(scope="session")
def spec_bench_questions() -> list[dict]:
    import json

    if not SPEC_BENCH.is_file():
        pytest.fail(f"Spec-Bench questions not found at {SPEC_BENCH}")
    return [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]
