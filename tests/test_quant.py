"""Weight formats: GGUF blocks repacked without changing a value, and our own round-to-nearest quantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from leapdecode.errors import LeapError
from leapdecode.model import quant as Q


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    w[1, :32] = 3.0  # a constant block
    w[2, 32:64] *= 400.0  # a block with large values
    if cols >= 96:
        w[3, 64:96] = -np.abs(w[3, 64:96])  # an all-negative block (negative max for Q4_0)
    return w


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", [(7, 96), (16, 576)])
def test_gguf_blocks_dequantize_exactly_like_gguf(qtype, shape):
    rows, cols = shape
    raw = gguf_quantize(_weights(rows, cols, seed=cols), GGMLQuantizationType[qtype])  # [rows, bytes]
    want = gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(rows, cols)
    qw = Q.from_gguf(raw, qtype, rows, cols)
    got = Q.dequantize(qw).numpy()
    assert qw.fmt == ("q8_0" if qtype == "Q8_0" else "q4_1")
    np.testing.assert_array_equal(got, want)
    nonzero = want != 0  # bit for bit, except that Q4_0 as d * q + (-8 d) turns gguf's -0.0 into +0.0
    np.testing.assert_array_equal(got.view(np.uint32)[nonzero], want.view(np.uint32)[nonzero])


def test_q4_0_becomes_q4_1_with_min_minus_8d():
    d = np.float16(0.25)
    qs = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)
    raw = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), qs])[None]  # one Q4_0 block
    qw = Q.from_gguf(raw, "Q4_0", 1, 32)
    assert float(qw.m[0, 0]) == -2.0 and float(qw.d[0, 0]) == 0.25
    expect = 0.25 * (np.concatenate([np.arange(16), np.arange(15, -1, -1)]) - 8)
    np.testing.assert_array_equal(Q.dequantize(qw).numpy()[0], expect.astype(np.float32))


def test_float_gguf_tensors_become_f32():
    w = _weights(5, 40, seed=1)
    f16 = Q.from_gguf(w.astype(np.float16), "F16", 5, 40)
    assert torch.equal(Q.dequantize(f16), torch.from_numpy(w.astype(np.float16).astype(np.float32)))
    assert Q.from_gguf(w, "F32", 5, 40).fmt == "f32"


def test_unsupported_gguf_type_is_a_clear_error():
    with pytest.raises(LeapError, match="Q5_1"):
        Q.from_gguf(np.zeros((1, 24), np.uint8), "Q5_1", 1, 32)


def test_scales_are_padded_to_a_multiple_of_8_with_zeros():
    qw = Q.quantize(torch.randn(3, 96), "q4_1")  # 3 blocks -> 8
    assert qw.d.shape == (3, 8) and qw.m.shape == (3, 8)
    assert not qw.d[:, 3:].any() and not qw.m[:, 3:].any()


def test_int8_round_to_nearest_error_is_within_half_a_step():
    w = torch.from_numpy(_weights(64, 256, seed=3))
    qw = Q.quantize(w, "q8_0")
    err = (Q.dequantize(qw) - w).reshape(64, 8, 32).abs().amax(-1)
    step = qw.d[:, :8].float()
    assert torch.all(err <= step * 0.5 * (1 + 1e-3) + 1e-12)


def test_int4_round_to_nearest_error_is_within_half_a_step():
    w = torch.from_numpy(_weights(64, 256, seed=4))
    qw = Q.quantize(w, "q4_1")
    err = (Q.dequantize(qw) - w).reshape(64, 8, 32).abs().amax(-1)
    step, lo = qw.d[:, :8].float(), w.reshape(64, 8, 32).amin(-1)
    slack = (qw.m[:, :8].float() - lo).abs()  # the min itself is rounded to fp16
    assert torch.all(err <= step * 0.5 * (1 + 1e-3) + slack + 1e-12)


def test_int4_represents_a_grid_block_exactly():
    w = (torch.arange(32) % 16 * 0.5 - 1.0).reshape(1, 32)  # 16 levels, step 0.5, min -1
    qw = Q.quantize(w, "q4_1")
    assert float(qw.d[0, 0]) == 0.5 and float(qw.m[0, 0]) == -1.0
    assert torch.equal(Q.dequantize(qw), w)


def test_int8_of_a_symmetric_grid_is_exact():
    w = (torch.arange(32) - 16).float().reshape(1, 32) * 0.125 * 127 / 16
    qw = Q.quantize(w, "q8_0")
    assert torch.allclose(Q.dequantize(qw), w, rtol=0, atol=float(qw.d[0, 0]) / 2)
    assert int(qw.qs.view(torch.int8).abs().max()) == 127


def test_concat_is_row_stacking():
    a, b = Q.quantize(torch.randn(3, 64), "q4_1"), Q.quantize(torch.randn(5, 64), "q4_1")
    ab = Q.concat([a, b])
    assert ab.out_features == 8
    assert torch.equal(Q.dequantize(ab), torch.cat([Q.dequantize(a), Q.dequantize(b)]))
    with pytest.raises(LeapError):
        Q.concat([a, Q.quantize(torch.randn(2, 64), "q8_0")])


def test_block_formats_need_in_features_divisible_by_32():
    with pytest.raises(LeapError, match="divisible by 32"):
        Q.quantize(torch.randn(4, 40), "q8_0")
    assert Q.dequantize(Q.quantize(torch.randn(4, 40), "f32")).shape == (4, 40)


@pytest.mark.parametrize("n,k", [(1, 1), (4, 8), (5, 40), (9, 13), (960, 576)])
def test_f32_interleave_moves_values_only(n, k):
    w = torch.randn(n, k)
    p = Q.pack_f32(w)
    assert p.shape == (-(-n // 4), -(-k // 8), 4, 8)
    assert torch.equal(Q.unpack_f32(p, n, k), w)
    assert int((p != 0).sum()) == int((w != 0).sum())  # the padding is zeros
    # group 0, column run 0 holds rows 0..3 of columns 0..7 in turn
    assert torch.equal(p[0, 0, 0, : min(k, 8)], w[0, :8])
    if n > 1 and k > 8:
        assert torch.equal(p[0, 1, 1, : min(k, 16) - 8], w[1, 8:16])


def test_bundled_gguf_blocks_equal_the_loaded_weights(bundled_engine):
    """Raw blocks (q/k rows un-permuted, q/k/v and gate/up fused) dequantize to exactly the weights the
    loader built from the same file."""
    from leapdecode.model.gguf import GGUFSource
    from leapdecode.model.source import default_model_path
    from leapdecode.model.torch_runner import TorchRunner
    from leapdecode.model.weights import linear_groups

    model = bundled_engine.model.model
    assert isinstance(bundled_engine.model, TorchRunner)  # float32 weights as the loader builds them
    source = GGUFSource(default_model_path())
    groups = linear_groups(model.cfg)
    sources = [[source.stored(n) for n in names] for names in groups]
    layers = [lin for b in model.blocks for lin in (b.attn.wqkv, b.attn.wo, b.mlp.w13, b.mlp.w2)]
    layers.append(model.lm_head)
    assert len(sources) == len(layers) == 4 * model.cfg.n_layers + 1
    for i in (0, 1, 2, 3, len(layers) - 5, len(layers) - 1):  # every kind of linear, first and last layer
        assert torch.equal(torch.cat([Q.dequantize(p) for p in sources[i]]), layers[i].weight), groups[i]
    assert {p.fmt for parts in sources[:-1] for p in parts} == {"q4_1"}
    assert sources[-1][0].fmt == "q8_0"  # token_embd, tied to the output layer


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_quantizing_a_few_rows_at_a_time_gives_the_same_weights(monkeypatch, fmt):
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(5))
    whole = Q.quantize(w, fmt)
    monkeypatch.setattr(Q, "_QUANTIZE_ELEMENTS", 5 * 64)  # 8 pieces of 5 rows, the last of 2
    pieces = Q.quantize(w, fmt)
    assert whole.tensors().keys() == pieces.tensors().keys()
    assert all(torch.equal(t, pieces.tensors()[n]) for n, t in whole.tensors().items())
