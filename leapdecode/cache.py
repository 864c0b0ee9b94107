"""Preallocated key/value cache with the two edits speculative decoding needs.

Slots ``[0, length)`` hold committed tokens. A forward of S new tokens writes slots
``[length, length + S)`` and then advances ``length``. After verifying a draft tree, ``keep`` compacts
the accepted nodes into the committed prefix (no recomputation); ``truncate`` drops a tail.
Keys are stored after RoPE, so a kept node must end at the slot equal to its rope position: this holds
for an accepted root-to-leaf path, whose depth equals its offset from the root.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leapdecode.errors import LeapError


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # [L, B, Hkv, T, D]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, Hkv, S, D] after the committed ones; return views [B, Hkv, T, D]."""
        n, s = self.length, k.shape[2]
        if n + s > self.max_len:
            raise LeapError(f"context full: {n + s} tokens exceed the cache size {self.max_len}")
        self.k[layer, :, :, n : n + s] = k
        self.v[layer, :, :, n : n + s] = v
        return self.k[layer, :, :, : n + s], self.v[layer, :, :, : n + s]

    def read(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the committed slots [start, end): keys and values [L, B, Hkv, end - start, D]."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"read({start}, {end}) outside [0, {self.length}]")
        return self.k[:, :, :, start:end].clone(), self.v[:, :, :, start:end].clone()

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Commit keys/values [L, B, Hkv, S, D] after the committed slots, as a forward of S tokens
        would have written them (a reused prefix: see `leapdecode.prefix_cache`)."""
        n, s = self.length, k.shape[3]
        if n + s > self.max_len:
            raise LeapError(f"context full: {n + s} tokens exceed the cache size {self.max_len}")
        self.k[:, :, :, n : n + s] = k
        self.v[:, :, :, n : n + s] = v
        self.length += s

    def advance(self, s: int) -> None:
        self.length += s

    def truncate(self, n: int) -> None:
        """Forget every slot from `n` on."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate({n}) outside [0, {self.length}]")
        self.length = n

    def keep(self, indices: Sequence[int], start: int) -> None:
        """Keep slots [0, start) followed by the slots `indices` (ascending, each >= start), in order."""
        idx = list(indices)
        if any(i < start or i >= self.length for i in idx) or idx != sorted(set(idx)):
            raise ValueError(f"keep: indices must be ascending, unique and in [{start}, {self.length})")
        if idx != list(range(start, start + len(idx))):
            src = torch.tensor(idx, device=self.k.device)
            self.k[:, :, :, start : start + len(idx)] = self.k.index_select(3, src)
            self.v[:, :, :, start : start + len(idx)] = self.v.index_select(3, src)
        self.length = start + len(idx)
