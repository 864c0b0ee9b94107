"""Q4_1 and Q8_0 weights with int8 activations: every output has the bits of the one-row path whatever the
number of rows (1 to 70: the multi-row tiles, passes of 64 rows, a last partial tile of weight rows), and
the AVX-512 builds (VNNI, AMX) agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from leapdecode.kernels import build, native
from leapdecode.model import quant as Q
from leapdecode.model.linear import available_backends

ISAS = [isa for isa in build.ISAS if build.cpu_problem(isa) is None]  # every build this CPU runs
WIDE = [isa for isa in ISAS if isa != "avx2"]  # the builds with AVX-512's lanes (AVX2 sums other lanes)
pytestmark = pytest.mark.skipif(
    "native" not in available_backends(), reason="the native backend needs AVX2+FMA+F16C and a C++ compiler"
)
# K: runs of 4 blocks only (576 = 18 blocks: runs and a pair), a pair and an odd block, 1 block, 3 blocks
SHAPES = [(37, 576), (40, 1536), (19, 224), (33, 32), (17, 96)]


def run(qw: Q.QuantWeight, x: torch.Tensor, isa: str, threads: int | None = None) -> torch.Tensor:
    y = torch.empty(x.shape[0], qw.out_features)
    native.linear_into(
        y,
        x,
        qw.fmt,
        "int8",
        qw.out_features,
        qw.in_features,
        qs=qw.qs,
        d=qw.d,
        m=qw.m,
        threads=threads,
        isa=isa,
    )
    return y


def weights(fmt: str, n: int, k: int, real: bool) -> Q.QuantWeight:
    """`real`: quantized from a smooth random matrix like a model's; else every stored byte random."""
    gen = torch.Generator().manual_seed(n * k)
    if real:
        return Q.quantize(torch.randn(n, k, generator=gen) * 0.02, fmt)
    qw, nb = Q.quantize(torch.zeros(n, k), fmt), k // 32

    def scales(spread: float) -> torch.Tensor:  # fp16 [n, nbp], zero past the row's blocks as packed
        out = torch.zeros(qw.d.shape, dtype=torch.float16)
        out[:, :nb] = (torch.randn(n, nb, generator=gen) * spread).half()
        return out

    qs = torch.randint(0, 256, qw.qs.shape, dtype=torch.uint8, generator=gen)
    return Q.QuantWeight(fmt, n, k, qs=qs, d=scales(0.1).abs(), m=None if qw.m is None else scales(0.1))


def rows(k: int, m: int = 70) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * torch.logspace(-2, 2, m)[:, None]
    x[3, : min(k, 64)] = 0.0  # all-zero blocks: scale 0
    return x


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("real", [True, False], ids=["real", "random"])
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_every_row_count_gives_the_bits_of_one_row(fmt, real, isa):
    for n, k in SHAPES:
        qw, x = weights(fmt, n, k, real), rows(k)
        alone = torch.cat([run(qw, x[i : i + 1].clone(), isa) for i in range(x.shape[0])])
        for m in (*range(2, 20), 31, 32, 33, 64, 65, 70):
            assert torch.equal(run(qw, x[:m].clone(), isa), alone[:m]), (n, k, m)
        assert torch.equal(run(qw, x, isa, threads=1), alone)  # the thread split never matters


@pytest.mark.skipif(len(WIDE) < 2, reason="needs a CPU that runs both AVX-512 builds (VNNI and AMX)")
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_the_avx512_builds_give_the_same_bits(fmt):
    for n, k in SHAPES:
        for real in (True, False):
            qw, x = weights(fmt, n, k, real), rows(k, 13)
            for m in (1, 2, 8, 13):
                outs = [run(qw, x[:m].clone(), isa) for isa in WIDE]
                assert all(torch.equal(outs[0], o) for o in outs[1:]), (n, k, real, m)
