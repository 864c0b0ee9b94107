"""The drafter interface and the registry of drafters by name.

A drafter is bound once to a `DrafterHost`: the narrow part of the engine it may use (the target
runner, the tokenizer, the measured verification cost, the drafter options, fresh drafters for
composite ones). It never sees the engine itself.

Lifecycle per request: ``start(ctx)`` with the request's `RequestContext` -> repeated
``propose(tokens, max_nodes)`` / ``observe(step)`` -> ``stop()``. A drafter instance is kept by the engine
across requests, so state that should outlive a request (a global suffix tree, a token-recycling matrix)
lives on the instance; per-request state is reset in ``start``. One instance serves one request at a time
(the server gives each slot its own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from leapdecode.draft import Draft, StepResult
from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams

if TYPE_CHECKING:
    from leapdecode.cache import KVCache
    from leapdecode.costmodel import Cost
    from leapdecode.model.runner import Runner
    from leapdecode.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class RequestContext:
    """What a drafter knows of the request it drafts for, given at `start`.

    cache: the target's KV cache of this request (None where no model runs): model-based drafters may
    write slots past `cache.length` while drafting and must leave `length` as found; sampling: the
    request's sampling parameters (drafters with probabilities draw from their own distribution);
    seq_id: the request's id (statistics and logs)."""

    prompt_ids: tuple[int, ...]
    cache: KVCache | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seq_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))


@dataclass(frozen=True)
class DrafterHost:
    """What a drafter may ask of the engine that owns it."""

    target: Runner  # the target model (self-drafting runs it with a reduced plan)
    tokenizer: Tokenizer | None = None
    options: Mapping[str, dict] = field(default_factory=dict)  # drafter name -> options it is built with
    cost: Callable[[], Cost] | None = None  # the measured cost of verifying k tokens (None: unknown)
    make: Callable[[str], Drafter] | None = None  # a fresh drafter bound to this host (for `auto`)


class Drafter:
    """Base class: proposes nothing. Subclasses override what they need."""

    name = "none"
    #: True when `observe` reads `StepResult.logits`.
    wants_logits = False
    #: True when proposing reads the measured verification cost (the engine measures it before a request).
    uses_cost = False
    #: True when `observe` reads `StepResult.hidden` (the target's states of the committed rows; the
    #: prefill is observed too, see `StepResult`).
    wants_hidden = False

    def bind(self, host: DrafterHost) -> None:
        """Called once by the engine that owns this drafter (model-based drafters keep what they need)."""

    def start(self, ctx: RequestContext) -> None:
        """A new request begins."""

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        """Propose at most `max_nodes` tokens after `tokens` (all tokens so far; the root is the last)."""
        return Draft()

    def observe(self, step: StepResult) -> None:
        """Learn from one verification step; called after every step (the last one too), before `stop`.
        `step.logits` are always present."""

    def stop(self) -> None:
        """The request ended (finished, stopped or cancelled)."""


def parse_options(cls: Any, options: dict, drafter: str) -> Any:
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
