"""The native backend: the compiled CPU kernels behind the runner's one forward.

A forward is one kernel call from token ids to logits (`stack.NativeStack`): embeddings, every block,
the final norm and the output layer. Every row is computed with the same arithmetic whatever the number
of rows, so verifying a draft gives bit for bit the logits of one-token steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leapdecode.cache import KVCache
from leapdecode.errors import LeapError
from leapdecode.kernels.pages import move_to_huge_pages
from leapdecode.model import quant as Q
from leapdecode.model.config import ModelConfig
from leapdecode.model.linear import LinearSpec, NativeLinear
from leapdecode.model.llama import RMSNorm, Rope
from leapdecode.model.runner import (
    FULL,
    NO_LOGITS,
    BatchItem,
    Head,
    Output,
    Plan,
    check_inputs,
    new_cache,
)
from leapdecode.model.stack import NativeBlock, NativeStack, SeqRows
from leapdecode.model.weights import EMBED, LAYER_NORMS, NORM, WeightSource, layer_prefix, linear_groups


class NativeRunner:
    """Float32 on the CPU; weights packed for the kernels (`spec` says which format)."""

    backend = "native"
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(
        self,
        cfg: ModelConfig,
        stack: NativeStack,
        norm: RMSNorm,
        lm_head: NativeLinear,
        spec,
        embed: Q.QuantWeight | None = None,
    ):
        """`embed`: the token embeddings as the file stores them, when the stack holds no float table:
        a forward dequantizes only its rows (exactly the values the float table would hold)."""
        self.cfg, self.stack, self.norm, self.lm_head, self.spec = cfg, stack, norm, lm_head, spec
        self.embed = embed

    @property
    def nbytes(self) -> int:
        return self.stack.nbytes + self.lm_head.nbytes

    def _embed_rows(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """[S, D] float32 embeddings of `tokens` from the stored blocks; None when the stack has a table."""
        if self.embed is None:
            return None
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise LeapError(f"a token id is outside the vocabulary [0, {self.cfg.vocab_size})")
        return Q.dequantize(Q.select_rows(self.embed, tokens))

    def new_cache(self, max_len: int) -> KVCache:
        return new_cache(self.cfg, max_len, self.dtype, self.device, self.spec)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask=None, plan: Plan = FULL
    ) -> Output:
        return self._run([BatchItem(tokens, positions, cache, mask, plan)], plan)[0]

    def forward_batch(self, items: Sequence[BatchItem]) -> list[Output]:
        """Several sequences in one kernel call (one pass over the weights; each row attends to its own
        sequence's cache, with the arithmetic of its own forward: bit for bit the same outputs). Items whose
        plan skips blocks, swaps the head or asks for features run alone."""
        shared = [i for i, item in enumerate(items) if _plain(item.plan)]
        outs: list[Output | None] = [None] * len(items)
        if shared:
            for i, out in zip(shared, self._run([items[i] for i in shared], FULL)):
                outs[i] = out
        for i, item in enumerate(items):
            if outs[i] is None:
                outs[i] = self.forward(item.tokens, item.positions, item.cache, item.mask, item.plan)
        return [o for o in outs if o is not None]

    def _run(self, items: Sequence[BatchItem], plan: Plan) -> list[Output]:
        """One kernel call over `items`, which share `plan`'s blocks, head and features (each item's own
        plan says its rows and whether its cache advances)."""
        sizes = [check_inputs(self.cfg, i.tokens, i.positions, i.cache, i.mask) for i in items]
        head = plan.head if plan.head is not None else self.lm_head
        inside = isinstance(head, NativeLinear)  # the kernel call runs the head
        seqs = [
            SeqRows(i.tokens, i.positions, i.cache, i.mask, i.plan.rows if inside else "none") for i in items
        ]
        rows = self._embed_rows(torch.cat([i.tokens for i in items]))
        x, logits, feats = self.stack(seqs, plan.layers, (self.norm, head), plan.features, rows)
        heads = logits.split([q.head_rows for q in seqs]) if logits is not None else [None] * len(items)
        xs, fs = x.split(sizes), (feats.split(sizes, dim=1) if feats is not None else [None] * len(items))
        outs = []
        for item, xi, li, fi in zip(items, xs, heads, fs):
            if item.plan.advance:
                item.cache.advance(len(item.tokens))
            outs.append(self._output(item.plan, head, xi, li, fi))
        return outs

    def _output(self, plan: Plan, head, x: torch.Tensor, logits, feats) -> Output:
        if plan.rows == "none":
            logits = NO_LOGITS
        elif logits is None:  # another output layer (a drafter's head): after the final norm here
            logits = head(self.norm(x[-1:] if plan.rows == "last" else x))  # [S or 1, V]
        return Output(logits, x if plan.hidden else None, feats)

    def output_rows(self, rows: torch.Tensor) -> Head:
        return self.lm_head.select_rows(rows)


# ---------------------------------------------------------------- building from weights


def weight_part(source: WeightSource, name: str, spec: LinearSpec, head: bool = False) -> Q.QuantWeight:
    """One weight as the kernels take it: the file's own blocks (quant gguf) or quantized at load."""
    if spec.quant != "gguf":
        return Q.quantize(source.float(name), spec.weight_format(head))
    stored = source.stored(name)
    if stored is None:
        raise LeapError(
            f"weight format 'gguf' runs {', '.join(Q.GGUF_TYPES)} tensors as stored; {name} is "
            f"{source.stored_type(name)} (use --quant int4 or int8 to requantize, or --quant none)"
        )
    return stored


def _linear(source: WeightSource, names: list[str], spec: LinearSpec, head: bool) -> NativeLinear:
    parts = [weight_part(source, n, spec, head) for n in names]
    bias = None
    if names[0].endswith("q_proj.weight") and source.cfg.qkv_bias:
        bias = torch.cat([source.float(n.removesuffix(".weight") + ".bias") for n in names])
    return NativeLinear(parts, bias, spec.activations)


def _norm(source: WeightSource, name: str) -> torch.Tensor:
    return source.float(name).to(torch.float32).contiguous()


def _stored_embeddings(source: WeightSource, head: NativeLinear) -> Q.QuantWeight | None:
    """The embeddings as the file stores them; tied to the output layer, that layer's own copy (a second
    one would add the largest tensor of a small model to its memory again)."""
    return head.parts[0] if source.cfg.tie_embeddings and len(head.parts) == 1 else source.stored(EMBED)


def build_native(source: WeightSource, spec: LinearSpec) -> NativeRunner:
    """The runner of `source` on the kernels; weights are read one tensor at a time and packed."""
    cfg, groups = source.cfg, linear_groups(source.cfg)
    linears = [_linear(source, names, spec, head=i == len(groups) - 1) for i, names in enumerate(groups)]
    move_to_huge_pages(linears)
    blocks = []
    for i in range(cfg.n_layers):
        qkv, o, w13, w2 = linears[4 * i : 4 * i + 4]
        p = layer_prefix(i)
        norms = [_norm(source, p + n) for n in LAYER_NORMS]
        blocks.append(NativeBlock(qkv, o, w13, w2, attn_norm=norms[0], mlp_norm=norms[1]))
    rope = Rope(cfg, torch.float32, "cpu", freq_factors=source.rope_factors)
    # the file's blocks are looked up row by row: a float32 table would be several times their bytes
    stored = _stored_embeddings(source, linears[-1]) if spec.quant == "gguf" else None
    stored = stored if stored is not None and stored.fmt != "f32" else None  # float files keep a table
    table = None if stored is not None else _norm(source, EMBED)  # [V, D]
    stack = NativeStack(cfg, blocks, table, rope.cos, rope.sin)
    norm = RMSNorm(_norm(source, NORM), cfg.norm_eps)
    return NativeRunner(cfg, stack, norm, linears[-1], spec, embed=stored)


def _plain(plan: Plan) -> bool:
    """Whether a plan runs the whole model through its own head (so its rows can share a call)."""
    return plan.layers is None and plan.head is None and not plan.features
