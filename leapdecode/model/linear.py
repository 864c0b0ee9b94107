"""The linear-layer interface of the model, and the backends behind it.

Every matrix multiply with weights goes through a module with `forward(x [..., in]) -> [..., out]`,
`backend` and `out_features`, so a faster or quantized kernel replaces `F.linear` without touching the
model code. The loader builds `Linear` (torch, the reference, any device); `convert_linears` then swaps
every linear of a loaded model for the chosen backend and weight format:

  backend      torch (F.linear; quantized formats are dequantized, i.e. simulated) | native (compiled
               AVX2 / AVX-512 VNNI kernels, row-invariant, multi-threaded; with a row-invariant attention)
               | auto (native where it runs, else torch)
  quant        none (float32) | int8 (q8_0) | int4 (q4_1; lm_head q8_0) quantized at load | gguf (the
               file's own Q4_0/Q4_1/Q8_0 blocks, values unchanged) | auto (gguf on native when the file
               is a GGUF whose linears are all of those types or float, else none)
  activations  float32 | int8 (blocks of 32, per row) | auto (int8 for quantized weights on native)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leapdecode.errors import LeapError
from leapdecode.kernels.native import kernel_args, run_linear
from leapdecode.kernels.pages import move_to_huge_pages
from leapdecode.model import quant as Q


class Linear(nn.Module):
    """y = x @ W^T (+ b) with W [out, in]."""

    backend = "torch"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [out]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return F.linear(x, self.weight, self.bias)

    def select_rows(self, rows: torch.Tensor) -> Linear:
        """A layer computing only the outputs `rows` (int64 [n], in that order), values unchanged."""
        rows = rows.to(device=self.weight.device, dtype=torch.long)
        return Linear(
            self.weight[rows].contiguous(), None if self.bias is None else self.bias[rows].contiguous()
        )


class NativeLinear(nn.Module):
    """The compiled kernels. Output row i depends only on input row i, computed with the same arithmetic
    whatever the number of rows: verifying a draft gives bit-for-bit the logits of one-token steps.
    Parts (q/k/v of a fused layer stored in different formats) write side by side into one output."""

    backend = "native"

    def __init__(self, parts: list[Q.QuantWeight], bias: torch.Tensor | None, activations: str):
        super().__init__()
        fmts = {p.fmt for p in parts}
        self.parts = [Q.concat(parts)] if len(fmts) == 1 and len(parts) > 1 else list(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.activations = activations
        self.weight_format = "+".join(sorted(fmts))
        self.offsets = [sum(p.out_features for p in self.parts[:i]) for i in range(len(self.parts))]
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()  # [out]
        self._register_parts()

    def _register_parts(self) -> None:
        for i, p in enumerate(self.parts):  # registered so memory accounting and .to() see them
            for name, t in p.tensors().items():
                self.register_buffer(f"part{i}_{name}", t, persistent=False)

    def tensors(self) -> list[torch.Tensor]:
        """The packed weights the kernels read."""
        return [t for p in self.parts for t in p.tensors().values()]

    def replace_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Each packed tensor t becomes fn(t) (a copy elsewhere in memory, values unchanged)."""
        self.parts = [p.map_tensors(fn) for p in self.parts]
        self._register_parts()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def select_rows(self, rows: torch.Tensor) -> NativeLinear:
        """A layer computing only the outputs `rows` (int64 [n], ascending), values unchanged."""
        rows = rows.to(torch.long)
        if rows.numel() > 1 and bool((rows[1:] <= rows[:-1]).any()):
            raise LeapError("select_rows: rows must be strictly ascending")
        parts = []
        for p, off in zip(self.parts, self.offsets):
            mine = rows[(rows >= off) & (rows < off + p.out_features)] - off
            if mine.numel():
                parts.append(Q.select_rows(p, mine))
        if not parts:
            raise LeapError("select_rows: no rows selected")
        bias = None if self.bias is None else self.bias[rows]
        return NativeLinear(parts, bias, self.activations)

    def weights_at(self) -> int:
        """Where the packed weights lie now: what a kernel call's cached pointers must be rebuilt for
        when it changes (a copy, .to(), a move onto huge pages)."""
        first = self.parts[0]
        return (first.qs if first.qs is not None else first.f).data_ptr()

    def _kernel_calls(self) -> list[tuple]:
        """Constant arguments of each part's kernel call, rebuilt whenever the weights moved."""
        if getattr(self, "_calls_key", None) != self.weights_at():
            self._calls = [
                kernel_args(p, "float32" if p.fmt == "f32" else self.activations, off)
                for p, off in zip(self.parts, self.offsets)
            ]
            self._calls_key = self.weights_at()
        return self._calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dtype is not torch.float32:  # the model is on the CPU: convert_linears checked
            raise LeapError(f"backend 'native' needs float32 activations, got {x.dtype}")
        x2 = (
            x.view(-1, self.in_features)
            if x.is_contiguous()
            else x.reshape(-1, self.in_features).contiguous()
        )
        y = torch.empty(x.shape[:-1] + (self.out_features,))  # [..., out]
        run_linear(self._kernel_calls(), x2, y.view(-1, self.out_features))
        if self.bias is not None:
            y += self.bias
        return y


# ---------------------------------------------------------------- backends and specs

QUANTS = ("auto", "none", "int8", "int4", "gguf")
ACTIVATIONS = ("auto", "float32", "int8")
_QUANT_FORMAT = {"none": "f32", "int8": "q8_0", "int4": "q4_1"}


def _torch_problem(model) -> str | None:
    return None


def _native_problem(model) -> str | None:
    from leapdecode.kernels.build import compiler, cpu_problem

    if model is not None and (model.dtype != torch.float32 or model.device.type != "cpu"):
        return f"it runs float32 models on the CPU (this model is {model.dtype} on {model.device})"
    problem = cpu_problem()
    if problem:
        return problem
    return None if compiler() else "no C++ compiler found (g++ or clang++, or set CXX)"


def _torch_make(parts: list[Q.QuantWeight], bias, activations: str, model) -> nn.Module:
    if activations == "int8":
        raise LeapError("backend 'torch' runs float activations only; use --activations float32")
    w = torch.cat([Q.dequantize(p) for p in parts]).to(dtype=model.dtype, device=model.device)
    return Linear(w, None if bias is None else bias.to(dtype=model.dtype, device=model.device))


def _native_make(parts: list[Q.QuantWeight], bias, activations: str, model) -> nn.Module:
    if activations == "int8" and all(p.fmt == "f32" for p in parts):
        raise LeapError("int8 activations need quantized weights (--quant int8, int4 or gguf)")
    return NativeLinear(parts, bias, activations)


@dataclass(frozen=True)
class Backend:
    name: str
    problem: Callable  # (model | None) -> why it cannot run, or None
    make: Callable  # (parts, bias, activations, model) -> module


BACKENDS = {
    b.name: b
    for b in (Backend("torch", _torch_problem, _torch_make), Backend("native", _native_problem, _native_make))
}


def available_backends(model=None) -> list[str]:
    """Backends that can run here (and run `model`, when given)."""
    return [name for name, b in BACKENDS.items() if b.problem(model) is None]


@dataclass(frozen=True)
class LinearSpec:
    backend: str = "auto"
    quant: str = "auto"
    activations: str = "auto"

    def __post_init__(self):
        if self.backend not in ("auto", *BACKENDS):
            raise LeapError(f"unknown backend {self.backend!r}; expected one of: auto, {', '.join(BACKENDS)}")
        if self.quant not in QUANTS:
            raise LeapError(f"unknown quant {self.quant!r}; expected one of: {', '.join(QUANTS)}")
        if self.activations not in ACTIVATIONS:
            raise LeapError(
                f"unknown activations {self.activations!r}; expected one of: {', '.join(ACTIVATIONS)}"
            )

    def resolve(self, model, gguf_path: Path | None) -> LinearSpec:
        """The concrete spec for this model: no 'auto' left, everything checked."""
        backend = self.backend
        if backend == "auto":
            backend = "native" if BACKENDS["native"].problem(model) is None else "torch"
        problem = BACKENDS[backend].problem(model)
        if problem:
            raise LeapError(f"backend {backend!r} cannot run here: {problem}")
        quant = self.quant
        if quant == "auto":  # the file's own blocks when the native kernels run them all, else float32
            runs = (
                gguf_path is not None
                and backend == "native"
                and not Q.gguf_unsupported_types(Path(gguf_path))
            )
            quant = "gguf" if runs else "none"
        if quant == "gguf" and gguf_path is None:
            raise LeapError("--quant gguf needs a GGUF model file")
        activations = self.activations
        if activations == "auto":
            activations = "int8" if backend == "native" and quant != "none" else "float32"
        return LinearSpec(backend, quant, activations)

    def describe(self) -> str:
        return f"{self.backend}/{self.quant}/{self.activations}"


def linear_slots(model) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every linear layer: per block wqkv, wo, w13, w2; then lm_head."""
    slots = []
    for block in model.blocks:
        slots += [(block.attn, "wqkv"), (block.attn, "wo"), (block.mlp, "w13"), (block.mlp, "w2")]
    return slots + [(model, "lm_head")]


def convert_linears(
    model,
    backend: str = "auto",
    quant: str = "auto",
    gguf_path: Path | None = None,
    activations: str = "auto",
) -> LinearSpec:
    """Replace every linear layer of `model` in place; returns the resolved spec (also kept as
    `model.linear_spec`). `gguf_path` is the file the model was loaded from, for quant 'gguf'/'auto'."""
    spec = LinearSpec(backend, quant, activations).resolve(model, gguf_path)
    be = BACKENDS[spec.backend]
    sources = Q.gguf_linear_weights(Path(gguf_path), model.cfg) if spec.quant == "gguf" else None
    for i, (owner, attr) in enumerate(linear_slots(model)):
        old = getattr(owner, attr)
        parts = sources[i] if sources else [Q.quantize(_float_weight(old), _load_format(spec.quant, attr))]
        _check_parts(parts, old, attr)
        setattr(owner, attr, be.make(parts, old.bias, spec.activations, model))
    _set_attention(model, spec.backend)
    if spec.backend == "native":
        layers = (getattr(owner, attr) for owner, attr in linear_slots(model))
        move_to_huge_pages(layer for layer in layers if isinstance(layer, NativeLinear))
    model.stack = _native_stack(model) if spec.backend == "native" else None
    model.linear_spec = spec
    return spec


def _native_stack(model):
    """One kernel call for all blocks where the model's shapes allow it (else the per-block path)."""
    from leapdecode.model.stack import NativeStack

    try:
        return NativeStack(model)
    except LeapError:
        return None


def _set_attention(model, backend: str) -> None:
    """torch's attention rounds differently for one query row than for several, so with it a verified
    draft could change a greedy token: the native backend brings a row-invariant attention too."""
    from leapdecode.kernels.native import attention

    for block in model.blocks:
        if not hasattr(block.attn, "sdpa"):
            if backend == "native":
                raise LeapError("this model's attention cannot be replaced (Attention.sdpa is missing)")
            continue
        block.attn.sdpa = attention if backend == "native" else F.scaled_dot_product_attention


def _float_weight(layer: nn.Module) -> torch.Tensor:
    """[out, in] weights of a layer of any backend (a converted model can be converted again)."""
    if isinstance(layer, NativeLinear):
        return torch.cat([Q.dequantize(p) for p in layer.parts])
    return layer.weight


def _load_format(quant: str, attr: str) -> str:
    fmt = _QUANT_FORMAT[quant]
    # 4-bit output layers cost the most quality (see `leap eval`); GGUF recipes keep them at 8 bits too.
    return "q8_0" if attr == "lm_head" and fmt == "q4_1" else fmt


def _check_parts(parts: list[Q.QuantWeight], old: nn.Module, attr: str) -> None:
    shape = (sum(p.out_features for p in parts), parts[0].in_features)
    if shape != (old.out_features, old.in_features):
        raise LeapError(
            f"{attr}: the GGUF weights have shape {shape}, the model has "
            f"{(old.out_features, old.in_features)} (is this the file the model came from?)"
        )
