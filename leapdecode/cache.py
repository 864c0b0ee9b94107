"""Preallocated key/value cache with the two edits speculative decoding needs.

Slots ``[0, length)`` hold committed tokens. A forward of S new tokens writes slots
``[length, length + S)`` and then advances ``length``. After verifying a draft tree, ``keep`` compacts
the accepted nodes into the committed prefix (no recomputation); ``truncate`` drops a tail.
Keys are stored after RoPE, so a kept node must end at the slot equal to its rope position: this holds
for an accepted root-to-leaf path, whose depth equals its offset from the root.

Formats (`kv_dtype`): "float32" keeps keys and values in the model's float dtype; "int8" keeps each
token's key (and value) of each head as int8 with one scale, symmetric (scale = max |x| / 127, the values
rounded to nearest, ties to even): a quarter of float32's bytes, so attention at long context reads a
quarter as much. A token's stored values depend on its own key and value alone, so a row's result never
depends on the rows written beside it, and speculative decoding stays exactly plain decoding with the
same format. Every tensor of the cache has its token axis at dim 3 (`tensors`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leapdecode.errors import LeapError

KV_DTYPES = ("float32", "int8")
INT8_MAX = 127


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise LeapError(
            f"unknown key/value cache format {kv_dtype!r} (--kv-cache); expected one of: "
            + ", ".join(KV_DTYPES)
        )
    return kv_dtype


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 values [..., D], scales [...] in x's dtype): symmetric per row, as the native
    kernels write them (a zero row has scale 0 and zero values)."""
    scale = x.abs().amax(-1) / INT8_MAX
    q = torch.round(x / scale.unsqueeze(-1))
    q = torch.where(scale.unsqueeze(-1) > 0, q, torch.zeros_like(q)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 values [..., D] with scales [...] -> values [..., D] in the scales' dtype."""
    return q.to(scale.dtype) * scale.unsqueeze(-1)


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
        kv_dtype: str = "float32",
    ):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # [L, B, Hkv, T, D]
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.dtype = dtype  # what keys and values are computed (and read back) in
        stored = torch.int8 if kv_dtype == "int8" else dtype
        self.k = torch.zeros(shape, dtype=stored, device=device)
        self.v = torch.zeros(shape, dtype=stored, device=device)
        self.ks: torch.Tensor | None = None  # int8: the scales [L, B, Hkv, T] of k and v
        self.vs: torch.Tensor | None = None
        if kv_dtype == "int8":
            self.ks = torch.zeros(shape[:-1], dtype=dtype, device=device)
            self.vs = torch.zeros(shape[:-1], dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Everything the cache stores, each with its token axis at dim 3: (k, v), or (k, v, ks, vs)."""
        if self.ks is None or self.vs is None:
            return self.k, self.v
        return self.k, self.v, self.ks, self.vs

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, Hkv, S, D] after the committed ones; return keys/values
        [B, Hkv, T, D] as stored (int8: dequantized copies)."""
        n, s = self.length, k.shape[2]
        if n + s > self.max_len:
            raise LeapError(f"context full: {n + s} tokens exceed the cache size {self.max_len}")
        if self.ks is None or self.vs is None:
            self.k[layer, :, :, n : n + s] = k
            self.v[layer, :, :, n : n + s] = v
            return self.k[layer, :, :, : n + s], self.v[layer, :, :, : n + s]
        self.k[layer, :, :, n : n + s], self.ks[layer, :, :, n : n + s] = quantize(k)
        self.v[layer, :, :, n : n + s], self.vs[layer, :, :, n : n + s] = quantize(v)
        keys = dequantize(self.k[layer, :, :, : n + s], self.ks[layer, :, :, : n + s])
        return keys, dequantize(self.v[layer, :, :, : n + s], self.vs[layer, :, :, : n + s])

    def read(self, start: int, end: int) -> tuple[torch.Tensor, ...]:
        """Copies of the committed slots [start, end) of every tensor (`tensors`: keys and values
        [L, B, Hkv, end - start, D], then int8's scales [L, B, Hkv, end - start])."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"read({start}, {end}) outside [0, {self.length}]")
        return tuple(t[:, :, :, start:end].clone() for t in self.tensors())

    def extend(self, *parts: torch.Tensor) -> None:
        """Commit S slots of every tensor (as `read` returns them) after the committed slots, as a forward
        of S tokens would have written them (a reused prefix: see `leapdecode.prefix_cache`)."""
        mine = self.tensors()
        if len(parts) != len(mine) or any(p.dtype != t.dtype for p, t in zip(parts, mine)):
            raise LeapError(f"extend: the parts of a {self.kv_dtype} cache are {len(mine)} tensors")
        n, s = self.length, parts[0].shape[3]
        if n + s > self.max_len:
            raise LeapError(f"context full: {n + s} tokens exceed the cache size {self.max_len}")
        for t, p in zip(mine, parts):
            t[:, :, :, n : n + s] = p
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
            for t in self.tensors():
                t[:, :, :, start : start + len(idx)] = t.index_select(3, src)
        self.length = start + len(idx)
