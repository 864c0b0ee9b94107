"""A GGUF file's header, read by the project: metadata as plain Python values, tensors as views of one
memory map.

Why not `gguf.GGUFReader`: it keeps a numpy array per element of every metadata array, and a 150k-token
vocabulary (Qwen2.5) made opening the 1.5B Qwen cost 519 MB of memory before any weight was read. Here
metadata arrays become Python lists (strings) or one numpy array (numbers), and nothing else is kept.

Layout (little-endian): magic "GGUF", version (u32, 2 or 3), tensor count and metadata count (u64);
each metadata entry: key (u64 length + UTF-8 bytes), value type (u32), value; each tensor: name, number of
dimensions (u32), dimensions (u64 each, fastest first), ggml type (u32), offset (u64) from the start of
the data section, which begins at the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# metadata value types -> numpy dtype (scalars and number arrays)
_NUMBERS = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
}
_NUMBERS[12] = "<f8"
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass
class Field:
    """One metadata entry: `contents()` gives its value (a list for arrays), `data` the same."""

    name: str
    value: Any

    def contents(self) -> Any:
        return self.value.tolist() if isinstance(self.value, np.ndarray) else self.value

    @property
    def data(self) -> Any:
        return self.value


@dataclass
class Tensor:
    """One tensor: `shape` as ggml lists it (fastest dimension first), `data` a view of the file: float
    values for F32/F16, else raw bytes [rows, bytes per row]."""

    name: str
    shape: np.ndarray
    tensor_type: GGMLQuantizationType
    data: np.ndarray


class _Cursor:
    def __init__(self, buf: np.memmap):
        self.buf, self.at = buf, 0

    def take(self, dtype: str, count: int = 1) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.at + size > len(self.buf):
            raise ValueError("the header runs past the end of the file")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.at)
        self.at += size
        return out

    def scalar(self, dtype: str) -> Any:
        return self.take(dtype)[0].item()

    def string(self) -> str:
        n = self.scalar("<u8")
        return bytes(self.take("<u1", n)).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.scalar("<u4"), self.scalar("<u8")
            if item == _STRING:
                return [self.string() for _ in range(n)]
            if item not in _NUMBERS:
                return [self.value(item) for _ in range(n)]
            return self.take(_NUMBERS[item], n).copy()
        if kind not in _NUMBERS:
            raise ValueError(f"unknown metadata value type {kind}")
        v = self.scalar(_NUMBERS[kind])
        return bool(v) if kind == _BOOL else v


class GGUFFile:
    """`fields` (name -> Field) and `tensors` (list of Tensor) of a GGUF file, memory-mapped read-only."""

    def __init__(self, path: str | Path):
        self.data = np.memmap(path, mode="r")
        cur = _Cursor(self.data)
        if bytes(cur.take("<u1", 4)) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = cur.scalar("<u4")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_fields = cur.scalar("<u8"), cur.scalar("<u8")
        self.fields: dict[str, Field] = {}  # the header's counts first, as gguf-py lists them
        for name, v in (
            ("GGUF.version", version),
            ("GGUF.tensor_count", n_tensors),
            ("GGUF.kv_count", n_fields),
        ):
            self.fields[name] = Field(name, v)
        for _ in range(n_fields):
            name = cur.string()
            self.fields[name] = Field(name, cur.value(cur.scalar("<u4")))
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-cur.at // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    @staticmethod
    def _tensor_info(cur: _Cursor) -> tuple[str, np.ndarray, int, int]:
        name = cur.string()
        dims = cur.take("<u8", cur.scalar("<u4")).copy()
        return name, dims, cur.scalar("<u4"), cur.scalar("<u8")

    def _tensor(self, start: int, name: str, dims: np.ndarray, kind: int, offset: int) -> Tensor:
        qtype = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[qtype]
        np_shape = [int(d) for d in reversed(dims)]  # slowest dimension first
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
            count = int(np.prod(np_shape))
            data = np.frombuffer(self.data, dtype=dtype, count=count, offset=start + offset).reshape(np_shape)
        else:
            np_shape[-1] = np_shape[-1] // block * size
            count = int(np.prod(np_shape))
            data = np.frombuffer(self.data, dtype=np.uint8, count=count, offset=start + offset).reshape(
                np_shape
            )
        return Tensor(name, dims, qtype, data)
