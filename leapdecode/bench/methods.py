"""Contenders of a benchmark: our decoding methods (one per drafter) and the peers (see `peers`).

Every contender answers the same chat-templated token ids and returns a `Run`: the new token ids (end of
turn excluded) and the wall time of the generate call, plus speculative statistics where it has them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from leapdecode.engine import Engine, GenerationConfig
from leapdecode.sampling import SamplingParams


@dataclass(frozen=True)
class Run:
    token_ids: list[int]
    wall_s: float
    prefill_s: float | None = None
    steps: int | None = None  # verification forwards after prefill
    accepted: int | None = None  # draft tokens accepted (bonus tokens excluded)
    draft_s: float | None = None
    verify_s: float | None = None
    accepted_hist: list[int] | None = None  # [k] = steps that accepted exactly k draft tokens

    @property
    def mean_accepted(self) -> float | None:
        """Tokens committed per verification step, the bonus token included (1.0 = plain decoding)."""
        if not self.steps or self.accepted is None:
            return None
        return (self.accepted + self.steps) / self.steps


class Contender:
    """Something that answers prompts: `kind` is "method" (ours) or "peer"."""

    name = "contender"
    kind = "method"

    def run(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> Run:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the report should say about this contender (versions, compute format)."""
        return {}


def hist_from_depths(steps: int, accepted_by_depth: list[int]) -> list[int]:
    """Steps that accepted exactly k draft tokens, from the counts of steps that accepted >= d tokens.

    `accepted_by_depth[d]` counts steps with at least d + 1 accepted nodes, so the steps with exactly k
    are ``by_depth[k - 1] - by_depth[k]`` (with ``by_depth[-1] = steps``): the histogram is exact.
    """
    at_least = [steps] + list(accepted_by_depth) + [0]
    return [at_least[k] - at_least[k + 1] for k in range(len(at_least) - 1)]


class DrafterMethod(Contender):
    """Our engine with one drafter ("none" = plain decoding)."""

    kind = "method"

    def __init__(self, engine: Engine, drafter: str, max_draft: int = 64):
        self.engine, self.name, self.max_draft = engine, drafter, max_draft
        self.drafter_name = drafter  # `name` may be changed by subclasses that wrap a drafter
        self.drafter = engine.drafter(drafter)  # unknown names fail here, before any work

    def run(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> Run:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            drafter=self.drafter_name,
            max_draft=self.max_draft,
        )
        t0 = time.perf_counter()
        result = self.engine.generate(prompt_ids, config, drafter=self.drafter)
        wall = time.perf_counter() - t0
        s = result.stats
        return Run(
            list(result.token_ids),
            wall,
            prefill_s=s.prefill_s,
            steps=s.steps,
            accepted=s.accepted,
            draft_s=s.draft_s,
            verify_s=s.verify_s,
            accepted_hist=hist_from_depths(s.steps, s.accepted_by_depth),
        )

    def describe(self) -> dict:
        return {"engine": "leapdecode", "backend": self.engine.backend, "max_draft": self.max_draft}
