"""ctypes binding of the compiled kernels: torch tensors in, torch tensors out, never a copy.

Pointers go straight from `Tensor.data_ptr()` to the kernels. The kernels run on a thread pool of their
own (see pool.h for why not OpenMP), with torch's thread count unless `kernel_scope` says otherwise.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from leapdecode.errors import LeapError
from leapdecode.kernels import abi
from leapdecode.kernels.build import best_isa, build

FORMAT_CODES, ACT_CODES = abi.FORMAT_CODES, abi.ACT_CODES  # checked against the library when it loads

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_KERNEL_THREADS: ContextVar[int | None] = ContextVar("leapdecode_kernel_threads", default=None)


def kernel_threads() -> int:
    """Threads the kernels use now: the count of the enclosing `kernel_scope`, else torch's."""
    return _KERNEL_THREADS.get() or torch.get_num_threads()


@contextmanager
def kernel_scope(threads: int | None = None) -> Iterator[None]:
    """Kernels on `threads` (default: torch's count) while torch itself runs on one thread.

    Why: after a parallel op torch's OpenMP threads spin for a while; with as many threads as cores they
    then take cores from the kernels' pool. Measured on 2 cores: a verification step 50% slower right
    after torch's two-threaded argmax over the logits. Torch's count is restored on exit.
    """
    before = torch.get_num_threads()
    token = _KERNEL_THREADS.set(threads or kernel_threads())
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _KERNEL_THREADS.reset(token)


@functools.cache
def lib(isa: str | None = None) -> ctypes.CDLL:
    """The loaded library for `isa` (default: the best this CPU runs), built on first use; its ABI is
    checked against this package's (abi.py) before anything calls it."""
    if isa is None:
        return lib(best_isa())
    dll = ctypes.CDLL(str(build(isa)))
    abi.check(dll)
    dll.ld_linear.argtypes = [_INT, _INT, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _I64, _INT]
    dll.ld_linear.restype = _INT
    dll.ld_quantize_act.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT]
    dll.ld_quantize_act.restype = None
    dll.ld_attention.argtypes = [
        _P,
        _P,
        _P,
        _P,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,
        _P,
        _P,
        _P,
        _P,
        _P,
        _I64,
        ctypes.c_float,
        _INT,
    ]
    dll.ld_attention.restype = _INT
    dll.ld_isa.restype = _INT
    dll.ld_stack_forward.argtypes = [
        ctypes.POINTER(abi.LdStack),
        ctypes.POINTER(abi.LdInputs),
        ctypes.POINTER(abi.LdForwardArgs),
    ]
    dll.ld_stack_forward.restype = _INT
    return dll


def status_message(code: int, isa: str | None = None) -> str:
    """What a kernel's status code means (the library's own message, see abi.h)."""
    return abi.status_message(lib(isa), code)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear_into(
    y: torch.Tensor,
    x: torch.Tensor,
    fmt: str,
    act: str,
    n: int,
    k: int,
    qs=None,
    d=None,
    m=None,
    f=None,
    threads: int | None = None,
    isa: str | None = None,
) -> None:
    """y[:, :n] = x @ W^T for a weight in `fmt` (see leapdecode.model.quant). x [M, k] float32 with unit
    column stride; y [M, >= n] float32 with unit column stride (a column slice of a wider output is fine)."""
    rc = lib(isa).ld_linear(
        FORMAT_CODES[fmt],
        ACT_CODES[act],
        x.shape[0],
        n,
        k,
        x.data_ptr(),
        x.stride(0),
        _ptr(qs),
        _ptr(d),
        _ptr(m),
        _ptr(f),
        y.data_ptr(),
        y.stride(0),
        threads or kernel_threads(),
    )
    if rc:
        raise LeapError(
            f"native linear ({fmt}, {act} activations, [{x.shape[0]}, {k}] x [{n}, {k}]^T): "
            f"{status_message(rc, isa)}"
        )


def kernel_args(qw, act: str, col: int = 0) -> tuple:
    """The constant part of a kernel call for weight `qw` writing output columns [col, col + N)."""
    return (
        FORMAT_CODES[qw.fmt],
        ACT_CODES[act],
        qw.out_features,
        qw.in_features,
        _ptr(qw.qs),
        _ptr(qw.d),
        _ptr(qw.m),
        _ptr(qw.f),
        col * 4,
    )


def run_linear(calls: list[tuple], x: torch.Tensor, y: torch.Tensor) -> None:
    """y = x @ W^T for the parts described by `calls` (from kernel_args): x [M, K], y [M, N_total] float32,
    rows contiguous. The hot path of every native linear layer: a few microseconds of Python."""
    fn, m, xp, ldx, yp, ldy = (
        lib().ld_linear,
        x.shape[0],
        x.data_ptr(),
        x.stride(0),
        y.data_ptr(),
        y.stride(0),
    )
    threads = kernel_threads()
    for fmt, act, n, k, qs, d, mn, f, col_bytes in calls:
        rc = fn(fmt, act, m, n, k, xp, ldx, qs, d, mn, f, yp + col_bytes, ldy, threads)
        if rc:
            names = {v: n for n, v in FORMAT_CODES.items()}, {v: n for n, v in ACT_CODES.items()}
            raise LeapError(
                f"native linear ({names[0].get(fmt)}, {names[1].get(act)} activations, "
                f"[{m}, {k}] x [{n}, {k}]^T): {status_message(rc)}"
            )


def quantize_activations(
    x: torch.Tensor, isa: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 blocks the kernels use for x [M, K]: (q int8 [M, K], d [M, nbp], s [M, nbp]); for tests."""
    m, k = x.shape
    nbp = (k // 32 + 7) // 8 * 8
    q = torch.empty(m, k, dtype=torch.int8)
    d, s = torch.empty(m, nbp), torch.empty(m, nbp)
    lib(isa).ld_quantize_act(
        x.data_ptr(), x.stride(0), m, k, nbp, q.data_ptr(), d.data_ptr(), s.data_ptr(), 1
    )
    return q, d, s


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    enable_gqa: bool = False,
    scale: float | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """Row-invariant replacement for `F.scaled_dot_product_attention` on the model's shapes:
    q [B, H, S, D], k/v [B, Hkv, T, D], attn_mask bool [S, T] (True = attend) or None (causal, the last S
    of T keys being the new rows). Returns [B, H, S, D] (a view of a [B, S, H, D] buffer, so the usual
    transpose back to [B, S, H * D] is free)."""
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    if q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32:
        raise LeapError("native attention needs float32 tensors")
    if hkv != h and not enable_gqa:
        raise LeapError(f"native attention: {h} query heads and {hkv} key/value heads need enable_gqa")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    mask_ptr, mask_stride = None, 0
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or attn_mask.shape != (s, t):
            raise LeapError(
                f"native attention: the mask must be bool [{s}, {t}], got {attn_mask.dtype} "
                f"{tuple(attn_mask.shape)}"
            )
        attn_mask = attn_mask if attn_mask.stride(-1) == 1 else attn_mask.contiguous()
        mask_ptr, mask_stride = attn_mask.data_ptr(), attn_mask.stride(0)
    out = torch.empty(b, s, h, d).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    rc = lib(isa).ld_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        b,
        h,
        hkv,
        s,
        t,
        d,
        _strides(q),
        _strides(k),
        _strides(v),
        _strides(out),
        mask_ptr,
        mask_stride,
        d**-0.5 if scale is None else scale,
        kernel_threads(),
    )
    if rc:
        raise LeapError(f"native attention: {status_message(rc, isa)}")
    return out
