"""Where a model's tensors come from: the `WeightSource` interface, the tensor names and shapes a config
implies, and `StateSource` (tensors already in memory).

A source is opened once and checked once: every tensor the config implies is there, with its shape, and
nothing else. After that each tensor is read (and dequantized) only when asked for, one at a time, so
building a model or packing weights for the kernels never holds a second copy of the whole model.
Names are Hugging Face's ("model.layers.0.self_attn.q_proj.weight"); q/k rows are in Hugging Face's
(half-split rotary) order whatever the file stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from leapdecode.errors import LeapError
from leapdecode.model.config import ModelConfig
from leapdecode.model.quant import QuantWeight

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
WO, GATE_UP, DOWN = "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"


@runtime_checkable
class WeightSource(Protocol):
    """A model's configuration and tensors, read on demand."""

    cfg: ModelConfig
    name: str  # file or folder name, for messages and cache keys
    path: Path | None
    rope_factors: torch.Tensor | None  # llama3 per-frequency divisors, float32, or None

    def names(self) -> list[str]:
        """Every tensor, in Hugging Face naming."""
        ...

    def float(self, name: str) -> torch.Tensor:
        """One tensor as float32 on the CPU in Hugging Face layout, read when asked, never cached."""
        ...

    def stored(self, name: str) -> QuantWeight | None:
        """The file's own blocks of a matrix, values unchanged, when the kernels run them as stored."""
        ...

    def stored_type(self, name: str) -> str:
        """The type the tensor is stored in: "Q4_K", "Q6_K", "F32", ..."""
        ...


def layer_prefix(n: int) -> str:
    return f"model.layers.{n}."


def linear_groups(cfg: ModelConfig) -> list[list[str]]:
    """Weight names of every linear layer of the fused model, in order: per block [q, k, v], [o],
    [gate, up], [down]; then [lm_head] (the embeddings when they are tied)."""
    groups = []
    for n in range(cfg.n_layers):
        p = layer_prefix(n)
        groups += [[p + x + ".weight" for x in QKV], [p + WO + ".weight"]]
        groups += [[p + x + ".weight" for x in GATE_UP], [p + DOWN + ".weight"]]
    return groups + [[EMBED if cfg.tie_embeddings else LM_HEAD]]


def is_linear_weight(name: str) -> bool:
    """Whether a tensor is the weight of a linear layer (the embeddings count: they may be the output
    layer's)."""
    return name in (EMBED, LM_HEAD) or name.endswith("_proj.weight")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape, in Hugging Face naming."""
    d, i = cfg.dim, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, d), NORM: (d,)}
    if not cfg.tie_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, d)
    for n in range(cfg.n_layers):
        p = layer_prefix(n)
        shapes.update({p + norm: (d,) for norm in LAYER_NORMS})
        for proj, rows in zip(QKV, (q, kv, kv)):
            shapes[p + proj + ".weight"] = (rows, d)
            if cfg.qkv_bias:
                shapes[p + proj + ".bias"] = (rows,)
        shapes[p + WO + ".weight"] = (d, q)
        shapes.update({p + proj + ".weight": (i, d) for proj in GATE_UP})
        shapes[p + DOWN + ".weight"] = (d, i)
    return shapes


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, source: str) -> None:
    """Raise unless `shapes` (name -> shape) holds exactly the tensors `cfg` implies."""
    want = expected_shapes(cfg)
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or extra:
        raise LeapError(
            f"{source}: tensor names do not match the model config "
            f"(missing: {_few(missing)}; unexpected: {_few(extra)})"
        )
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise LeapError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, expected {shape}")


def _few(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


class StateSource:
    """Tensors already in memory, by Hugging Face name (tests, conversions). `float` hands float64
    tensors back unchanged, so a float64 model built from them keeps every value."""

    path: Path | None = None
    rope_factors: torch.Tensor | None = None

    def __init__(self, state: dict[str, torch.Tensor], cfg: ModelConfig, name: str = "weights"):
        check_shapes({k: tuple(v.shape) for k, v in state.items()}, cfg, name)
        self.state, self.cfg, self.name = state, cfg, name

    def names(self) -> list[str]:
        return list(self.state)

    def float(self, name: str) -> torch.Tensor:
        t = self._get(name).detach().cpu()
        return t if t.dtype == torch.float64 else t.to(torch.float32)

    def stored(self, name: str) -> QuantWeight | None:
        self._get(name)
        return None

    def stored_type(self, name: str) -> str:
        return "F64" if self._get(name).dtype == torch.float64 else "F32"

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise LeapError(f"{self.name}: no tensor {name!r}")
        return self.state[name]
