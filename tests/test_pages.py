"""The huge-page arena for packed weights: values unchanged, alignment, bounds, and a model that runs
the same bits after its weights moved."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_runner

from leapdecode.kernels.pages import ALIGN, HUGE_PAGE, HugePageArena, move_to_huge_pages
from leapdecode.model.linear import LinearSpec
from leapdecode.model.native_runner import NativeRunner
from leapdecode.model.stack import NativeStack


def test_arena_copies_values_into_aligned_slices():
    a = torch.randn(3, 5)
    b = torch.arange(7, dtype=torch.int8).to(torch.uint8)
    c = torch.randn(4, 9).half()
    arena = HugePageArena(3 * 4096)
    out = [arena.take(t) for t in (a, b, c)]
    for src, dst in zip((a, b, c), out):
        assert torch.equal(src, dst) and dst.dtype == src.dtype and dst.shape == src.shape
        assert dst.data_ptr() % ALIGN == 0 and dst.data_ptr() != src.data_ptr()
    assert out[0].data_ptr() % HUGE_PAGE == 0  # the block starts on a huge page
    assert out[1].data_ptr() - out[0].data_ptr() == ALIGN  # 60 bytes padded to one line


def test_arena_refuses_more_than_its_room():
    arena = HugePageArena(128)
    arena.take(torch.zeros(16))
    with pytest.raises(ValueError, match="bytes left"):
        arena.take(torch.zeros(32))


@pytest.mark.parametrize("quant,act", [("none", "float32"), ("int4", "int8")])
def test_a_model_computes_the_same_bits_after_its_weights_moved(quant, act):
    cfg = tiny_config(dim=64, inter=128, heads=4, kv_heads=2, vocab=96)
    spec = LinearSpec("native", quant, act)
    model = tiny_runner(cfg, 3, torch.float32, spec)  # built on huge pages already
    layers = [lin for b in model.stack.blocks for lin in b.linears()] + [model.lm_head]
    ptrs = sorted(t.data_ptr() for layer in layers for t in layer.tensors())
    assert ptrs[-1] - ptrs[0] < sum(
        t.numel() * t.element_size() + ALIGN for layer in layers for t in layer.tensors()
    )
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(0))
    before = model.forward(ids, torch.arange(12), model.new_cache(16)).logits
    again = tiny_runner(cfg, 3, torch.float32, spec)
    layers = [lin for b in again.stack.blocks for lin in b.linears()] + [again.lm_head]
    old = {t.data_ptr() for layer in layers for t in layer.tensors()}
    assert move_to_huge_pages(layers)  # and once more, from one arena to another; a new stack follows
    assert all(t.data_ptr() not in old for layer in layers for t in layer.tensors())
    moved = NativeRunner(
        cfg,
        NativeStack(cfg, again.stack.blocks, again.stack.embed, again.stack.cos, again.stack.sin),
        again.norm,
        again.lm_head,
        spec,
    )
    assert torch.equal(moved.forward(ids, torch.arange(12), moved.new_cache(16)).logits, before)
