"""The linear layers, and the spec that says which kernels and weight format a runner's layers use.

`Linear` is the torch layer (the reference, any device); `NativeLinear` runs the compiled kernels on
packed weights (`leapdecode.model.quant`). A `LinearSpec` is resolved once per model and the runner of
its backend is built from it (`leapdecode.model.backends`):

  backend      torch (F.linear; quantized formats are dequantized, i.e. simulated) | native (compiled
               AVX2 / AVX-512 VNNI kernels, row-invariant, multi-threaded, every block in one call)
               | auto (native where it runs, else torch)
  quant        none (float32) | int8 (q8_0) | int4 (q4_1; lm_head q8_0) quantized at load | gguf (the
               file's own blocks, values unchanged: Q4_0/Q4_1/Q5_0/Q8_0, Q4_K/Q5_K/Q6_K, F16/F32) |
               auto (gguf on native when the kernels run every linear of the GGUF as stored, int8 when
               they do not, none for float weights or the torch backend)
  activations  float32 | int8 (blocks of 32, per row) | auto (int8 for quantized weights on native)
  kv_cache     float32 (the model's dtype) | int8 (one scale per token and head): the key/value cache's
               format (`leapdecode.cache`), which every cache the runner makes has
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leapdecode.cache import check_kv_dtype
from leapdecode.errors import LeapError
from leapdecode.kernels.native import kernel_args, run_linear
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
        first = next(iter(self.parts[0].tensors().values()))
        return first.data_ptr()

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
QUANT_FORMAT = {"none": "f32", "int8": "q8_0", "int4": "q4_1"}


def _native_problem(dtype: torch.dtype | None, device: torch.device | str | None) -> str | None:
    from leapdecode.kernels.build import compiler, cpu_problem

    if dtype is not None and (dtype != torch.float32 or torch.device(device or "cpu").type != "cpu"):
        return f"it runs float32 models on the CPU (this model is {dtype} on {device})"
    problem = cpu_problem()
    if problem:
        return problem
    return None if compiler() else "no C++ compiler found (g++ or clang++, or set CXX)"


# backend -> why it cannot run a model of this dtype on this device (None: it can; None, None: any model)
PROBLEMS: dict[str, Callable[[torch.dtype | None, torch.device | str | None], str | None]] = {
    "torch": lambda dtype, device: None,
    "native": _native_problem,
}


def available_backends(
    dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> list[str]:
    """Backends that can run here (and run a model of `dtype` on `device`, when given)."""
    return [name for name, problem in PROBLEMS.items() if problem(dtype, device) is None]


@dataclass(frozen=True)
class LinearSpec:
    """The kernels and weight format of a runner's linear layers (see the module docstring)."""

    backend: str = "auto"
    quant: str = "auto"
    activations: str = "auto"
    kv_cache: str = "float32"

    def __post_init__(self):
        check_kv_dtype(self.kv_cache)
        if self.backend not in ("auto", *PROBLEMS):
            raise LeapError(f"unknown backend {self.backend!r}; expected one of: auto, {', '.join(PROBLEMS)}")
        if self.quant not in QUANTS:
            raise LeapError(f"unknown quant {self.quant!r}; expected one of: {', '.join(QUANTS)}")
        if self.activations not in ACTIVATIONS:
            raise LeapError(
                f"unknown activations {self.activations!r}; expected one of: {', '.join(ACTIVATIONS)}"
            )

    def resolve(self, dtype: torch.dtype, device, runs_stored: bool | None) -> LinearSpec:
        """The concrete spec for a model of `dtype` on `device`: no 'auto' left, everything checked.
        `runs_stored`: whether the kernels run every linear weight of the model's file as stored (None:
        the model has no file of quantized blocks)."""
        backend = self.backend
        if backend == "auto":
            backend = "native" if PROBLEMS["native"](dtype, device) is None else "torch"
        problem = PROBLEMS[backend](dtype, device)
        if problem:
            raise LeapError(f"backend {backend!r} cannot run here: {problem}")
        quant = self.quant
        if quant == "auto":
            quant = _auto_quant(backend, runs_stored)
        if quant == "gguf" and runs_stored is None:
            raise LeapError("--quant gguf needs a GGUF model file")
        activations = self.activations
        if activations == "auto":
            activations = "int8" if backend == "native" and quant != "none" else "float32"
        if backend == "torch" and activations == "int8":
            raise LeapError("backend 'torch' runs float activations only; use --activations float32")
        if backend == "native" and activations == "int8" and quant == "none":
            raise LeapError("int8 activations need quantized weights (--quant int8, int4 or gguf)")
        return LinearSpec(backend, quant, activations, self.kv_cache)

    def describe(self) -> str:
        kv = "" if self.kv_cache == "float32" else f"/kv-{self.kv_cache}"
        return f"{self.backend}/{self.quant}/{self.activations}{kv}"

    def weight_format(self, head: bool) -> str:
        """The format float weights are quantized to (quant none, int8, int4)."""
        fmt = QUANT_FORMAT[self.quant]
        # 4-bit output layers cost the most quality (see `leap eval`); GGUF recipes keep them at 8 bits too.
        return "q8_0" if head and fmt == "q4_1" else fmt


def _auto_quant(backend: str, runs_stored: bool | None) -> str:
    """The file's own blocks where the native kernels run them all; a quantized file whose blocks they
    cannot all run is requantized to 8 bits, never expanded to float32 (several times the bytes per
    step); float weights (no blocks file, or the torch backend) stay float."""
    if backend != "native" or runs_stored is None:
        return "none"
    return "gguf" if runs_stored else "int8"
