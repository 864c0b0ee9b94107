"""Building a runner: the registry of backends, and the one place where a model is loaded and packed.

`load_runner(path, ...)` opens the model's weights once (`leapdecode.model.source`), resolves the
`LinearSpec` against them and builds the chosen backend's runner, reading one tensor at a time: a
quantized file is never expanded to a float32 copy of the whole model on the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from leapdecode.errors import LeapError
from leapdecode.model import quant as Q
from leapdecode.model.gguf import gguf_file
from leapdecode.model.linear import LinearSpec
from leapdecode.model.runner import Runner
from leapdecode.model.source import open_source, parse_dtype
from leapdecode.model.tokenizer import Tokenizer
from leapdecode.model.weights import EMBED, WeightSource, linear_groups


def _build_torch(source: WeightSource, spec: LinearSpec, dtype: torch.dtype, device) -> Runner:
    from leapdecode.model.loader import build_model
    from leapdecode.model.torch_runner import TorchRunner

    if spec.quant not in ("int8", "int4"):
        return TorchRunner(build_model(source, dtype, device), spec)
    model = build_model(RoundedSource(source, spec), dtype, device)  # simulated: quantized, dequantized
    if source.cfg.tie_embeddings:  # rounded as the output layer only: the embedding lookup stays exact
        model.embed = nn.Parameter(source.float(EMBED).to(dtype=dtype, device=device), requires_grad=False)
    return TorchRunner(model, spec)


def _build_native(source: WeightSource, spec: LinearSpec, dtype: torch.dtype, device) -> Runner:
    from leapdecode.model.native_runner import build_native

    return build_native(source, spec)


BUILDERS: dict[str, Callable[[WeightSource, LinearSpec, torch.dtype, object], Runner]] = {
    "torch": _build_torch,
    "native": _build_native,
}


def runs_stored(source: WeightSource) -> bool | None:
    """Whether the kernels run every linear weight of the source's file as stored (None: no file)."""
    if source.path is None or gguf_file(source.path) is None:
        return None
    return all(source.stored_type(n) in Q.GGUF_TYPES for names in linear_groups(source.cfg) for n in names)


def build_runner(source: WeightSource, spec: LinearSpec, dtype: torch.dtype = torch.float32, device="cpu"):
    """The runner of `source` with `spec` resolved for it; returns (runner, resolved spec)."""
    resolved = spec.resolve(dtype, device, runs_stored(source))
    return BUILDERS[resolved.backend](source, resolved, dtype, device), resolved


@dataclass(frozen=True)
class Loaded:
    runner: Runner
    tokenizer: Tokenizer
    path: Path
    source: WeightSource


def load_runner(
    path: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    spec: LinearSpec | None = None,
) -> Loaded:
    """Open a model (None = the bundled default) and build its runner with `spec`."""
    torch_dtype = parse_dtype(dtype)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as exc:
        raise LeapError(f"device {device!r} is not available: {exc}") from exc
    source, tokenizer, resolved_path = open_source(path)
    runner, _ = build_runner(source, spec or LinearSpec(), torch_dtype, device)
    return Loaded(runner, tokenizer, resolved_path, source)


class RoundedSource:
    """`source` with every linear weight rounded to the spec's format (the torch backend's simulation of
    quantized weights): float(name) of a linear is its quantized values, dequantized."""

    def __init__(self, source: WeightSource, spec: LinearSpec):
        self._source, self._spec = source, spec
        groups = linear_groups(source.cfg)
        self._linears = {n for names in groups for n in names}
        self._head = groups[-1][0]
        self.cfg, self.name, self.path, self.rope_factors = (
            source.cfg,
            source.name,
            source.path,
            source.rope_factors,
        )

    def names(self) -> list[str]:
        return self._source.names()

    def float(self, name: str) -> torch.Tensor:
        w = self._source.float(name)
        if name not in self._linears:
            return w
        return Q.dequantize(Q.quantize(w, self._spec.weight_format(head=name == self._head)))

    def stored(self, name: str) -> Q.QuantWeight | None:
        return None

    def stored_type(self, name: str) -> str:
        return self._source.stored_type(name)
