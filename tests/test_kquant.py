"""GGUF's K-quant blocks (Q4_K, Q5_K, Q6_K) and Q5_0 run as stored: values bit-equal to gguf-py's, kernels
close to a float64 reference and bitwise independent of the number of rows, on every instruction set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from leapdecode.errors import LeapError
from leapdecode.kernels import build, native
from leapdecode.model import quant as Q
from leapdecode.model.linear import LinearSpec, NativeLinear, available_backends

FORMATS = ("q4_k", "q5_k", "q6_k", "q5_0")
GGML = {fmt: GGMLQuantizationType[fmt.upper()] for fmt in FORMATS}
ISAS = [isa for isa in build.ISAS if build.cpu_problem(isa) is None]  # every build this CPU runs
MODELS = Path.home() / ".cache" / "leapdecode" / "models"
QWEN_15B = MODELS / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_05B = MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
needs_native = pytest.mark.skipif(
    "native" not in available_backends(), reason="the native backend needs AVX2+FMA+F16C and a C++ compiler"
)
# fp16 scales a file may hold: zero, subnormal, tiny, ordinary, large (as raw little-endian bytes)
SCALES = np.array([0.0, 6e-8, 3e-5, 1e-3, 0.0123, 0.5, 1.0, 7.75, 1000.0], dtype=np.float16)


def random_blocks(fmt: str, n: int, k: int, seed: int, small: bool = False) -> np.ndarray:
    """uint8 [n, row bytes]: every quantized byte random, fp16 scales drawn from SCALES (`small`: ordinary
    ones only, so sums stay in a range where a float64 comparison is meaningful)."""
    rng = np.random.default_rng(seed)
    weights, size = Q.BLOCK_FORMATS[fmt]
    raw = rng.integers(0, 256, (n, k // weights, size), dtype=np.uint8)
    pool = SCALES[3:7] if small else SCALES
    offsets = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q5_0": (0,)}[fmt]
    for o in offsets:
        raw[..., o : o + 2] = rng.choice(pool, raw.shape[:2]).view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(n, -1)


def weight(fmt: str, n: int, k: int, seed: int = 0, small: bool = True) -> Q.QuantWeight:
    raw = random_blocks(fmt, n, k, seed, small)
    return Q.QuantWeight(fmt, n, k, qs=torch.from_numpy(raw))


def run(qw: Q.QuantWeight, x: torch.Tensor, act: str, isa: str | None = None, threads: int | None = None):
    y = torch.empty(x.shape[0], qw.out_features)
    native.linear_into(y, x, qw.fmt, act, qw.out_features, qw.in_features, qs=qw.qs, threads=threads, isa=isa)
    return y


def shapes(fmt: str) -> list[tuple[int, int]]:
    common = [(1, 256), (7, 512), (37, 1536), (130, 256), (5, 2304)]  # 2304: 9 groups of 256
    return common + ([(5, 32), (9, 96), (3, 896)] if fmt == "q5_0" else [])  # Q5_0: partial groups of 8


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_blocks_dequantize_bit_for_bit_like_gguf(fmt):
    for n, k in shapes(fmt):
        raw = random_blocks(fmt, n, k, seed=n + k)
        want = gguf_dequantize(raw, GGML[fmt]).reshape(n, k)
        got = Q.dequantize(Q.from_gguf(raw, fmt.upper(), n, k)).numpy()
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def _real_tensors(path: Path) -> list:
    from gguf import GGUFReader

    if not path.is_file():
        pytest.skip(f"{path.name} is not downloaded (benchmarks/models.py fetch qwen-pair)")
    picked: dict[str, object] = {}  # the first tensor of each type
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name.lower() in FORMATS:
            picked.setdefault(t.tensor_type.name, t)
    return list(picked.values())


@pytest.mark.parametrize("path", [QWEN_15B, QWEN_05B], ids=["1.5b", "0.5b"])
def test_real_tensors_dequantize_bit_for_bit_like_gguf(path):
    from leapdecode.model.gguf import GGUFSource, hf_name

    source = GGUFSource(path)
    seen = set()
    for t in _real_tensors(path):
        rows = np.asarray(t.data[:300])  # the first rows (an output layer is large)
        n, k = rows.shape[0], int(t.shape[0])
        want = gguf_dequantize(rows, t.tensor_type).reshape(n, k)
        got = Q.dequantize(Q.from_gguf(rows, t.tensor_type.name, n, k)).numpy()
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=t.name)
        seen.add(t.tensor_type.name)
        stored = source.stored(hf_name(t.name))
        assert stored is not None and stored.fmt == t.tensor_type.name.lower()
        assert torch.equal(stored.qs[:n], torch.from_numpy(rows))  # the file's bytes, as stored
    assert seen == ({"Q4_K", "Q6_K"} if path == QWEN_15B else {"Q4_K", "Q5_0", "Q6_K"})


def test_formats_check_their_shapes():
    with pytest.raises(LeapError, match="divisible by 256"):
        Q.QuantWeight("q4_k", 2, 288, qs=torch.zeros(2, 162, dtype=torch.uint8))
    with pytest.raises(LeapError, match="divisible by 32"):
        Q.QuantWeight("q5_0", 2, 40, qs=torch.zeros(2, 22, dtype=torch.uint8))
    with pytest.raises(LeapError, match=r"qs uint8 \[2, 144\]"):
        Q.QuantWeight("q4_k", 2, 256, qs=torch.zeros(2, 143, dtype=torch.uint8))
    with pytest.raises(LeapError, match="as stored"):
        Q.quantize(torch.zeros(2, 256), "q6_k")


def test_rows_of_blocks_concat_and_select_exactly():
    a, b = weight("q6_k", 5, 512, seed=1), weight("q6_k", 3, 512, seed=2)
    both = Q.concat([a, b])
    assert torch.equal(Q.dequantize(both), torch.cat([Q.dequantize(a), Q.dequantize(b)]))
    rows = torch.tensor([6, 0, 3])
    assert torch.equal(Q.dequantize(Q.select_rows(both, rows)), Q.dequantize(both)[rows])
    assert both.nbytes == 8 * 2 * 210


# ---------------------------------------------------------------- kernels


def reference(qw: Q.QuantWeight, x: torch.Tensor, act: str, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 product of the kernel's inputs as it sees them, a bound on float32 rounding)."""
    if act == "int8":
        q, d, _ = native.quantize_activations(x, isa)
        nb = x.shape[1] // 32
        x = (q.double().reshape(x.shape[0], nb, 32) * d[:, :nb, None].double()).reshape(x.shape)
    w = Q.dequantize(qw).double()
    return x.double() @ w.T, (x.double().abs() @ w.abs().T) * x.shape[1] * 2.0**-23 + 1e-30


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", ["int8", "float32"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_float64_reference(fmt, act, isa):
    for n, k in shapes(fmt):
        qw = weight(fmt, n, k, seed=n * k)
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(k))
        exact, bound = reference(qw, x, act, isa)
        err = (run(qw, x, act, isa).double() - exact).abs()
        assert torch.all(err <= bound), (n, k, float((err / bound).max()))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_float_activations_see_exactly_gguf_values(fmt, isa):
    """Rows of the identity pick single weights: the float32 tiles dequantize exactly as gguf-py."""
    for n, k in [(7, 512), (3, 96)] if fmt == "q5_0" else [(7, 512)]:
        raw = random_blocks(fmt, n, k, seed=3)
        qw = Q.QuantWeight(fmt, n, k, qs=torch.from_numpy(raw))
        want = torch.from_numpy(gguf_dequantize(raw, GGML[fmt]).reshape(n, k))
        assert torch.equal(run(qw, torch.eye(k), "float32", isa).T, want)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", ["int8", "float32"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_row_count_gives_the_bits_of_one_row(fmt, act, isa):
    gen = torch.Generator().manual_seed(5)
    for n, k in [(37, 1536), (11, 896)] if fmt == "q5_0" else [(37, 1536), (9, 2304)]:
        qw = weight(fmt, n, k, seed=k)
        x = torch.randn(17, k, generator=gen) * torch.logspace(-2, 2, 17)[:, None]
        alone = torch.cat([run(qw, x[i : i + 1].clone(), act, isa) for i in range(17)])
        for m in range(1, 18):
            assert torch.equal(run(qw, x[:m].clone(), act, isa), alone[:m]), m
        assert torch.equal(run(qw, x, act, isa, threads=1), alone)  # the thread split never matters


@pytest.mark.skipif(len(ISAS) < 2, reason="needs a CPU that runs at least two builds (AVX2, AVX-512, AMX)")
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_build_gives_the_same_bits(fmt):
    """Every build forms the same exact integer sums per sub-block (VNNI lanes, AVX2 pairs or AMX tiles)
    and applies the scales in one order."""
    for k in (896,) if fmt == "q5_0" else (1536, 2304):
        qw = weight(fmt, 37, k, seed=9)
        x = (
            torch.randn(13, k, generator=torch.Generator().manual_seed(9))
            * torch.logspace(-2, 2, 13)[:, None]
        )
        for act in ("int8", "float32"):
            for m in (1, 2, 8, 13):
                outs = [run(qw, x[:m].clone(), act, isa) for isa in ISAS]
                assert all(torch.equal(outs[0], o) for o in outs[1:]), (k, act, m)


@needs_native
@pytest.mark.skipif(
    "amx" not in ISAS, reason="needs a CPU with AMX int8 tiles that the OS lets this process use"
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_amx_tiles_past_one_pass_of_64_rows_give_the_bits_of_one_row(fmt):
    """Chunks of 16 rows, passes of 64 and a last partial tile of weight rows (fewer than 16)."""
    k = 896 if fmt == "q5_0" else 512
    qw = weight(fmt, 40, k, seed=3)
    x = torch.randn(70, k, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, 70)[:, None]
    alone = torch.cat([run(qw, x[i : i + 1].clone(), "int8", "amx") for i in range(70)])
    for m in (16, 17, 64, 65, 70):
        assert torch.equal(run(qw, x[:m].clone(), "int8", "amx"), alone[:m]), m


@needs_native
@pytest.mark.skipif(
    "amx" not in ISAS, reason="needs a CPU with AMX int8 tiles that the OS lets this process use"
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_amx_tiles_with_any_scales_and_short_rows_give_the_bits_of_one_row(fmt):
    """The scales of 16 weight rows decoded at once (zero, subnormal and large fp16 scales among them),
    few and odd row counts, and for Q5_0 rows of 1, 3, 5 and 9 blocks (partial groups, odd last blocks)."""
    for k in (32, 96, 160, 288) if fmt == "q5_0" else (256, 768):
        qw = weight(fmt, 48, k, seed=k, small=False)
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(11, k, generator=gen) * torch.logspace(-2, 2, 11)[:, None]
        alone = torch.cat([run(qw, x[i : i + 1].clone(), "int8", "amx") for i in range(11)])
        for m in (2, 3, 4, 5, 7, 9, 11):
            assert torch.equal(run(qw, x[:m].clone(), "int8", "amx"), alone[:m]), (k, m)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_activations_round_to_nearest_with_one_scale_per_block(isa):
    """int8 activations: scale absmax / 127 per 32 values, values rounded to nearest (ties to even),
    zero scales past the row's blocks."""
    x = torch.randn(5, 800, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 5)[:, None]
    x[2, :64] = 0.0  # all-zero blocks: scale 0, values 0
    q, d, _ = native.quantize_activations(x, isa)
    blocks = x.reshape(5, -1, 32)
    scale = blocks.abs().amax(-1) / 127.0
    assert torch.equal(d[:, : scale.shape[1]], scale) and not d[:, scale.shape[1] :].any()
    inv = torch.where(scale == 0, 0.0, 1.0 / scale)
    assert torch.equal(q, torch.round(blocks * inv[..., None]).to(torch.int8).reshape(5, -1))


@needs_native
def test_mixed_formats_in_one_fused_layer_with_odd_outputs():
    """q/k/v stored in different formats write side by side (odd widths), bias added once."""
    k = 512
    parts = [
        weight("q4_k", 13, k, 1),
        weight("q6_k", 5, k, 2),
        weight("q5_0", 3, k, 3),
        Q.quantize(torch.randn(7, k), "q8_0"),
    ]
    bias = torch.randn(28)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(0))
    for act in ("int8", "float32"):
        y = NativeLinear(parts, bias, act)(x[None])[0]
        col = 0
        for p in parts:
            part = torch.empty(6, p.out_features)
            native.linear_into(part, x, p.fmt, act, p.out_features, k, qs=p.qs, d=p.d, m=p.m)
            assert torch.equal(y[:, col : col + p.out_features], part + bias[col : col + p.out_features])
            col += p.out_features


@needs_native
def test_in_features_off_the_super_block_is_a_kernel_error():
    qs = torch.zeros(2, 2 * 144, dtype=torch.uint8)
    with pytest.raises(LeapError, match="multiple of 256"):
        native.linear_into(torch.empty(1, 2), torch.randn(1, 288), "q4_k", "int8", 2, 288, qs=qs)


# ---------------------------------------------------------------- a real model


@pytest.mark.slow
@needs_native
def test_qwen_1_5b_runs_as_stored_and_drafting_is_lossless():
    if not QWEN_15B.is_file():
        pytest.skip(f"{QWEN_15B.name} is not downloaded (benchmarks/models.py fetch qwen-pair)")
    from leapdecode.engine import Engine, GenerationConfig

    eng = Engine.load(str(QWEN_15B))
    assert eng.model.spec == LinearSpec("native", "gguf", "int8")
    prompt = "Write a Python function that checks whether a string is a palindrome, with a docstring."
    plain = eng.generate(prompt, GenerationConfig(max_new_tokens=48, drafter="none"))
    pld = eng.generate(prompt, GenerationConfig(max_new_tokens=48, drafter="pld"))
    assert len(plain.token_ids) > 8 and pld.token_ids == plain.token_ids
    assert "def" in eng.tokenizer.decode(plain.token_ids)
