"""Small helpers on token sequences that several drafters share."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (one C-speed comparison when one extends the other)."""
    m = min(len(a), len(b))
    if list(a[:m]) == list(b[:m]):
        return m
    return next((i for i in range(m) if a[i] != b[i]), m)
