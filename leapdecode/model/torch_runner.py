"""The torch backend: the reference Transformer (any device and dtype) behind the runner's one forward."""

from __future__ import annotations

import torch

from leapdecode.cache import KVCache
from leapdecode.model.config import ModelConfig
from leapdecode.model.llama import Transformer
from leapdecode.model.runner import (
    FULL,
    NO_LOGITS,
    Head,
    Output,
    Plan,
    check_features,
    check_inputs,
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
        return new_cache(self.cfg, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask=None, plan: Plan = FULL
    ) -> Output:
        s = check_inputs(self.cfg, tokens, positions, cache, mask)
        check_features(plan.features, len(self.model.blocks))
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

    def output_rows(self, rows: torch.Tensor) -> Head:
        return self.model.lm_head.select_rows(rows)
