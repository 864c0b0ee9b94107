"""Reusing the keys and values of earlier requests: a prefix cache.

A prompt often starts like an earlier one (a system prompt, the turns of a conversation so far). The
committed K/V of finished prompts and generations are kept in blocks of `block_tokens` tokens, in a tree:
a block is keyed by its own tokens under its parent block, so it stands for the whole prefix up to its
end (a chain of blocks, keyed by exact token tuples rather than hashes: no collision can ever hand a
request another prompt's K/V). A new request copies the longest stored prefix of its prompt into its
cache and prefills only the rest.

Exactness: a token's K/V depend only on the tokens before it and on its position. The native kernels
are row-invariant (a row's values do not depend on the rows computed beside it), so K/V written by any
earlier forward (a prefill, a verified draft) are bit for bit those a cold prefill writes, and outputs
with a hit equal outputs without one (float64 on the torch backend).

Blocks: every full block of a stored sequence, plus its last partial block, so that a conversation's
next turn reuses everything up to its new tokens. A lookup follows full blocks while they match, then
takes the child that shares the longest start with the rest of the prompt and copies just those slots
(a block's first m slots are valid for any prompt sharing its first m tokens). The prompt's last token
is never reused: its logits give the first new token.

Memory: at most `capacity_bytes` of K/V once a store has finished (during one store it may exceed the
cap by that sequence's blocks); the least recently used blocks go first. A path is touched from its
leaf up to the root, so a block is always more recent than its descendants and the least recently used
block has no children: evicting it never strands another block.

Used from one thread at a time (the engine's caller); a lock makes a stray concurrent call safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from leapdecode.cache import KVCache
from leapdecode.checks import check_int

MIB = 1 << 20
MAX_MB = 1 << 20  # 1 TiB: a bound that catches a unit mistake (bytes given as MiB)
DEFAULT_MB = 256
BLOCK_TOKENS = 16


@dataclass(eq=False)  # identity hashing: blocks are keys of the LRU order
class _Block:
    tokens: tuple[int, ...]
    parent: _Block | None
    # the cache's tensors (`KVCache.tensors`) over the block's slots: keys and values
    # [L, B, Hkv, len(tokens), D] after RoPE as the cache holds them (with an int8 cache, then their scales)
    kv: tuple[torch.Tensor, ...] = ()
    children: dict[tuple[int, ...], _Block] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


@dataclass
class PrefixStats:
    """Counters since the cache was made (the server exports them; a request's own share is in its
    `Stats.prefix_cached_tokens`)."""

    lookups: int = 0  # prompts looked up
    hits: int = 0  # lookups that reused at least one token
    lookup_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # prompt tokens reused instead of prefilled
    stored_blocks: int = 0  # blocks added
    evicted_blocks: int = 0  # blocks dropped to stay under the cap

    @property
    def hit_rate(self) -> float:
        """The share of looked-up prompt tokens that were reused."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"hit_rate": round(self.hit_rate, 4)}


class PrefixCache:
    """K/V of earlier sequences by token prefix, under a memory cap with LRU eviction (module docstring).

    One cache belongs to one model runner: the blocks have its layer count, heads, dtype, device and key/
    value format."""

    def __init__(self, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS):
        self.capacity_bytes = check_int("prefix cache capacity (bytes)", capacity_bytes, 0)
        self.block_tokens = check_int("prefix cache block size (tokens)", block_tokens, 1, 4096)
        self._root = _Block((), None)
        self._lru: OrderedDict[_Block, None] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.nbytes = 0
        self.stats = PrefixStats()

    @classmethod
    def from_mb(cls, mb: int) -> PrefixCache | None:
        """A cache of `mb` MiB; None for 0 (disabled)."""
        check_int("prefix cache size (MiB)", mb, 0, MAX_MB)
        return cls(mb * MIB) if mb else None

    @property
    def blocks(self) -> int:
        return len(self._lru)

    def restore(self, ids: Sequence[int], cache: KVCache) -> int:
        """Fill the empty `cache` with the longest stored prefix of `ids` (never its last token);
        returns how many tokens were reused (0: prefill them all)."""
        if cache.length:
            raise ValueError("restore needs an empty cache")
        with self._lock:
            path = self._match(ids[:-1])
            for block, m in path:
                cache.extend(*(t[:, :, :, :m] for t in block.kv))
            self._touch(block for block, _ in path)
            reused = sum(m for _, m in path)
            self._count_lookup(len(ids), reused)
        return reused

    def store(self, ids: Sequence[int], cache: KVCache) -> None:
        """Remember the K/V of `ids[:cache.length]`, which fill the cache's committed slots in order."""
        n, size = min(len(ids), cache.length), self.block_tokens
        with self._lock:
            node, path = self._root, []
            for at in range(0, n, size):
                chunk = tuple(ids[at : min(at + size, n)])
                node = self._child(node, chunk, cache, at)
                path.append(node)
            self._touch(path)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._root, self._lru, self.nbytes = _Block((), None), OrderedDict(), 0

    # ------------------------------------------------------------ the tree

    def _match(self, ids: Sequence[int]) -> list[tuple[_Block, int]]:
        """The blocks of the longest stored prefix of `ids`, each with how many of its slots to copy."""
        node, at, path, size = self._root, 0, [], self.block_tokens
        while at < len(ids):
            want = tuple(ids[at : at + size])
            child = node.children.get(want) if len(want) == size else None
            if child is None:
                child, m = _longest_start(node, want)
                if m:
                    path.append((child, m))
                break
            path.append((child, size))
            node, at = child, at + size
        return path

    def _child(self, node: _Block, chunk: tuple[int, ...], cache: KVCache, at: int) -> _Block:
        """The child of `node` holding `chunk` (slots [at, at + len(chunk)) of `cache`), added if new.
        A partial chunk already covered by a longer child is that child; a new block replaces the
        partial leaves it extends (they hold a copy of its first slots)."""
        child = node.children.get(chunk)
        if child is None and len(chunk) < self.block_tokens:
            covering = [c for t, c in node.children.items() if t[: len(chunk)] == chunk]
            child = covering[0] if covering else None
        if child is not None:
            return child
        for tokens, old in list(node.children.items()):
            if not old.children and len(tokens) < len(chunk) and chunk[: len(tokens)] == tokens:
                self._drop(old)
        child = node.children[chunk] = _Block(chunk, node, cache.read(at, at + len(chunk)))
        self.nbytes += child.nbytes
        self.stats.stored_blocks += 1
        return child

    def _touch(self, path: Iterable[_Block]) -> None:
        """Mark a root-to-leaf path as just used, leaf first: ancestors stay more recent (module doc)."""
        for block in reversed(list(path)):
            self._lru[block] = None
            self._lru.move_to_end(block)

    def _evict(self) -> None:
        while self.nbytes > self.capacity_bytes and self._lru:
            oldest = next(iter(self._lru))
            assert not oldest.children  # ancestors are always more recent (see `_touch`)
            self._drop(oldest)
            self.stats.evicted_blocks += 1

    def _drop(self, block: _Block) -> None:
        assert block.parent is not None
        del block.parent.children[block.tokens]
        self._lru.pop(block, None)
        self.nbytes -= block.nbytes

    def _count_lookup(self, tokens: int, reused: int) -> None:
        s = self.stats
        s.lookups += 1
        s.hits += reused > 0
        s.lookup_tokens += tokens
        s.hit_tokens += reused


def _longest_start(node: _Block, want: tuple[int, ...]) -> tuple[_Block, int]:
    """The child of `node` whose tokens share the longest start with `want`, and that length."""
    best, best_m = node, 0
    for tokens, child in node.children.items():
        m = 0
        for a, b in zip(tokens, want):
            if a != b:
                break
            m += 1
        if m > best_m:
            best, best_m = child, m
    return best, best_m
