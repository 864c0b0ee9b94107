"""The torch backend: the reference Transformer (any device and dtype) behind the runner's one forward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F

from leapdecode.cache import KVCache
from leapdecode.model.config import ModelConfig
from leapdecode.model.llama import Attention, Block, Transformer, apply_rope
from leapdecode.model.runner import (
    FULL,
    NO_LOGITS,
    BatchItem,
    Head,
    Output,
    Plan,
    check_features,
    check_inputs,
    check_layers,
    new_cache,
)


class TorchRunner:
    """Runs `model` (a `Transformer` with torch `Linear` layers) as a `Runner`."""

    backend = "torch"

    def __init__(self, model: Transformer, spec: object = None):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.spec = spec

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def nbytes(self) -> int:
        weights = [
            p for name, p in self.model.named_parameters() if name.endswith(".weight") and p.dim() == 2
        ]
        return sum(w.numel() * w.element_size() for w in weights)

    def new_cache(self, max_len: int) -> KVCache:
        return new_cache(self.cfg, max_len, self.dtype, self.device, self.spec)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask=None, plan: Plan = FULL
    ) -> Output:
        s = check_inputs(self.cfg, tokens, positions, cache, mask)
        check_features(plan.features, len(self.model.blocks))
        check_layers(plan.layers, len(self.model.blocks))
        outs: list[torch.Tensor] | None = [] if plan.features else None
        x = self.model(tokens[None], positions, cache, mask, plan.layers, outs)[0]  # [S, D]
        feats = None if outs is None else torch.stack([outs[f][0] for f in plan.features])  # [F, S, D]
        if plan.advance:
            cache.advance(s)
        logits = NO_LOGITS
        if plan.rows != "none":
            rows = x[-1:] if plan.rows == "last" else x  # [S or 1, D]
            logits = (plan.head or self.model.lm_head)(self.model.norm(rows))  # [S or 1, V]
        return Output(logits, x if plan.hidden else None, feats)

    @torch.inference_mode()
    def forward_batch(self, items: Sequence[BatchItem]) -> list[Output]:
        """Several sequences in one pass over the weights: their rows go through every linear layer
        together (ragged: [R, D] with R the rows of all items), attention runs per sequence on its own
        cache. Items whose plan skips blocks, swaps the head or asks for features run alone."""
        shared = [i for i, item in enumerate(items) if _plain(item.plan)]
        outs: list[Output | None] = [None] * len(items)
        for i, out in zip(shared, self._ragged([items[i] for i in shared])):
            outs[i] = out
        for i, item in enumerate(items):
            if outs[i] is None:
                outs[i] = self.forward(item.tokens, item.positions, item.cache, item.mask, item.plan)
        return [o for o in outs if o is not None]

    def _ragged(self, items: list[BatchItem]) -> list[Output]:
        if not items:
            return []
        sizes = [check_inputs(self.cfg, i.tokens, i.positions, i.cache, i.mask) for i in items]
        m = self.model
        x = F.embedding(torch.cat([i.tokens for i in items]), m.embed)  # [R, D]
        ropes = [m.rope(i.positions) for i in items]  # per item: 2x [S_i, hd]
        masks = [_causal(i) for i in items]
        for layer, block in enumerate(cast(list[Block], list(m.blocks))):
            h = block.attn_norm(x)  # [R, D]
            x = x + block.attn.wo(_attention(block.attn, h, sizes, items, ropes, masks, layer))
            x = x + block.mlp(block.mlp_norm(x))
        outs = []
        for item, rows in zip(items, x.split(sizes)):  # [S_i, D] each
            if item.plan.advance:
                item.cache.advance(rows.shape[0])
            outs.append(self._output(rows, item.plan))
        return outs

    def _output(self, x: torch.Tensor, plan: Plan) -> Output:
        logits = NO_LOGITS
        if plan.rows != "none":
            rows = x[-1:] if plan.rows == "last" else x  # [S or 1, D]
            logits = self.model.lm_head(self.model.norm(rows))  # [S or 1, V]
        return Output(logits, x if plan.hidden else None)

    def output_rows(self, rows: torch.Tensor) -> Head:
        return self.model.lm_head.select_rows(rows)


def _plain(plan: Plan) -> bool:
    """Whether a plan runs the whole model through its own head (so its rows can share the weights)."""
    return plan.layers is None and plan.head is None and not plan.features


def _causal(item: BatchItem) -> torch.Tensor | None:
    s, n = item.tokens.shape[0], item.cache.length
    if item.mask is not None or s == 1:
        return item.mask
    return torch.ones(s, n + s, dtype=torch.bool, device=item.tokens.device).tril(n)  # [S, n + S]


def _attention(attn: Attention, h, sizes, items, ropes, masks, layer: int) -> torch.Tensor:
    """Attention of every item's rows over its own cache: [R, D] -> [R, H * hd] (before `wo`)."""
    q_size, kv_size, hd = attn.n_heads * attn.hd, attn.n_kv * attn.hd, attn.hd
    qkv = attn.wqkv(h)  # [R, q + 2 kv]: one weight pass for every sequence
    ys = []
    for rows, item, (cos, sin), mask in zip(qkv.split(sizes), items, ropes, masks):
        s = rows.shape[0]
        q, k, v = rows.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(1, s, attn.n_heads, hd).transpose(1, 2)  # [1, H, S, hd]
        k = k.view(1, s, attn.n_kv, hd).transpose(1, 2)  # [1, Hkv, S, hd]
        v = v.view(1, s, attn.n_kv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = item.cache.update(layer, k, v)  # [1, Hkv, T, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.n_kv != attn.n_heads)
        ys.append(y.transpose(1, 2).reshape(s, q_size))  # [S, H * hd]
    return torch.cat(ys)  # [R, H * hd]
