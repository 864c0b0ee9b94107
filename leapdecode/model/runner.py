"""The one door to a model: a runner per backend, with one forward.

    forward(tokens [S], positions [S], cache, mask=None, plan=Plan()) -> Output(logits, hidden)
    forward_batch(runner, [BatchItem(tokens, positions, cache, mask, plan), ...]) -> [Output, ...]

`tokens` are one sequence's new rows after `cache.length` cached ones, `positions` their rope positions
(a draft tree's nodes sit at their depth), `mask` a bool [S, cache.length + S] attention mask (None:
causal). The `Plan` says what to compute: which blocks (self-drafting skips some), whose logits (every
row, the last, none), through which output layer (a drafter's part of the vocabulary), whether to
return the hidden states (the final norm's input) and whether the cache's length advances.

A runner is built once from a `WeightSource` (`build_runner`) and never changed afterwards: a backend is
chosen by building its runner, not by swapping modules of a live model. Backends:

  torch   `TorchRunner`: the reference Transformer (`llama.py`) on any device and dtype
  native  `NativeRunner`: the compiled CPU kernels, every block in one call (`stack.py`), row-invariant
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from leapdecode.cache import KVCache
from leapdecode.errors import LeapError
from leapdecode.model.config import ModelConfig

ROWS = ("all", "last", "none")
Head = Callable[[torch.Tensor], torch.Tensor]  # hidden [..., D] (after the final norm) -> logits [..., V]


@dataclass(frozen=True)
class Plan:
    """What one forward computes.

    layers: (skip_attn, skip_mlp) per block, or None for the whole model; rows: the rows whose logits are
    returned ("all", "last" or "none"); head: an output layer used instead of the model's (same input,
    any number of outputs; a native layer runs inside the kernel call); hidden: also return the hidden
    states [S, D] of every row (the residual stream after the last block, before the final norm);
    features: block indices whose output residual streams come back as `Output.features` [F, S, D]
    (a trained drafter reads the target's own features); advance: whether `cache.length` grows by S
    (False: the rows' keys and values are written past the committed ones and overwritten later, as a
    drafter's trial does)."""

    layers: tuple[tuple[bool, bool], ...] | None = None
    rows: str = "all"
    head: Head | None = None
    hidden: bool = False
    features: tuple[int, ...] = ()
    advance: bool = True

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.rows not in ROWS:
            raise LeapError(f"plan rows must be one of {', '.join(ROWS)}, got {self.rows!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple((bool(a), bool(m)) for a, m in self.layers))


NO_LOGITS = torch.empty(0)  # the logits of a plan that asks for none


@dataclass(frozen=True)
class BatchItem:
    """One sequence's part of a batched forward: the arguments of `Runner.forward` for it (its own
    cache, rows, positions, mask and plan)."""

    tokens: torch.Tensor  # [S]
    positions: torch.Tensor  # [S]
    cache: KVCache
    mask: torch.Tensor | None = None  # bool [S, cache.length + S]; None: causal
    plan: Plan = field(default_factory=Plan)


def forward_each(runner: Runner, items: Sequence[BatchItem]) -> list[Output]:
    """A batched forward as one forward per sequence: the contract's reference and the fallback of a
    runner without a batched kernel (each row is computed exactly as it would be alone)."""
    return [runner.forward(i.tokens, i.positions, i.cache, i.mask, i.plan) for i in items]


def forward_batch(runner: Runner, items: Sequence[BatchItem]) -> list[Output]:
    """Several sequences' forwards, each with its own cache, in one call where the runner has a batched
    forward (`TorchRunner.forward_batch`: one weight pass for every row), else one forward per item.
    The outputs equal one `forward` per item, row for row (bit for bit where the backend is
    row-invariant)."""
    batched = getattr(runner, "forward_batch", None)
    return batched(items) if batched is not None else forward_each(runner, items)


FULL = Plan()
LAST = Plan(rows="last")


@dataclass(frozen=True)
class Output:
    logits: torch.Tensor  # [S, V] (rows "all"), [1, V] ("last"), NO_LOGITS ("none")
    hidden: torch.Tensor | None  # [S, D] when the plan asked for it
    features: torch.Tensor | None = None  # [F, S, D]: the plan's `features`, in its order


def check_layers(layers: tuple[tuple[bool, bool], ...] | None, n_blocks: int) -> None:
    if layers is not None and len(layers) != n_blocks:
        raise LeapError(
            f"plan layers: {len(layers)} (skip_attn, skip_mlp) pairs for the model's {n_blocks} blocks"
        )


def check_features(features: tuple[int, ...], n_blocks: int) -> None:
    bad = [f for f in features if not 0 <= f < n_blocks]
    if bad:
        raise LeapError(f"features: block {bad[0]} is outside the model's {n_blocks} blocks")


class Runner(Protocol):
    """What every backend provides (see the module docstring)."""

    cfg: ModelConfig
    backend: str  # "torch" or "native"
    spec: object  # the resolved LinearSpec the runner was built with

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def nbytes(self) -> int:
        """Bytes of weights a one-token forward reads (the output layer included)."""
        ...

    def new_cache(self, max_len: int) -> KVCache: ...

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask=None, plan: Plan = FULL
    ) -> Output: ...

    def output_rows(self, rows: torch.Tensor) -> Head:
        """The output layer restricted to the vocabulary ids `rows` (ascending): a drafter's head."""
        ...


def check_inputs(
    cfg: ModelConfig, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask
) -> int:
    """The row count S, after checking the shapes every backend relies on."""
    if tokens.dim() != 1 or positions.shape != tokens.shape:
        raise LeapError(
            f"a forward takes tokens [S] and positions [S], got {tuple(tokens.shape)} and "
            f"{tuple(positions.shape)}"
        )
    s, n = tokens.shape[0], cache.length
    if n + s > cache.max_len:
        raise LeapError(f"context full: {n + s} tokens exceed the cache size {cache.max_len}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (s, n + s)):
        raise LeapError(f"attention mask must be bool [{s}, {n + s}], got {mask.dtype} {tuple(mask.shape)}")
    return s


def new_cache(cfg: ModelConfig, max_len: int, dtype: torch.dtype, device, spec: object = None) -> KVCache:
    """A cache of at most the model's context for one sequence, in the key/value format of `spec` (a
    `LinearSpec`; float32 without one)."""
    kv = getattr(spec, "kv_cache", "float32")
    size = min(max_len, cfg.max_seq_len)
    return KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, size, dtype=dtype, device=device, kv_dtype=kv)
