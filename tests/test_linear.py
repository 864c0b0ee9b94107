"""Native kernels: agreement with a float64 reference, bitwise row invariance, and lossless decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_state, tiny_config, tiny_engine_for, tiny_runner

from leapdecode.costmodel import measure as measure_cost
from leapdecode.engine import GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.kernels import build, native
from leapdecode.model import quant as Q
from leapdecode.model.linear import LinearSpec, NativeLinear, available_backends
from leapdecode.model.runner import Plan

pytestmark = pytest.mark.skipif(
    "native" not in available_backends(), reason="the native backend needs AVX2+FMA+F16C and a C++ compiler"
)

# (out, in) of the bundled model's linears: fused q/k/v, o, fused gate/up, down; and odd shapes.
MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
ODD_SHAPES = [(1, 32), (5, 64), (37, 96), (130, 160)]
COMBOS = [("f32", "float32"), ("q8_0", "float32"), ("q8_0", "int8"), ("q4_1", "float32"), ("q4_1", "int8")]
ISAS = [isa for isa in build.ISAS if build.cpu_problem(isa) is None]  # every build this CPU runs


def run(qw: Q.QuantWeight, x: torch.Tensor, act: str, threads: int | None = None, isa: str | None = None):
    y = torch.empty(x.shape[0], qw.out_features)
    native.linear_into(
        y,
        x,
        qw.fmt,
        act,
        qw.out_features,
        qw.in_features,
        qs=qw.qs,
        d=qw.d,
        m=qw.m,
        f=qw.f,
        threads=threads,
        isa=isa,
    )
    return y


def reference(qw: Q.QuantWeight, x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 result of the kernel's inputs as the kernel sees them, a bound on float32 rounding)."""
    if act == "int8":
        q, d, _ = native.quantize_activations(x)  # the same quantization in every build
        nb = x.shape[1] // 32
        x = (q.double().reshape(x.shape[0], nb, 32) * d[:, :nb, None].double()).reshape(x.shape)
    w = Q.dequantize(qw).double()
    exact = x.double() @ w.T
    bound = (x.double().abs() @ w.abs().T) * x.shape[1] * 2.0**-23 + 1e-30
    return exact, bound


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,act", COMBOS)
@pytest.mark.parametrize("shape", MODEL_SHAPES + ODD_SHAPES)
def test_kernel_matches_float64_reference(fmt, act, shape, isa):
    n, k = shape
    if fmt == "f32" and k == 160:
        k = 157  # float32 weights take any in_features (a masked tail)
    gen = torch.Generator().manual_seed(n * 1000 + k)
    qw = Q.quantize(torch.randn(n, k, generator=gen) * 0.05, fmt)
    x = torch.randn(9, k, generator=gen)
    exact, bound = reference(qw, x, act)
    err = (run(qw, x, act, isa=isa).double() - exact).abs()
    assert torch.all(err <= bound), f"max error / bound {float((err / bound).max()):.3g}"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_int8_activations_stay_close_to_float_activations(fmt):
    gen = torch.Generator().manual_seed(7)
    qw = Q.quantize(torch.randn(576, 576, generator=gen) * 0.05, fmt)
    x = torch.randn(4, 576, generator=gen)
    y8, yf = run(qw, x, "int8"), run(qw, x, "float32")
    assert float((y8 - yf).norm() / yf.norm()) < 0.01  # int8 activations: under 1 % relative error


def test_lm_head_shape():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(49152, 576, generator=gen) * 0.05
    x = torch.randn(3, 576, generator=gen)
    for fmt, act in (("q8_0", "int8"), ("f32", "float32")):
        qw = Q.quantize(w, fmt)
        exact, bound = reference(qw, x, act)
        y = run(qw, x, act)
        assert torch.all((y.double() - exact).abs() <= bound)
        assert torch.equal(y[1], run(qw, x[1:2], act)[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,act", COMBOS)
def test_every_row_is_bitwise_independent_of_the_others(fmt, act, isa):
    gen = torch.Generator().manual_seed(11)
    for n, k in [(960, 576), (576, 1536), (37, 96)]:  # 96: an odd number of blocks
        qw = Q.quantize(torch.randn(n, k, generator=gen) * 0.05, fmt)
        for trial in range(3):
            m = int(torch.randint(1, 65, (1,), generator=gen))
            x = torch.randn(m, k, generator=gen) * (1 + 10 * trial)
            y = run(qw, x, act, isa=isa)
            rows = torch.randint(0, m, (4,), generator=gen).tolist() + [0, m - 1]
            for i in rows:
                assert torch.equal(y[i], run(qw, x[i : i + 1].clone(), act, isa=isa)[0]), (n, k, m, i)
            assert torch.equal(y, run(qw, x, act, threads=1, isa=isa))  # the thread split never matters


def test_output_column_slices_are_written_in_place():
    gen = torch.Generator().manual_seed(5)
    a = Q.quantize(torch.randn(40, 64, generator=gen), "q4_1")
    b = Q.quantize(torch.randn(24, 64, generator=gen), "f32")
    x = torch.randn(3, 64, generator=gen)
    lin = NativeLinear([a, b], bias=torch.arange(64.0), activations="int8")  # mixed formats: two parts
    y = lin(x[None])[0]
    assert torch.equal(y[:, :40], run(a, x, "int8") + torch.arange(40.0))
    assert torch.equal(y[:, 40:], run(b, x, "float32") + torch.arange(40.0, 64.0))


def test_bad_calls_raise_leap_errors():
    qw = Q.quantize(torch.randn(8, 64), "q4_1")
    lin = NativeLinear([qw], None, "int8")
    with pytest.raises(LeapError, match="float32"):
        lin(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(LeapError, match="float32 activations"):
        run(Q.quantize(torch.randn(8, 64), "f32"), torch.randn(2, 64), "int8")


# ---------------------------------------------------------------- attention


def _qkv(s: int, t: int, gen, b=1, h=6, hkv=2, d=32):
    return (
        torch.randn(b, h, s, d, generator=gen),
        torch.randn(b, hkv, t, d, generator=gen),
        torch.randn(b, hkv, t, d, generator=gen),
    )


@pytest.mark.parametrize("t", [21, 300])  # 300: rows of several key blocks, merged
def test_attention_matches_torch(t):
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(5, t, gen, b=2)
    mask = torch.rand(5, t, generator=gen) < 0.7
    mask[:, 0] = True
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    assert torch.allclose(native.attention(q, k, v, mask, enable_gqa=True).double(), ref, atol=1e-5)
    causal = torch.ones(5, t, dtype=torch.bool).tril(t - 5)
    assert torch.equal(native.attention(q, k, v, None, True), native.attention(q, k, v, causal, True))


@pytest.mark.parametrize("t", [40, 600])  # 600: up to 4 key blocks per row
def test_attention_rows_see_only_their_compacted_keys(t):
    """A row's output equals the same query attending alone to its allowed keys packed together: the
    arithmetic of a tree node is that of the token decoded on its own."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(7, t, gen)
    mask = torch.rand(7, t, generator=gen) < 0.5
    mask[:, 3] = True
    y = native.attention(q, k, v, mask, True)
    for i in range(7):
        keep = mask[i].nonzero()[:, 0]
        alone = native.attention(q[:, :, i : i + 1], k[:, :, keep], v[:, :, keep], None, True)
        assert torch.equal(y[:, :, i], alone[:, :, 0])


@pytest.mark.skipif(len(ISAS) < 2, reason="needs a CPU that runs both the AVX2 and the AVX-512 build")
@pytest.mark.parametrize("d", [16, 24, 64, 128])
@pytest.mark.parametrize("heads", [(6, 2), (8, 2), (12, 2), (7, 1), (8, 1), (4, 4)])
def test_attention_avx512_equals_avx2_bitwise(d, heads):
    """The 512-bit build scores the query heads of a key/value head in pairs (one register holds a key's
    sums for two heads) and weighs the values 16 columns at a time for several heads at once; each score
    and output element keeps the operations of the 256-bit build's one head at a time, so both give the
    same bits. Group sizes 1, 3, 4, 6, 7 and 8 cover odd heads paired with themselves and groups of more
    than 6."""
    h, hkv = heads
    gen = torch.Generator().manual_seed(d * 100 + h)
    for s, t in [(9, 70), (1, 70), (3, 300)]:  # 300: several key blocks per row
        q, k, v = _qkv(s, t, gen, h=h, hkv=hkv, d=d)
        mask = torch.rand(s, t, generator=gen) < 0.6
        mask[:, 0] = True
        for m in (mask, None):
            assert torch.equal(
                native.attention(q, k, v, m, True, isa="avx2"),
                native.attention(q, k, v, m, True, isa="avx512"),
            ), (s, t, m is None)


@pytest.mark.parametrize("d", [32, 64, 128])
def test_a_key_scores_the_same_bits_in_a_group_of_8_and_in_the_tail(d):
    """Keys are scored 8 at a time and the rest one by one, with the sums of each reduced in one order: a
    key and its copy, one in a group and one in the tail, get the same weight, so values that pick them
    apart (basis rows) come out exactly equal."""
    gen = torch.Generator().manual_seed(d)
    for trial in range(20):
        q = torch.randn(1, 1, 1, d, generator=gen) * 3
        k = torch.randn(1, 1, 11, d, generator=gen) * 3
        k[0, 0, 8 + trial % 3] = k[0, 0, trial % 8]  # keys 0-7 form the group, 8-10 the tail
        v = torch.zeros(1, 1, 11, d)
        v[0, 0, trial % 8, 0] = 1.0
        v[0, 0, 8 + trial % 3, 1] = 1.0
        y = native.attention(q, k, v, None, False)[0, 0, 0]
        assert y[0] == y[1] and y[0] > 0


def test_attention_bad_mask_is_a_clear_error():
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(2, 5, gen)
    with pytest.raises(LeapError, match="mask"):
        native.attention(q, k, v, torch.ones(2, 5), True)


# ---------------------------------------------------------------- whole models


def _runner(spec: LinearSpec | None, seed=0, **cfg):
    """A random model's runner: torch float32 (spec None) or as `spec` says."""
    return tiny_runner(tiny_config(**cfg), seed, torch.float32, spec)


def _logits(runner, ids: torch.Tensor) -> torch.Tensor:
    return runner.forward(ids, torch.arange(len(ids)), runner.new_cache(len(ids))).logits


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_native_runner_is_close_to_torch(quant):
    shape = {"dim": 64, "inter": 128, "heads": 4, "kv_heads": 2, "vocab": 96}
    ref, native = _runner(None, **shape), _runner(LinearSpec("native", quant, "float32"), **shape)
    assert native.spec == LinearSpec("native", quant, "float32") and native.backend == "native"
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(0))
    tol = {"none": 1e-4, "int8": 0.05, "int4": 0.5}[quant]
    assert float((_logits(ref, ids) - _logits(native, ids)).abs().max()) < tol


@pytest.mark.parametrize(
    "quant,act", [("none", "float32"), ("int8", "int8"), ("int4", "int8"), ("int4", "float32")]
)
def test_forward_of_k_tokens_equals_k_single_steps_bitwise(quant, act):
    model = _runner(LinearSpec("native", quant, act), dim=64, inter=128, vocab=96, qkv_bias=True)
    ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(16)
    model.forward(ids[:9], torch.arange(9), cache)
    together = model.forward(ids[9:], torch.arange(9, 16), cache).logits  # [7, V]
    cache.truncate(9)
    alone = torch.cat(
        [model.forward(ids[i : i + 1], torch.arange(i, i + 1), cache).logits for i in range(9, 16)]
    )
    assert torch.equal(together, alone)


@pytest.mark.parametrize("quant,act", [("none", "float32"), ("int4", "int8"), ("int8", "float32")])
def test_greedy_tokens_equal_with_and_without_drafting(quant, act):
    eng = tiny_engine_for(
        tiny_config(vocab=32, dim=64, inter=128), 3, torch.float32, LinearSpec("native", quant, act)
    )
    prompt = list(range(8)) * 3
    plain = eng.generate(prompt, GenerationConfig(max_new_tokens=80, drafter="none"))
    pld = eng.generate(prompt, GenerationConfig(max_new_tokens=80, drafter="pld"))
    assert pld.stats.drafted > 0  # the comparison exercised verification of drafts
    assert pld.token_ids == plain.token_ids


def test_bundled_model_gguf_blocks_lossless_drafting():
    from leapdecode.engine import Engine

    eng = Engine.load()  # the defaults: the file's own blocks on the kernels
    assert eng.model.spec == LinearSpec("native", "gguf", "int8") and eng.model.lm_head.backend == "native"
    for prompt in [
        "Repeat this list exactly: apples, pears, plums, apples, pears, plums.",
        "Write a Python function that returns the sum of a list.",
    ]:
        plain = eng.generate(prompt, GenerationConfig(max_new_tokens=40, drafter="none"))
        pld = eng.generate(prompt, GenerationConfig(max_new_tokens=40, drafter="pld"))
        assert pld.token_ids == plain.token_ids


def test_spec_resolution_and_errors():
    f32 = torch.float32
    assert LinearSpec().resolve(f32, "cpu", None) == LinearSpec("native", "none", "float32")
    assert LinearSpec().resolve(f32, "cpu", True) == LinearSpec("native", "gguf", "int8")
    # a quantized file whose blocks the kernels cannot all run: 8 bits, never float32 by default
    assert LinearSpec().resolve(f32, "cpu", False) == LinearSpec("native", "int8", "int8")
    assert LinearSpec("torch").resolve(f32, "cpu", False) == LinearSpec("torch", "none", "float32")
    assert LinearSpec("torch", "int4").resolve(f32, "cpu", None) == LinearSpec("torch", "int4", "float32")
    assert LinearSpec("native", "int8").resolve(f32, "cpu", None).activations == "int8"
    with pytest.raises(LeapError, match="backend"):
        LinearSpec("cuda-magic")
    with pytest.raises(LeapError, match="quant"):
        LinearSpec("native", "int3")
    with pytest.raises(LeapError, match="GGUF"):
        LinearSpec("native", "gguf").resolve(f32, "cpu", None)
    with pytest.raises(LeapError, match="int8 activations need quantized"):
        LinearSpec("native", "none", "int8").resolve(f32, "cpu", None)
    with pytest.raises(LeapError, match="float activations"):
        LinearSpec("torch", "int4", "int8").resolve(f32, "cpu", None)
    assert LinearSpec("auto").resolve(torch.float64, "cpu", None).backend == "torch"
    with pytest.raises(LeapError, match="float32"):
        LinearSpec("native", "none").resolve(torch.float64, "cpu", None)


def test_torch_backend_simulates_the_quantized_weights():
    cfg = tiny_config(dim=64, inter=128)
    state = random_state(cfg)
    runner = _runner(LinearSpec("torch", "int4", "float32"), dim=64, inter=128)
    w = state["model.layers.0.mlp.down_proj.weight"].float()
    assert torch.equal(runner.model.blocks[0].mlp.w2.weight, Q.dequantize(Q.quantize(w, "q4_1")))
    embed = state["model.embed_tokens.weight"].float()  # not tied here: the output layer is its own
    assert torch.equal(runner.model.embed, embed)


def test_torch_backend_rounds_tied_embeddings_only_as_the_output_layer():
    cfg = tiny_config(dim=64, inter=128, tie=True)
    embed = random_state(cfg)["model.embed_tokens.weight"].float()
    runner = _runner(LinearSpec("torch", "int4", "float32"), dim=64, inter=128, tie=True)
    assert torch.equal(runner.model.embed, embed)
    assert torch.equal(runner.model.lm_head.weight, Q.dequantize(Q.quantize(embed, "q8_0")))


def test_measure_verify_cost_on_native():
    runner = _runner(LinearSpec("native", "int8"))
    curve = measure_cost(runner, (1, 2, 4), context=16, repeats=1)
    assert curve.ks == (1, 2, 4) and all(c > 0 for c in curve.seconds)


def test_runner_output_rows_give_those_logits():
    runner = _runner(LinearSpec("native", "int4"), dim=64, inter=128, vocab=96)
    ids = torch.randint(0, 96, (6,), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([3, 17, 40, 95])
    part = runner.forward(ids, torch.arange(6), runner.new_cache(6), plan=Plan(head=runner.output_rows(rows)))
    assert torch.equal(part.logits, _logits(runner, ids)[:, rows])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 13), (9, 37), (6, 100), (45, 1100)])
def test_f32_ragged_shapes_are_exact_and_row_independent(n, k, isa):
    """Rows not in whole groups of 4 and columns not in whole runs of 8 (the interleave's padding)."""
    gen = torch.Generator().manual_seed(n * 1000 + k)
    qw = Q.quantize(torch.randn(n, k, generator=gen), "f32")
    x = torch.randn(11, k, generator=gen)
    y = run(qw, x, "float32", isa=isa)
    exact, bound = reference(qw, x, "float32")
    assert ((y.double() - exact).abs() <= bound).all()
    for i in range(11):
        assert torch.equal(y[i], run(qw, x[i : i + 1].clone(), "float32", isa=isa)[0])


@pytest.mark.skipif(len(ISAS) < 2, reason="needs a CPU that runs both the AVX2 and the AVX-512 build")
@pytest.mark.parametrize("n,k", [(960, 576), (37, 100), (6, 13), (45, 1100)])
def test_f32_avx512_tiles_equal_the_avx2_tiles_bitwise(n, k):
    """The 512-bit tiles (two rows per register, several rows at once; for more than 8 rows of x, 8 rows
    of weights over blocks of 512 columns) sum each lane in the 256-bit tiles' order, so both builds give
    the same bits for every tile shape and row count. k = 1100: three column blocks and a ragged tail;
    m = 70: more rows than one pass holds."""
    gen = torch.Generator().manual_seed(n + k)
    qw = Q.quantize(torch.randn(n, k, generator=gen), "f32")
    for m in (1, 2, 3, 7, 8, 9, 13, 17, 70):
        x = torch.randn(m, k, generator=gen) * 3
        assert torch.equal(run(qw, x, "float32", isa="avx2"), run(qw, x, "float32", isa="avx512")), (n, k, m)
