"""A draft model's output layer over part of the vocabulary (as FR-Spec, arXiv 2502.14856, proposes).

A drafted token costs one forward of the draft model, and for a small model with a large vocabulary the
output layer is a large share of the bytes that forward reads (Qwen2.5 0.5B: 152k rows of 896, 39% of
its int4 step). `DraftVocab` computes the logits of the first `core` token ids only (byte-level BPE and
SentencePiece vocabularies are ordered by merge order or score, so the low ids are the frequent ones)
plus every id the request has used so far (its prompt and output), and sets the rest to -inf.

This never changes the output: the target verifies every drafted token, and under sampling the draft
distribution is the softmax over these logits, zero elsewhere, which is what rejection sampling needs
(tokens are drawn from it and it is what `Draft.probs` carries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from leapdecode.errors import LeapError


class DraftVocab:
    """Logits [..., V] of an output layer on ids < core and on the ids seen in the request; -inf elsewhere.
    `rows(ids)` gives that output layer restricted to the ascending ids (`Runner.output_rows`)."""

    def __init__(self, rows: Callable[[torch.Tensor], Callable], vocab_size: int, core: int):
        if not 0 < core < vocab_size:
            raise LeapError(f"draft vocabulary: core must be in (0, {vocab_size}), got {core}")
        self.rows, self.vocab_size, self.core = rows, vocab_size, core
        self.core_head = rows(torch.arange(core))
        self.reset()

    def reset(self, tokens: Iterable[int] = ()) -> None:
        """Start a request: the extra ids are the ones of `tokens` (its prompt) at or above `core`."""
        self.extra_ids = torch.empty(0, dtype=torch.long)  # ascending ids >= core, the rows of extra_head
        self.extra_head: Callable | None = None
        self._extra: set[int] = set()
        self.add(tokens)

    def add(self, tokens: Iterable[int]) -> None:
        """Include these ids from now on (the ones below `core` are included anyway)."""
        fresh = {t for t in tokens if t >= self.core} - self._extra
        if not fresh:
            return
        if max(fresh) >= self.vocab_size:
            raise LeapError(f"draft vocabulary: token id {max(fresh)} is outside [0, {self.vocab_size})")
        self._extra |= fresh
        self.extra_ids = torch.tensor(sorted(self._extra), dtype=torch.long)
        self.extra_head = self.rows(self.extra_ids)  # a few rows: rebuilt, not patched

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        out = torch.full(x.shape[:-1] + (self.vocab_size,), float("-inf"), dtype=x.dtype, device=x.device)
        out[..., : self.core] = self.core_head(x)
        if self.extra_head is not None:
            out[..., self.extra_ids.to(x.device)] = self.extra_head(x)
        return out
