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
from leapdecode.kernels.abi import MAX_PARTS, LdBlock, LdForwardArgs, LdInputs, LdLinear, LdPart, LdStack
from leapdecode.kernels.native import ACT_CODES, FORMAT_CODES, kernel_threads, lib, status_message

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


def _linear(layer) -> LdLinear:
    if getattr(layer, "backend", None) != "native" or len(layer.parts) > MAX_PARTS:
        raise LeapError("the native block stack needs native linear layers of at most 4 parts")
    lin = LdLinear(nparts=len(layer.parts), N=layer.out_features, K=layer.in_features, bias=_ptr(layer.bias))
    for i, (p, col) in enumerate(zip(layer.parts, layer.offsets)):
        act = "float32" if p.fmt == "f32" else layer.activations
        lin.parts[i] = LdPart(
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
        arr = (LdBlock * len(model.blocks))(
            *[
                LdBlock(
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
        self._stack = LdStack(
            len(model.blocks),
            cfg.dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            eps.pop(),
            arr,
        )
        self._fn = lib().ld_stack_forward  # its signature is declared when the library loads
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

    def _head_struct(self, head) -> LdLinear:
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
    def _inputs(tokens, positions, embed, rope) -> tuple[LdInputs, tuple]:
        """The kernel's view of the new rows, and the tensors it points into (kept alive for the call)."""
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()  # [S]
        positions = positions.to(torch.int64).contiguous()  # [S]
        keep = (tokens, positions, embed, rope.cos, rope.sin)
        return LdInputs(
            tokens.data_ptr(),
            embed.data_ptr(),
            embed.shape[0],
            positions.data_ptr(),
            rope.cos.data_ptr(),
            rope.sin.data_ptr(),
            rope.cos.shape[0],
        ), keep

    def _features(self, features: tuple[int, ...], s: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block indices and the [F, S, D] output of the residual stream after those blocks."""
        if not features:
            return None
        blocks = self._stack.L
        bad = [f for f in features if not 0 <= f < blocks]
        if bad:
            raise LeapError(f"features: block {bad[0]} is outside the model's {blocks} blocks")
        return torch.tensor(features, dtype=torch.int64), torch.empty(len(features), s, self._stack.D)

    def __call__(
        self,
        tokens,
        positions,
        embed,
        rope,
        cache,
        mask,
        layers=None,
        head=None,
        last_only=False,
        features: tuple[int, ...] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [1, S], positions [S] (rope positions; looked up with `embed` [V, D] and the `rope`
        module's float32 tables inside the call), mask bool [S, n + S] or None (causal), layers:
        (skip_attn, skip_mlp) per block or None. Returns the residual stream [1, S, D]; with head = (final
        norm, output layer) (see `runs_head`), that layer's logits [1, S, V] instead (of the last row:
        [1, 1, V] with last_only). With `features` (block indices), returns (that, feats [F, S, D]):
        feats[j] is the residual stream after block features[j]."""
        s, n = tokens.shape[1], cache.length
        if n + s > cache.max_len:
            raise LeapError(f"context full: {n + s} tokens exceed the cache size {cache.max_len}")
        if positions.shape != (s,):
            raise LeapError(f"positions must have shape [{s}], got {tuple(positions.shape)}")
        feats = self._features(tuple(features), s)
        inputs, _alive = self._inputs(tokens, positions, embed, rope)  # the tensors stay alive for the call
        x = torch.empty(1, s, self._stack.D)  # [1, S, D]
        args = LdForwardArgs(x=x.data_ptr(), S=s, n=n, Tmax=cache.max_len, threads=kernel_threads())
        args.kc, args.vc = cache.k.data_ptr(), cache.v.data_ptr()
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != (s, n + s):
                raise LeapError(
                    f"attention mask must be bool [{s}, {n + s}], got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask if mask.stride(-1) == 1 else mask.contiguous()
            args.mask, args.mask_stride = mask.data_ptr(), mask.stride(0)
        skip = None if layers is None else torch.tensor(layers, dtype=torch.uint8).contiguous()
        args.skip = _ptr(skip)
        out = None
        if head is not None:
            norm, layer = head
            args.head_from = s - 1 if last_only else 0
            out = torch.empty(1, s - args.head_from, layer.out_features)  # [1, S or 1, V]
            args.norm_w, args.norm_eps, args.logits = norm.weight.data_ptr(), norm.eps, out.data_ptr()
            args.head = ctypes.pointer(self._head_struct(layer))
        if feats is not None:
            args.nfeat, args.feat_layers, args.feats = len(features), feats[0].data_ptr(), feats[1].data_ptr()
        rc = self._fn(ctypes.byref(self._stack), ctypes.byref(inputs), ctypes.byref(args))
        if rc:
            raise LeapError(f"native block stack: {status_message(rc)}")
        result = x if out is None else out
        return result if feats is None else (result, feats[1])
