"""The drafter interface and the registry of drafters by name.

Lifecycle per request: ``start(prompt_ids)`` -> repeated ``propose(tokens, max_nodes)`` / ``observe(step)``
-> ``stop()``. A drafter instance is kept by the engine across requests, so state that should outlive a
request (a global suffix tree, a token-recycling matrix) lives on the instance; per-request state is
reset in ``start``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from leapdecode.draft import Draft
from leapdecode.errors import LeapError


@dataclass(frozen=True)
class StepResult:
    """What one verification step produced, for drafters that learn from it.

    tokens: the forward's input ids, ``[root] + draft.token_ids``; logits: ``[1 + n, V]`` target logits at
    those inputs; accepted: accepted node indices (a root-to-node path); bonus: the target's token after it.
    """

    draft: Draft
    tokens: list[int]
    logits: torch.Tensor
    accepted: list[int]
    bonus: int
    forward_s: float = 0.0  # seconds of the verification forward itself

    @property
    def committed(self) -> list[int]:
        """Tokens appended to the sequence by this step (accepted draft tokens, then the bonus)."""
        return [self.draft.token_ids[i] for i in self.accepted] + [self.bonus]


class Drafter:
    """Base class: proposes nothing. Subclasses override what they need."""

    name = "none"
    #: True when `observe` reads `StepResult.logits`.
    wants_logits = False
    #: The target's KV cache of the current request, set by the engine after `start`, before the first
    #: `propose` (model-based drafters may write slots past `cache.length` while drafting, and must leave
    #: `length` as found).
    cache = None
    #: The current request's SamplingParams, set with `cache`.
    sampling = None

    def bind(self, engine) -> None:
        """Called once by the engine that owns this drafter (model-based drafters keep a reference)."""

    def start(self, prompt_ids: Sequence[int]) -> None:
        """A new request begins with these prompt tokens."""

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        """Propose at most `max_nodes` tokens after `tokens` (all tokens so far; the root is the last)."""
        return Draft()

    def observe(self, step: StepResult) -> None:
        """Learn from one verification step; called after every step (the last one too), before `stop`.
        `step.logits` are always present."""

    def stop(self) -> None:
        """The request ended (finished, stopped or cancelled)."""


def parse_options(cls, options: dict, drafter: str):
    """Build a drafter's options dataclass, naming unknown options clearly."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise LeapError(f"unknown {drafter} option(s) {', '.join(unknown)}; expected: {', '.join(known)}")
    return cls(**options)


DrafterFactory = Callable[..., Drafter]
_REGISTRY: dict[str, DrafterFactory] = {}


def register(name: str) -> Callable[[DrafterFactory], DrafterFactory]:
    def deco(factory: DrafterFactory) -> DrafterFactory:
        if name in _REGISTRY:
            raise ValueError(f"drafter {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


register("none")(Drafter)


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_drafter(name: str, **options) -> Drafter:
    _load_builtin()
    if name not in _REGISTRY:
        raise LeapError(f"unknown drafter {name!r}; expected one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def _load_builtin() -> None:
    # Importing the package registers every built-in drafter module.
    import leapdecode.drafters  # noqa: F401
