"""All transformer blocks in one native call (see kernels/stack.h): the native runner's forward.

`NativeStack` is built once from the packed weights (`NativeBlock` per block, the embeddings and the
rope tables) and never changes. A call hands it token ids and rope positions; it looks up their
embeddings and rope rows, runs every block (with the skip plan of self-drafting, when one is given) and,
when given an output layer, the final norm and that layer. The kernel's structs are declared once in
`leapdecode.kernels.abi`, checked against the library when it loads.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leapdecode.cache import KVCache
from leapdecode.errors import LeapError
from leapdecode.kernels.abi import (
    KV_CODES,
    MAX_PARTS,
    LdBlock,
    LdForwardArgs,
    LdInputs,
    LdLinear,
    LdPart,
    LdSeq,
    LdStack,
)
from leapdecode.kernels.native import ACT_CODES, FORMAT_CODES, kernel_threads, lib, status_message
from leapdecode.model.config import ModelConfig
from leapdecode.model.linear import NativeLinear
from leapdecode.model.runner import check_features, check_layers


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(layer: NativeLinear) -> LdLinear:
    if not isinstance(layer, NativeLinear) or len(layer.parts) > MAX_PARTS:
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


@dataclass(frozen=True)
class NativeBlock:
    """One block's packed weights: fused q/k/v, output, fused gate/up and down layers, and its two
    RMSNorm weights (float32 [D])."""

    qkv: NativeLinear
    o: NativeLinear
    w13: NativeLinear
    w2: NativeLinear
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor

    def linears(self) -> tuple[NativeLinear, ...]:
        return self.qkv, self.o, self.w13, self.w2


class NativeStack:
    """The blocks of a model as one kernel call; holds every tensor it points into."""

    def __init__(
        self,
        cfg: ModelConfig,
        blocks: list[NativeBlock],
        embed: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ):
        """`embed`: the float32 embedding table [V, D], or None when every call brings its rows' embeddings
        (`embed_rows`)."""
        norms = [w for b in blocks for w in (b.attn_norm, b.mlp_norm)] + [cos, sin]
        norms += [] if embed is None else [embed]
        if any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
            raise LeapError(
                "the native block stack needs contiguous float32 norms, embeddings and rope tables"
            )
        if len(blocks) > cfg.n_layers:  # the cache holds cfg.n_layers layers
            raise LeapError(f"the model has {len(blocks)} blocks, its config {cfg.n_layers}")
        self.cfg, self.blocks, self.embed, self.cos, self.sin = cfg, list(blocks), embed, cos, sin
        self._arr = (LdBlock * len(blocks))(
            *[
                LdBlock(*(_linear(lin) for lin in b.linears()), b.attn_norm.data_ptr(), b.mlp_norm.data_ptr())
                for b in blocks
            ]
        )
        d = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size)
        self._stack = LdStack(len(blocks), *d, cfg.norm_eps, self._arr)
        self._fn = lib().ld_stack_forward  # its signature is declared when the library loads
        self._head_key: tuple | None = None  # the output layer last run, as the kernel takes it
        self._head: LdLinear | None = None

    @property
    def nbytes(self) -> int:
        return sum(lin.nbytes for b in self.blocks for lin in b.linears())

    def _head_struct(self, head: NativeLinear) -> LdLinear:
        """The kernel's description of `head`, rebuilt when the layer or its weights changed."""
        key = self._head_key
        if key is None or key[0]() is not head or key[1] != head.weights_at():
            self._head, self._head_key = _linear(head), (weakref.ref(head), head.weights_at())
        assert self._head is not None
        return self._head

    def _inputs(
        self, tokens: torch.Tensor, positions: torch.Tensor, embed_rows: torch.Tensor | None
    ) -> tuple[LdInputs, tuple]:
        """The kernel's view of the new rows, and the tensors it points into (kept alive for the call).
        With `embed_rows` [S, D], row i's embedding is embed_rows[i] (the kernel looks up 0..S-1)."""
        if embed_rows is not None:
            tokens, e = torch.arange(len(tokens)), embed_rows.contiguous()
        elif self.embed is None:
            raise LeapError("this stack has no embedding table: a call must bring its rows' embeddings")
        else:
            e = self.embed
        tokens = tokens.to(torch.int64).contiguous()  # [S]
        positions = positions.to(torch.int64).contiguous()  # [S]
        cos, sin = self.cos, self.sin
        inputs = LdInputs(
            tokens.data_ptr(),
            e.data_ptr(),
            e.shape[0],
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            cos.shape[0],
        )
        return inputs, (tokens, positions, e)

    def _features(self, features: tuple[int, ...], s: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block indices and the [F, S, D] output of the residual stream after those blocks."""
        if not features:
            return None
        check_features(features, self._stack.L)
        return torch.tensor(features, dtype=torch.int64), torch.empty(len(features), s, self._stack.D)

    def __call__(
        self,
        seqs: Sequence[SeqRows],
        layers=None,
        head: tuple | None = None,
        features: tuple[int, ...] = (),
        embed_rows: torch.Tensor | None = None,
    ) -> tuple:
        """The rows of `seqs`, one sequence after another, in one call (one pass over the weights; each row
        attends to its own sequence only). layers: (skip_attn, skip_mlp) per block or None; head: (final
        RMSNorm, native output layer) or None. Returns (x [S, D], logits [R, V] or None, feats [F, S, D] or
        None): S every sequence's rows, R the rows whose logits the sequences ask for, in order; feats[j] is
        the residual stream after block features[j]. `embed_rows` [S, D]: the rows' embeddings, looked up by
        the caller (a stack without a table needs them). The caller checked each sequence's shapes
        (`runner.check_inputs`); each cache must be a distinct contiguous one of one sequence (float32,
        or int8 with float32 scales)."""
        _check_caches(seqs)
        check_layers(layers, self._stack.L)
        s = sum(len(q.tokens) for q in seqs)
        tokens, positions = torch.cat([q.tokens for q in seqs]), torch.cat([q.positions for q in seqs])
        feats = self._features(tuple(features), s)
        inputs, _alive = self._inputs(tokens, positions, embed_rows)  # the tensors stay alive for the call
        x = torch.empty(s, self._stack.D)  # [S, D]
        with_head = head is not None and any(q.logits != "none" for q in seqs)
        arr, _masks = _seq_array(seqs, with_head)  # the masks stay alive for the call
        seq_ptr = ctypes.cast(arr, ctypes.POINTER(LdSeq))
        args = LdForwardArgs(x=x.data_ptr(), S=s, seqs=seq_ptr, nseq=len(seqs), threads=kernel_threads())
        skip = None if layers is None else torch.tensor(layers, dtype=torch.uint8).contiguous()
        args.skip = _ptr(skip)
        out = None
        if head is not None and with_head:
            norm, layer = head
            out = torch.empty(sum(q.head_rows for q in seqs), layer.out_features)  # [R, V]
            args.norm_w, args.norm_eps, args.logits = norm.weight.data_ptr(), norm.eps, out.data_ptr()
            args.head = ctypes.pointer(self._head_struct(layer))
        if feats is not None:
            args.nfeat, args.feat_layers, args.feats = len(features), feats[0].data_ptr(), feats[1].data_ptr()
        rc = self._fn(ctypes.byref(self._stack), ctypes.byref(inputs), ctypes.byref(args))
        if rc:
            raise LeapError(f"native block stack: {status_message(rc)}")
        return x, out, None if feats is None else feats[1]


@dataclass(frozen=True)
class SeqRows:
    """One sequence's part of a stack call: its new rows after its cache's committed ones."""

    tokens: torch.Tensor  # [S]
    positions: torch.Tensor  # [S] rope positions
    cache: KVCache
    mask: torch.Tensor | None = None  # bool [S, n + S]; None: causal
    logits: str = "all"  # whose logits come back: "all" rows, the "last", or "none"

    @property
    def head_rows(self) -> int:
        return {"all": len(self.tokens), "last": min(1, len(self.tokens)), "none": 0}[self.logits]


def _check_caches(seqs: Sequence[SeqRows]) -> None:
    for q in seqs:
        c = q.cache
        stored = torch.int8 if c.kv_dtype == "int8" else torch.float32
        ok = c.k.shape[1] == 1 and all(t.is_contiguous() for t in c.tensors())
        ok = ok and c.k.dtype == c.v.dtype == stored and c.dtype == torch.float32
        if not ok:
            raise LeapError(
                "the native block stack needs a contiguous cache of one sequence, float32 or int8 (with "
                "float32 scales)"
            )
    if len({id(q.cache) for q in seqs}) != len(seqs):
        raise LeapError("the sequences of one native call need distinct caches")


def _seq_array(seqs: Sequence[SeqRows], with_head: bool) -> tuple[ctypes.Array, list]:
    """The kernel's LdSeq records of `seqs`, and the mask tensors they point into (kept alive)."""
    arr, alive = (LdSeq * max(1, len(seqs)))(), []
    for j, q in enumerate(seqs):
        s, c = len(q.tokens), q.cache
        rec = LdSeq(S=s, n=c.length, kc=c.k.data_ptr(), vc=c.v.data_ptr(), Tmax=c.max_len)
        rec.kv_fmt = KV_CODES[c.kv_dtype]
        if c.ks is not None and c.vs is not None:
            rec.ks, rec.vs = c.ks.data_ptr(), c.vs.data_ptr()
        rec.head_from = s - q.head_rows if with_head else s
        if q.mask is not None:
            mask = q.mask if q.mask.stride(-1) == 1 else q.mask.contiguous()
            rec.mask, rec.mask_stride = mask.data_ptr(), mask.stride(0)
            alive.append(mask)
        arr[j] = rec
    return arr, alive
