"""The draft model's output layer over part of the vocabulary: exact row selection of every weight format,
logits equal to the full layer's on the kept ids and -inf elsewhere, the request's own ids kept."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_runner

from leapdecode.drafters.vocab import DraftVocab
from leapdecode.errors import LeapError
from leapdecode.model import quant as Q
from leapdecode.model.linear import Linear, NativeLinear, available_backends

NATIVE = "native" in available_backends()


@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_1"])
@pytest.mark.parametrize("rows", [[0], [1, 2, 3, 4, 5], [0, 7, 8, 30, 36], list(range(37))])
def test_select_rows_keeps_the_values(fmt, rows):
    w = Q.quantize(torch.randn(37, 64, generator=torch.Generator().manual_seed(1)), fmt)
    picked = Q.select_rows(w, torch.tensor(rows))
    assert picked.fmt == fmt and (picked.out_features, picked.in_features) == (len(rows), 64)
    assert torch.equal(Q.dequantize(picked), Q.dequantize(w)[rows])


def test_select_rows_refuses_rows_outside_the_weight():
    w = Q.quantize(torch.randn(8, 32), "q8_0")
    with pytest.raises(LeapError, match=r"rows must lie in \[0, 8\)"):
        Q.select_rows(w, torch.tensor([3, 8]))


def test_torch_linear_select_rows():
    layer = Linear(torch.randn(20, 16, dtype=torch.float64), torch.randn(20, dtype=torch.float64))
    x = torch.randn(3, 16, dtype=torch.float64)
    rows = torch.tensor([2, 5, 19])
    assert torch.allclose(layer.select_rows(rows)(x), layer(x)[:, rows], rtol=0, atol=1e-12)


@pytest.mark.skipif(not NATIVE, reason="the native backend needs AVX2+FMA+F16C and a C++ compiler")
@pytest.mark.parametrize(
    "fmt, act", [("f32", "float32"), ("q8_0", "int8"), ("q4_1", "int8"), ("q4_1", "float32")]
)
def test_native_linear_select_rows_is_bit_exact(fmt, act):
    g = torch.Generator().manual_seed(2)
    parts = [Q.quantize(torch.randn(n, 64, generator=g), fmt) for n in (24, 13)]  # two parts, as fused q/k/v
    layer = NativeLinear(parts, torch.randn(37, generator=g), act)
    x = torch.randn(5, 64, generator=g)
    for rows in ([0, 1, 2, 3, 4, 5, 6], [3, 23, 24, 36], [30]):
        picked = layer.select_rows(torch.tensor(rows))
        assert torch.equal(picked(x), layer(x)[:, rows])  # each output row is computed the same way
    with pytest.raises(LeapError, match="strictly ascending"):
        layer.select_rows(torch.tensor([5, 3]))


def tiny_head():
    cfg = tiny_config(vocab=64, dim=16, layers=1, heads=2, kv_heads=1, inter=32)
    return tiny_runner(cfg, 3, torch.float64).model.lm_head


def test_logits_are_the_full_layers_on_the_kept_ids_and_minus_infinity_elsewhere():
    head = tiny_head()
    vocab = DraftVocab(head.select_rows, 64, core=10)
    vocab.reset([3, 50, 20, 50, 7])
    x = torch.randn(1, 2, 16, dtype=torch.float64)
    full, out = head(x), vocab(x)  # [1, 2, 64]
    kept = torch.zeros(64, dtype=torch.bool)
    kept[:10] = kept[20] = kept[50] = True
    assert out.shape == full.shape
    assert torch.allclose(out[..., kept], full[..., kept], rtol=0, atol=1e-12)
    assert torch.all(out[..., ~kept] == float("-inf"))
    assert vocab.extra_ids.tolist() == [20, 50]


def test_ids_the_request_uses_later_are_added_and_a_new_request_starts_afresh():
    vocab = DraftVocab(tiny_head().select_rows, 64, core=10)
    vocab.reset([1, 2])
    assert vocab.extra_ids.tolist() == [] and vocab.extra_head is None
    vocab.add([63, 5, 40, 63])
    assert vocab.extra_ids.tolist() == [40, 63]
    x = torch.randn(16, dtype=torch.float64)
    assert torch.isfinite(vocab(x)[[40, 63]]).all()
    vocab.reset([11])
    assert vocab.extra_ids.tolist() == [11] and vocab(x)[40] == float("-inf")


@pytest.mark.parametrize("core", [0, 64, 100])
def test_core_must_leave_part_of_the_vocabulary_out(core):
    with pytest.raises(LeapError, match=r"core must be in \(0, 64\)"):
        DraftVocab(tiny_head().select_rows, 64, core=core)


def test_ids_outside_the_vocabulary_are_refused():
    vocab = DraftVocab(tiny_head().select_rows, 64, core=10)
    with pytest.raises(LeapError, match="token id 64 is outside"):
        vocab.add([64])
