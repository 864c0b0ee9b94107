"""Where a request goes among the engine replicas of `leap serve --replicas N` (see
`leapdecode.server.ray_app`): prefix affinity, with the least-loaded replica as the fallback.

Each replica keeps its own prefix cache and drafter state, so a conversation is fastest on the replica
that served its earlier turns. The router cannot see the replicas' caches; it keeps, per replica, the
keys of the 16-token blocks of the prompts (and, once they end, the outputs) it sent there: a mirror of
that replica's prefix cache, least recently used first out. A block's key hashes its tokens together
with the key of the block before it, so a key stands for the whole prefix up to its block, as the prefix
cache's tree does. A later turn of a conversation extends the earlier prompt, so its leading blocks are
found on the replica that served the earlier turns, whatever the chat template puts first. A hash
collision can only send a request to another replica; it changes no output.

A request goes (`choose`):
  - *affinity*: to the replica holding the longest prefix of its prompt, when that prefix is longer than
    the one every live replica holds (a system prompt they all have decides nothing);
  - *fallback_busy*: elsewhere when that replica has all its slots busy and another has a free one, or
    its queue is full;
  - *fallback_down*: elsewhere when that replica is down (dead, or being restarted);
  - *balanced*: to the least-loaded live replica when no replica holds more of it than the others (a
    new conversation); ties in turn.
With every live replica's slots and queue full the request is refused (429); with none live, 503.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from leapdecode.server.errors import ApiError

BLOCK = 16  # tokens per key, as the prefix cache's blocks
DECISIONS = ("affinity", "balanced", "fallback_busy", "fallback_down")


def block_keys(token_ids: Sequence[int]) -> list[int]:
    """One key per whole block of `token_ids`, each standing for every token up to the block's end."""
    keys, key = [], 0
    for start in range(0, len(token_ids) - BLOCK + 1, BLOCK):
        key = hash((key, *token_ids[start : start + BLOCK]))
        keys.append(key)
    return keys


class PrefixIndex:
    """The block keys sent to one replica, least recently used first out past `capacity` keys."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def match(self, keys: Sequence[int]) -> int:
        """How many leading keys of `keys` are held."""
        n = 0
        while n < len(keys) and keys[n] in self._keys:
            n += 1
        return n

    def clear(self) -> None:
        self._keys.clear()


@dataclass(eq=False)
class ReplicaSlot:
    """The router's view of one replica: its load, whether it answers, and what its cache holds."""

    index: int
    index_capacity: int = 1 << 16
    in_flight: int = 0  # requests sent there and not yet ended
    up: bool = True
    prefixes: PrefixIndex = field(init=False)

    def __post_init__(self):
        self.prefixes = PrefixIndex(self.index_capacity)


def index_capacity(prefix_cache_mb: int, bytes_per_token: int) -> int:
    """Block keys to keep per replica: about what its prefix cache holds (at least 1024)."""
    return max(1024, prefix_cache_mb * (1 << 20) // max(1, BLOCK * bytes_per_token))


R = TypeVar("R", bound="ReplicaSlot")


def _least_loaded(candidates: list[R], turn: int, n: int) -> R:
    return min(candidates, key=lambda r: (not r.up, r.in_flight, (r.index - turn) % n))


def choose(
    replicas: Sequence[R], keys: Sequence[int], slots: int, capacity: int, turn: int = 0
) -> tuple[R, str]:
    """The replica for a prompt of block keys `keys`, and the decision's name (module docstring).
    `slots`: requests a replica generates at once; `capacity`: slots plus its queue; `turn` breaks ties."""
    live = [r for r in replicas if r.up]
    if not live:
        raise ApiError(503, "no engine replica is running; retry shortly", code="no_replica")
    room = [r for r in live if r.in_flight < capacity]
    if not room:
        raise ApiError(
            429,
            f"the server is busy: every replica has {capacity} requests generating or waiting; retry later",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    matches = {r.index: r.prefixes.match(keys) for r in replicas}
    best, floor = max(matches.values()), min(matches[r.index] for r in live)
    fallback = _least_loaded(room, turn, len(replicas))
    if best <= floor:
        return fallback, "balanced"
    preferred = _least_loaded([r for r in replicas if matches[r.index] == best], turn, len(replicas))
    if not preferred.up:
        return fallback, "fallback_down"
    if preferred not in room or (preferred.in_flight >= slots and fallback.in_flight < slots):
        return fallback, "fallback_busy"
    return preferred, "affinity"
