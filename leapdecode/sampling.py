"""Sampling parameters and the target distribution they define.

`SamplingParams.temperature == 0` means greedy decoding. Otherwise the target distribution at a position
is softmax(logits / temperature) restricted to the top-k tokens and then to the smallest set whose
probability reaches top-p (renormalised). Speculative sampling is exact with respect to this distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leapdecode.errors import LeapError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise LeapError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LeapError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise LeapError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of the target distribution, computed in float64 for stable acceptance ratios.

    logits: [..., V] -> probs [..., V]. Greedy params give a one-hot on the argmax.
    """
    logits = logits.to(torch.float64)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float64)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return probs


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    # keep a token if the mass strictly before it is below top_p (so the top token always stays)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a 1-D probability vector."""
    return int(torch.multinomial(probs, 1, generator=generator).item())
