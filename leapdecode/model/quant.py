"""Weight formats for the linear layers: float32, blocks of 32 with fp16 scales, and GGUF's own blocks.

  f32   float32 weights, interleaved: groups of 4 rows, 8 columns of each row in turn (see `pack_f32`)
  q8_0  int8 q, scale d:               w = d * q        (GGUF Q8_0; our `int8`)
  q4_1  4-bit q, scale d and min m:    w = d * q + m    (GGUF Q4_1; our `int4`; GGUF Q4_0 as m = -8 d)
  q4_k, q5_k, q6_k, q5_0               GGUF Q4_K, Q5_K, Q6_K, Q5_0: the file's blocks byte for byte

A q8_0 or q4_1 `QuantWeight` keeps the quantized values apart from the scales (q [N, nb * bytes], d and
m [N, nbp] with nbp = nb rounded up to 8 and zero padding) so the kernels read each stream with plain
vector loads. Repacking GGUF blocks only splits and pads arrays and converts Q4_0's offset into a min.
The GGUF block formats (`BLOCK_FORMATS`) keep each row's blocks as stored (qs [N, row bytes]; their
kernels decode the scales, see kernels/kquant.h). Either way every weight value stays exactly what the
file stores (tests compare with `gguf.quants.dequantize`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from leapdecode.errors import LeapError

QK = 32  # weights per block
QK_K = 256  # weights per super-block of the K-quant formats
# The GGUF block formats: (weights per block, bytes per block) as the file stores them.
BLOCK_FORMATS = {"q4_k": (QK_K, 144), "q5_k": (QK_K, 176), "q6_k": (QK_K, 210), "q5_0": (QK, 22)}
FORMATS = ("f32", "q8_0", "q4_1", *BLOCK_FORMATS)
_Q_BYTES = {"q8_0": QK, "q4_1": QK // 2}  # bytes of quantized values per block


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of `k` weights in GGUF block format `fmt`."""
    weights, size = BLOCK_FORMATS[fmt]
    return k // weights * size


def padded_blocks(k: int) -> int:
    return (k // QK + 7) // 8 * 8


@dataclass(frozen=True, eq=False)
class QuantWeight:
    fmt: str
    out_features: int
    in_features: int
    qs: torch.Tensor | None = None  # uint8 [N, nb * bytes per block]
    d: torch.Tensor | None = None  # float16 [N, nbp]
    m: torch.Tensor | None = None  # float16 [N, nbp] (q4_1 only)
    f: torch.Tensor | None = None  # float32 [ceil(N / 4), ceil(K / 8), 4, 8] (f32 only; see pack_f32)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise LeapError(f"unknown weight format {self.fmt!r}; expected one of {FORMATS}")
        block = BLOCK_FORMATS[self.fmt][0] if self.fmt in BLOCK_FORMATS else QK
        if self.fmt != "f32" and self.in_features % block:
            raise LeapError(
                f"format {self.fmt} needs in_features divisible by {block}, got {self.in_features}"
            )
        if self.fmt in BLOCK_FORMATS and self.qs is not None:
            want = (self.out_features, row_bytes(self.fmt, self.in_features))
            if tuple(self.qs.shape) != want or self.qs.dtype != torch.uint8:
                raise LeapError(
                    f"a {self.fmt} weight needs qs uint8 {list(want)} (its rows of blocks), got "
                    f"{self.qs.dtype} {list(self.qs.shape)}"
                )

    TENSORS = ("qs", "d", "m", "f")  # the fields holding packed tensors

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors this weight has, by field name."""
        return {n: getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}

    def tensor(self, name: str) -> torch.Tensor:
        """A packed tensor this weight's format needs ("qs", "d", "m" or "f")."""
        t = getattr(self, name)
        if t is None:
            raise LeapError(f"a {self.fmt} weight needs its {name!r} tensor")
        return t

    def map_tensors(self, fn) -> QuantWeight:
        """The same weight with each packed tensor t replaced by fn(t)."""
        return dataclasses.replace(self, **{n: fn(t) for n, t in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        """Bytes a forward reads (padding included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


# ---------------------------------------------------------------- packing


def _pad_scales(s: torch.Tensor) -> torch.Tensor:  # [N, nb] -> [N, nbp] float16, zero padded
    n, nb = s.shape
    out = torch.zeros(n, padded_blocks(nb * QK), dtype=torch.float16)
    out[:, :nb] = s
    return out


def _pack(fmt: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> QuantWeight:
    """q uint8 [N, nb, bytes], d/m float16 [N, nb]."""
    n, nb, _ = q.shape
    return QuantWeight(
        fmt,
        n,
        nb * QK,
        qs=q.reshape(n, -1).contiguous(),
        d=_pad_scales(d),
        m=None if m is None else _pad_scales(m),
    )


def _nibbles(q: torch.Tensor) -> torch.Tensor:  # [N, nb, 32] in 0..15 -> [N, nb, 16] (GGUF order)
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


F32_ROWS, F32_LANES = 4, 8  # the f32 interleave: rows per group, columns per run


def pack_f32(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 4), ceil(K / 8), 4, 8], zero padded: 8 columns of row 0 of a group of 4 rows,
    the same 8 of row 1, 2, 3, then the next 8 columns. Why: a kernel tile reads 4 rows side by side, and
    this way it reads them as one sequential stream, which the CPU prefetches far better than 4 streams
    (measured 46 -> 66 GB/s on 2 cores). Values are only moved, never changed."""
    n, k = w.shape
    g, c = -(-n // F32_ROWS), -(-k // F32_LANES)
    out = torch.zeros(g * F32_ROWS, c * F32_LANES, dtype=torch.float32)
    out[:n, :k] = w
    return out.reshape(g, F32_ROWS, c, F32_LANES).transpose(1, 2).contiguous()


def unpack_f32(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack_f32`: float32 [N, K]."""
    g, c = p.shape[0], p.shape[1]
    return p.transpose(1, 2).reshape(g * F32_ROWS, c * F32_LANES)[:n, :k]


_QUANTIZE_ELEMENTS = 1 << 22  # weights rounded at a time


def quantize(w: torch.Tensor, fmt: str) -> QuantWeight:
    """Round-to-nearest quantization of float weights [N, K] per block of 32."""
    w = w.detach().to(device="cpu", dtype=torch.float32)
    n, k = w.shape
    if fmt == "f32":
        return QuantWeight("f32", n, k, f=pack_f32(w))
    if fmt in BLOCK_FORMATS:
        raise LeapError(f"format {fmt} holds a GGUF file's blocks as stored; quantize rounds to q8_0 or q4_1")
    if fmt not in _Q_BYTES:
        raise LeapError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
    if k % QK:
        raise LeapError(f"format {fmt} needs in_features divisible by {QK}, got {k}")
    blocks = w.reshape(n, k // QK, QK)
    q = torch.empty(n, k // QK, _Q_BYTES[fmt], dtype=torch.uint8)
    d, m = torch.empty(n, k // QK, dtype=torch.float16), torch.empty(n, k // QK, dtype=torch.float16)
    # A few rows at a time, into the packed arrays: the rounding's temporaries are several times the
    # weights' size, which for the output layer of a large vocabulary would be gigabytes. Rows are
    # rounded independently, so the values do not depend on the split.
    step = max(1, _QUANTIZE_ELEMENTS // k)
    for i in range(0, n, step):
        rows = slice(i, i + step)
        if fmt == "q8_0":
            q[rows], d[rows] = _round_q8_0(blocks[rows])
        else:
            q[rows], d[rows], m[rows] = _round_q4_1(blocks[rows])
    return _pack(fmt, q, d, m if fmt == "q4_1" else None)


def _round_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [N, nb, 32] -> q uint8 [N, nb, 32] (int8 values), d float16 [N, nb]."""
    d = (blocks.abs().amax(-1) / 127).to(torch.float16)
    inv = torch.where(d == 0, 0.0, 1.0 / d.float())
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8)  # the rounded scale decides q
    return q.view(torch.uint8), d


def _round_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks [N, nb, 32] -> q uint8 [N, nb, 16] (two 4-bit values a byte), d and m float16 [N, nb]."""
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d, m = ((hi - lo) / 15).to(torch.float16), lo.to(torch.float16)
    inv = torch.where(d == 0, 0.0, 1.0 / d.float())
    q = torch.round((blocks - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return _nibbles(q), d, m


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """Float32 weights [N, K], computed as GGUF does (d * q + m in float32)."""
    if qw.fmt == "f32":
        return unpack_f32(qw.tensor("f"), qw.out_features, qw.in_features)
    if qw.fmt in BLOCK_FORMATS:
        return dequantize_blocks(qw)
    n, k = qw.out_features, qw.in_features
    nb = k // QK
    d = qw.tensor("d")[:, :nb].float()[..., None]  # [N, nb, 1]
    raw = qw.tensor("qs").reshape(n, nb, _Q_BYTES[qw.fmt])
    if qw.fmt == "q8_0":
        return (raw.view(torch.int8).float() * d).reshape(n, k)
    q = torch.cat([raw & 0x0F, raw >> 4], dim=-1).float()  # [N, nb, 32]
    return (d * q + qw.tensor("m")[:, :nb].float()[..., None]).reshape(n, k)


def concat(parts: list[QuantWeight]) -> QuantWeight:
    """Stack weights of one format along the output dimension (fused q/k/v, gate/up): exact."""
    fmt, k = parts[0].fmt, parts[0].in_features
    if any(p.fmt != fmt or p.in_features != k for p in parts):
        raise LeapError("concat: every part needs the same format and in_features")
    n = sum(p.out_features for p in parts)
    if fmt == "f32":  # groups of 4 rows may straddle the parts: regroup
        return QuantWeight(fmt, n, k, f=pack_f32(torch.cat([dequantize(p) for p in parts])))

    def cat(name):
        ts = [getattr(p, name) for p in parts]
        return None if ts[0] is None else torch.cat(ts)

    return QuantWeight(fmt, n, k, qs=cat("qs"), d=cat("d"), m=cat("m"))


def select_rows(qw: QuantWeight, rows: torch.Tensor) -> QuantWeight:
    """Output rows `rows` (int64 [n]) of a weight, in that order, values unchanged."""
    rows = rows.to(torch.long)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= qw.out_features):
        raise LeapError(f"select_rows: rows must lie in [0, {qw.out_features})")
    if qw.fmt == "f32":  # rows are interleaved in groups of 4: regroup
        return QuantWeight("f32", rows.numel(), qw.in_features, f=pack_f32(dequantize(qw)[rows]))
    pick = lambda t: None if t is None else t[rows].contiguous()
    return QuantWeight(qw.fmt, rows.numel(), qw.in_features, qs=pick(qw.qs), d=pick(qw.d), m=pick(qw.m))


# ---------------------------------------------------------------- GGUF blocks

_GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q5_0")


def from_gguf(raw: np.ndarray, type_name: str, rows: int, cols: int) -> QuantWeight:
    """A GGUF tensor's raw data (`ReaderTensor.data`) as a QuantWeight [rows, cols], values unchanged."""
    if type_name in ("F32", "F16"):
        w = torch.from_numpy(np.asarray(raw, dtype=np.float32).reshape(rows, cols))
        return QuantWeight("f32", rows, cols, f=pack_f32(w))
    if type_name.lower() in BLOCK_FORMATS:  # rows of blocks, as stored
        rows_of_blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1)
        if not rows_of_blocks.flags.writeable:  # a memory map's pages: torch needs its own copy
            rows_of_blocks = rows_of_blocks.copy()
        return QuantWeight(type_name.lower(), rows, cols, qs=torch.from_numpy(rows_of_blocks))
    if type_name not in _GGUF_BLOCK_BYTES:
        raise unsupported_type(f"this file has {type_name}")
    size = _GGUF_BLOCK_BYTES[type_name]
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(rows, cols // QK, size)
    return from_gguf_blocks(blocks, type_name)


def from_gguf_blocks(blocks: torch.Tensor, type_name: str) -> QuantWeight:
    """uint8 blocks [N, nb, bytes] of Q8_0, Q4_0 or Q4_1 -> QuantWeight."""
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [N, nb]
    if type_name == "Q8_0":
        return _pack("q8_0", blocks[..., 2:], d)
    if type_name == "Q4_1":
        return _pack("q4_1", blocks[..., 4:], d, blocks[..., 2:4].contiguous().view(torch.float16)[..., 0])
    # Q4_0: w = d * (q - 8) = d * q + (-8 d); -8 d is exact in fp16 and d * q - 8 d is exact in float32.
    m = d * -8
    if not torch.isfinite(m).all():
        raise LeapError("a Q4_0 scale is too large to repack (|8 d| exceeds the float16 range)")
    return _pack("q4_1", blocks[..., 2:], d, m)


def unsupported_type(what: str) -> LeapError:
    return LeapError(
        f"weight format 'gguf' runs {', '.join(GGUF_TYPES)} tensors as stored; {what} "
        "(use --quant int4 or int8 to requantize, or --quant none)"
    )


# ---------------------------------------------------------------- GGUF block formats as stored

_DEQUANT_ROWS_ELEMENTS = 1 << 22  # weights dequantized at a time


def dequantize_blocks(qw: QuantWeight) -> torch.Tensor:
    """Float32 [N, K] of a GGUF block format, each value computed in float32 exactly as GGUF does."""
    n, k = qw.out_features, qw.in_features
    weights, size = BLOCK_FORMATS[qw.fmt]
    blocks = qw.tensor("qs").reshape(n, k // weights, size)
    out = torch.empty(n, k)
    step = max(1, _DEQUANT_ROWS_ELEMENTS // k)
    for i in range(0, n, step):
        out[i : i + step] = _DEQUANTIZERS[qw.fmt](blocks[i : i + step]).reshape(-1, k)
    return out


def _f16(b: torch.Tensor) -> torch.Tensor:  # uint8 [..., 2] -> float32 [..., 1]
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:  # uint8 [..., c] -> [..., n, c]: bit i of each byte
    return (b[..., None, :] >> torch.arange(n, dtype=torch.uint8)[:, None]) & 1


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> sc, m float32 [..., 8]."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _nibble_pairs(qs: torch.Tensor) -> torch.Tensor:  # [..., 128] -> [..., 8, 32]: sub-blocks 2i, 2i + 1
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=-2).reshape(*qs.shape[:-3], 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # [N, G, 144] -> [N, G, 8, 32]
    sc, mn = _k_scales(b[..., 4:16])
    q = _nibble_pairs(b[..., 16:144]).float()
    return (_f16(b[..., 0:2]) * sc)[..., None] * q - (_f16(b[..., 2:4]) * mn)[..., None]


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # [N, G, 176] -> [N, G, 8, 32]
    sc, mn = _k_scales(b[..., 4:16])
    q = (_nibble_pairs(b[..., 48:176]) | (_bits(b[..., 16:48], 8) << 4)).float()
    return (_f16(b[..., 0:2]) * sc)[..., None] * q - (_f16(b[..., 2:4]) * mn)[..., None]


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # [N, G, 210] -> [N, G, 16, 16]
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64)
    lo = torch.cat([ql & 0x0F, ql >> 4], dim=-2).reshape(*lead, 256)  # element 128 h + 64 nibble + byte
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    hi = ((b[..., 128:192].reshape(*lead, 2, 1, 32) >> shifts) & 3).reshape(*lead, 256)
    q = ((lo | (hi << 4)).to(torch.int16) - 32).float().reshape(*lead, 16, 16)
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    return (_f16(b[..., 208:210]) * sc)[..., None] * q


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # [N, nb, 22] -> [N, nb, 32]
    qs = b[..., 6:22]
    high = _bits(b[..., 2:6], 8).transpose(-1, -2).reshape(*b.shape[:-1], 32)  # bit j of the 32 -> element j
    q = (torch.cat([qs & 0x0F, qs >> 4], dim=-1) | (high << 4)).to(torch.int16) - 16
    return _f16(b[..., 0:2]) * q.float()


_DEQUANTIZERS = {"q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k, "q5_0": _q5_0}
