"""All transformer blocks in one native call (see kernels/stack.h), for models on the native backend.

`convert_linears` attaches a `NativeStack` to a model whose linear layers it made native. The model's
forward hands it token ids and rope positions; it looks up their embeddings and rope rows, runs every
block (with the skip plan of self-drafting, when one is given) and, when the output layer is native too,
the final norm and that layer, returning logits (else the residual stream). It declines (and the model's
per-block path runs) for batches of more than one sequence, and after any block's modules were replaced
since it was built.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import weakref

import torch

from leapdecode.errors import LeapError
from leapdecode.kernels.native import ACT_CODES, FORMAT_CODES, kernel_threads, lib
from leapdecode.kernels.native import ERRORS as KERNEL_ERRORS

MAX_PARTS = 4
_I32, _I64, _P = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p


class _Part(ctypes.Structure):
    _fields_ = [
        ("fmt", _I32),
        ("act", _I32),
        ("N", _I64),
        ("K", _I64),
        ("col", _I64),
        ("qs", _P),
        ("d", _P),
        ("m", _P),
        ("f", _P),
    ]


class _Linear(ctypes.Structure):
    _fields_ = [("nparts", _I64), ("N", _I64), ("K", _I64), ("parts", _Part * MAX_PARTS), ("bias", _P)]


class _Block(ctypes.Structure):
    _fields_ = [
        ("qkv", _Linear),
        ("o", _Linear),
        ("w13", _Linear),
        ("w2", _Linear),
        ("attn_norm", _P),
        ("mlp_norm", _P),
    ]


class _Inputs(ctypes.Structure):
    _fields_ = [
        ("tokens", _P),
        ("embed", _P),
        ("vocab", _I64),
        ("positions", _P),
        ("cos_table", _P),
        ("sin_table", _P),
        ("max_pos", _I64),
    ]


class _Stack(ctypes.Structure):
    _fields_ = [
        ("L", _I64),
        ("D", _I64),
        ("H", _I64),
        ("Hkv", _I64),
        ("hd", _I64),
        ("I", _I64),
        ("eps", ctypes.c_float),
        ("blocks", ctypes.POINTER(_Block)),
    ]


# the kernels' codes, plus the stack's own
_ERRORS = {
    **KERNEL_ERRORS,
    -1: "empty model",
    -8: "a fused linear layer has too many parts",
    -9: "a linear layer's shape does not fit the model",
    -10: "the new rows do not fit in the cache",
    -11: "the output layer's first row is out of range",
    -12: "a token id is outside the vocabulary",
    -13: "a position is beyond the rope tables (the model's context)",
}


_ASSIGNMENTS = [0]  # module assignments anywhere in the process, counted by torch's registration hook


@functools.cache
def _count_assignments() -> None:
    """Installs the counting hook (once): a stack whose last check saw the same count knows that no
    module was assigned since, without touching the ~300 dictionaries a full check reads (which, cold in
    cache after a step has streamed every weight, cost ~60 us a step)."""

    def hook(owner, name, module):
        _ASSIGNMENTS[0] += 1

    torch.nn.modules.module.register_module_module_registration_hook(hook)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(layer) -> _Linear:
    if getattr(layer, "backend", None) != "native" or len(layer.parts) > MAX_PARTS:
        raise LeapError("the native block stack needs native linear layers of at most 4 parts")
    lin = _Linear(nparts=len(layer.parts), N=layer.out_features, K=layer.in_features, bias=_ptr(layer.bias))
    for i, (p, col) in enumerate(zip(layer.parts, layer.offsets)):
        act = "float32" if p.fmt == "f32" else layer.activations
        lin.parts[i] = _Part(
            FORMAT_CODES[p.fmt],
            ACT_CODES[act],
            p.out_features,
            p.in_features,
            col,
            _ptr(p.qs),
            _ptr(p.d),
            _ptr(p.m),
            _ptr(p.f),
        )
    return lin


class NativeStack:
    """The blocks of `model` as one kernel call; holds the modules it points into."""

    def __init__(self, model):
        cfg = model.cfg
        self._owner = weakref.ref(model)
        # (the dict of submodules, name, module) of everything this stack points into: checking these is
        # cheap, where attribute access on modules is not.
        slots = [
            (owner._modules, name, owner._modules[name])
            for b in model.blocks
            for owner, names in (
                (b, ("attn", "mlp", "attn_norm", "mlp_norm")),
                (b.attn, ("wqkv", "wo")),
                (b.mlp, ("w13", "w2")),
            )
            for name in names
        ]
        slots += [(model.blocks._modules, name, b) for name, b in model.blocks._modules.items()]
        slots.append((model._modules, "blocks", model.blocks))
        # the same, column-wise, for a check that loops in C (it runs on every forward)
        self._dicts, self._names, self._modules = (list(c) for c in zip(*slots))
        _count_assignments()
        self._blocks, self._block_list = model.blocks._modules, list(model.blocks)
        self._checked_at = -1  # the assignment count of the last full check that passed
        norms = [(b.attn_norm.weight, b.mlp_norm.weight) for b in model.blocks]
        if any(w.dtype != torch.float32 or not w.is_contiguous() for pair in norms for w in pair):
            raise LeapError("the native block stack needs contiguous float32 norm weights")
        eps = {b.attn_norm.eps for b in model.blocks} | {b.mlp_norm.eps for b in model.blocks}
        if len(eps) != 1:
            raise LeapError("the native block stack needs one RMSNorm epsilon for every block")
        if len(model.blocks) > cfg.n_layers:  # the cache holds cfg.n_layers layers
            raise LeapError(f"the model has {len(model.blocks)} blocks, its config {cfg.n_layers}")
        arr = (_Block * len(model.blocks))(
            *[
                _Block(
                    _linear(b.attn.wqkv),
                    _linear(b.attn.wo),
                    _linear(b.mlp.w13),
                    _linear(b.mlp.w2),
                    b.attn_norm.weight.data_ptr(),
                    b.mlp_norm.weight.data_ptr(),
                )
                for b in model.blocks
            ]
        )
        self._arr = arr
        self._stack = _Stack(
            len(model.blocks),
            cfg.dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            eps.pop(),
            arr,
        )
        self._fn = lib().ld_stack_forward
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [
            ctypes.POINTER(_Stack),
            ctypes.POINTER(_Inputs),
            _P,
            _I64,
            _I64,
            _P,
            _P,
            _I64,
            _P,
            _I64,
            _P,
            _P,
            ctypes.c_float,
            ctypes.POINTER(_Linear),
            _I64,
            _P,
            ctypes.c_int,
        ]
        self._head_key, self._head = None, None  # the output layer last run, as the kernel takes it

    def __deepcopy__(self, memo):  # a copied model rebuilds its own stack on its first forward
        return self

    def for_model(self, model) -> NativeStack | None:
        """This stack if `model` still holds the modules it was built from, else one built anew (None when
        the model no longer runs natively)."""
        if self._owner() is model and self.current():
            return self
        try:
            return NativeStack(model)
        except LeapError:
            return None

    def current(self) -> bool:
        """Whether the model still holds the modules this stack was built from. Assignments go through the
        counting hook; removing or inserting a block (which bypass it) changes the list of blocks."""
        blocks = self._blocks
        if (
            self._checked_at == _ASSIGNMENTS[0]
            and len(blocks) == len(self._block_list)
            and all(map(operator.is_, blocks.values(), self._block_list))
        ):
            return True
        if not all(map(operator.is_, map(dict.get, self._dicts, self._names), self._modules)):
            return False
        self._checked_at = _ASSIGNMENTS[0]
        return True

    def runs_head(self, norm, head) -> bool:
        """Whether the final norm and this output layer can run inside the call (native, float32 norm)."""
        return (
            getattr(head, "backend", None) == "native"
            and len(head.parts) <= MAX_PARTS
            and head.in_features == self._stack.D
            and norm.weight.dtype == torch.float32
        )

    def _head_struct(self, head) -> _Linear:
        """The kernel's description of `head`, rebuilt when the layer or its weights changed."""
        if (
            self._head_key is None
            or self._head_key[0]() is not head
            or self._head_key[1] != head.weights_at()
        ):
            self._head, self._head_key = _linear(head), (weakref.ref(head), head.weights_at())
        return self._head

    def accepts(self, tokens: torch.Tensor, embed: torch.Tensor, cache) -> bool:
        return (
            tokens.shape[0] == 1
            and cache.k.shape[1] == 1
            and embed.dtype == torch.float32
            and embed.is_contiguous()
            and cache.k.is_contiguous()
        )

    @staticmethod
    def _inputs(tokens, positions, embed, rope) -> tuple[_Inputs, tuple]:
        """The kernel's view of the new rows, and the tensors it points into (kept alive for the call)."""
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()  # [S]
        positions = positions.to(torch.int64).contiguous()  # [S]
        keep = (tokens, positions, embed, rope.cos, rope.sin)
        return _Inputs(
            tokens.data_ptr(),
            embed.data_ptr(),
            embed.shape[0],
            positions.data_ptr(),
            rope.cos.data_ptr(),
            rope.sin.data_ptr(),
            rope.cos.shape[0],
        ), keep

    def __call__(
        self, tokens, positions, embed, rope, cache, mask, layers=None, head=None, last_only=False
    ) -> torch.Tensor:
        """tokens [1, S], positions [S] (rope positions; looked up with `embed` [V, D] and the `rope`
        module's float32 tables inside the call), mask bool [S, n + S] or None (causal), layers:
        (skip_attn, skip_mlp) per block or None. Returns the residual stream [1, S, D]; with head = (final
        norm, output layer) (see `runs_head`), that layer's logits [1, S, V] instead (of the last row:
        [1, 1, V] with last_only)."""
        s, n = tokens.shape[1], cache.length
        if n + s > cache.max_len:
            raise LeapError(f"context full: {n + s} tokens exceed the cache size {cache.max_len}")
        if positions.shape != (s,):
            raise LeapError(f"positions must have shape [{s}], got {tuple(positions.shape)}")
        inputs, _alive = self._inputs(tokens, positions, embed, rope)  # the tensors stay alive for the call
        x = torch.empty(1, s, self._stack.D)  # [1, S, D]
        mask_ptr, mask_stride = None, 0
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != (s, n + s):
                raise LeapError(
                    f"attention mask must be bool [{s}, {n + s}], got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask if mask.stride(-1) == 1 else mask.contiguous()
            mask_ptr, mask_stride = mask.data_ptr(), mask.stride(0)
        skip = None if layers is None else torch.tensor(layers, dtype=torch.uint8).contiguous()
        norm_w, eps, head_arg, first, out = None, 0.0, None, 0, None
        if head is not None:
            norm, layer = head
            first = s - 1 if last_only else 0
            out = torch.empty(1, s - first, layer.out_features)  # [1, S or 1, V]
            norm_w, eps, head_arg = norm.weight.data_ptr(), norm.eps, ctypes.byref(self._head_struct(layer))
        rc = self._fn(
            ctypes.byref(self._stack),
            ctypes.byref(inputs),
            x.data_ptr(),
            s,
            n,
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            cache.max_len,
            mask_ptr,
            mask_stride,
            _ptr(skip),
            norm_w,
            eps,
            head_arg,
            first,
            _ptr(out),
            kernel_threads(),
        )
        if rc:
            raise LeapError(f"native block stack: {_ERRORS.get(rc, rc)}")
        return x if out is None else out
