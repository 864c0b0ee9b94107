"""The int8 key/value cache: each token's keys and values of each head in int8 with one scale. Within the
int8 configuration every output stays exact: greedy speculative decoding equals plain decoding (native
kernels bit for bit, float64 torch), a reused prefix changes nothing, and a row's result never depends on
the rows beside it. Both backends store the same int8 values; the kernels read them as the torch
reference does."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, tiny_engine_for, tiny_runner

from leapdecode.cache import KVCache, dequantize, quantize
from leapdecode.draft import Draft
from leapdecode.drafters import Drafter
from leapdecode.engine import GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.model.linear import LinearSpec, available_backends
from leapdecode.model.runner import BatchItem
from leapdecode.prefix_cache import MIB, PrefixCache

NATIVE = pytest.mark.skipif(
    "native" not in available_backends(), reason="the native backend needs AVX2+FMA+F16C and a C++ compiler"
)
V = 48


def _cfg(head_dim: int = 16, **kw):
    return tiny_config(vocab=V, dim=4 * head_dim, heads=4, kv_heads=2, inter=128, qkv_bias=True, **kw)


def _native(quant="int4", act="int8", kv="int8", cfg=None, seed=11):
    return tiny_runner(cfg or _cfg(), seed, torch.float32, LinearSpec("native", quant, act, kv))


# ---------------------------------------------------------------- the format


def test_quantize_is_symmetric_per_row_with_ties_to_even():
    x = torch.tensor([[1.27, -0.5, 0.005, 0.015], [0.0, 0.0, 0.0, 0.0], [-2.54, 1.0, 0.0, 0.03]])
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (3,)
    assert torch.equal(scale, x.abs().amax(-1) / 127)
    assert q[0].tolist() == [127, -50, 0, 2]  # 0.5 and 1.5 (ties) go to the even neighbour
    assert q[1].tolist() == [0, 0, 0, 0] and float(scale[1]) == 0.0  # a zero row: scale 0, no NaN
    assert int(q[2, 0]) == -127 and bool((q.abs() <= 127).all())
    err = (dequantize(q, scale) - x).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_every_cache_edit_carries_the_scales():
    cache = KVCache(2, 2, 8, 16, kv_dtype="int8")
    assert cache.k.dtype == torch.int8 and cache.ks is not None and cache.ks.shape == (2, 1, 2, 16)
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        k, _ = cache.update(layer, torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g))
        assert k.dtype == torch.float32 and k.shape == (1, 2, 6, 8)
    cache.advance(6)
    before = [t[:, :, :, :6].clone() for t in cache.tensors()]
    cache.keep([2, 4, 5], start=2)  # slots 0, 1, then 2, 4, 5
    order = [0, 1, 2, 4, 5]
    for t, old in zip(cache.tensors(), before):
        assert torch.equal(t[:, :, :, :5], old[:, :, :, order])
    parts = cache.read(1, 4)
    assert len(parts) == 4 and parts[2].shape == (2, 1, 2, 3)
    other = KVCache(2, 2, 8, 16, kv_dtype="int8")
    other.extend(*parts)
    assert other.length == 3 and all(torch.equal(a[:, :, :, :3], b) for a, b in zip(other.tensors(), parts))
    with pytest.raises(LeapError, match="parts of a float32 cache"):
        KVCache(2, 2, 8, 16).extend(*parts)


def test_a_bad_format_is_refused_naming_the_option():
    with pytest.raises(LeapError, match=r"--kv-cache.*float32, int8"):
        LinearSpec("native", "int8", "int8", "int4")
    with pytest.raises(LeapError, match="--kv-cache"):
        KVCache(1, 1, 8, 4, kv_dtype="fp8")
    assert LinearSpec("torch", kv_cache="int8").resolve(torch.float32, "cpu", None).kv_cache == "int8"
    assert LinearSpec("native", "int8", "int8", "int8").describe() == "native/int8/int8/kv-int8"


def test_the_cli_refuses_a_bad_kv_cache_value_without_a_traceback():
    for argv in (["generate", "--kv-cache", "int4", "hi"], ["eval", "--kv-cache", "float32,bf16"]):
        out = subprocess.run(
            [sys.executable, "-m", "leapdecode.cli", *argv], check=False, capture_output=True, text=True
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert "--kv-cache" in out.stderr and "expected one of: float32, int8" in out.stderr


# ---------------------------------------------------------------- the kernels


@NATIVE
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_the_kernels_store_what_the_reference_quantizes_and_read_it_alike(head_dim):
    """Block 0's keys are the same floats in both caches, so the kernel's int8 values and scales must be
    `quantize`'s bit for bit; the logits follow the float32 torch reference with the same cache format."""
    cfg = _cfg(head_dim)
    tokens = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(head_dim))
    pos = torch.arange(40)
    ref = tiny_runner(cfg, 5, torch.float32, LinearSpec("torch", "none", "float32", "int8"))
    native_f, native_i = (_native("none", "float32", kv, cfg, 5) for kv in ("float32", "int8"))
    cf, ci, cr = native_f.new_cache(48), native_i.new_cache(48), ref.new_cache(48)
    native_f.forward(tokens, pos, cf)
    logits = native_i.forward(tokens, pos, ci).logits
    expect = ref.forward(tokens, pos, cr).logits
    for f, q, s in ((cf.k, ci.k, ci.ks), (cf.v, ci.v, ci.vs)):
        want_q, want_s = quantize(f[0, :, :, :40])
        assert s is not None and torch.equal(q[0, :, :, :40], want_q) and torch.equal(s[0, :, :, :40], want_s)
    torch.testing.assert_close(logits, expect, rtol=0, atol=2e-4)


@NATIVE
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(head_dim):
    """A prefill of S rows, the same rows one at a time, and two sequences in one batched call: the same
    bits (cache contents included)."""
    runner = _native(cfg=_cfg(head_dim), seed=head_dim)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, V, (70,), generator=g), torch.randint(0, V, (23,), generator=g)
    whole = runner.new_cache(80)
    all_rows = runner.forward(a, torch.arange(70), whole).logits
    steps = runner.new_cache(80)
    one = torch.cat([runner.forward(a[i : i + 1], torch.tensor([i]), steps).logits for i in range(70)])
    assert torch.equal(all_rows, one)
    assert all(torch.equal(x, y) for x, y in zip(whole.tensors(), steps.tensors()))
    alone = runner.forward(b, torch.arange(23), runner.new_cache(30)).logits
    ca, cb = runner.new_cache(80), runner.new_cache(30)
    outs = runner.forward_batch([BatchItem(a, torch.arange(70), ca), BatchItem(b, torch.arange(23), cb)])
    assert torch.equal(outs[0].logits, all_rows) and torch.equal(outs[1].logits, alone)


@NATIVE
def test_the_kernel_checks_the_cache_format():
    from test_abi import _Call

    from leapdecode.kernels import abi

    call = _Call()
    call.seqs[0].kv_fmt = 7
    assert call.status() == "LD_ERR_FORMAT"
    call.seqs[0].kv_fmt = abi.KV_CODES["int8"]  # int8 without its scales
    assert call.status() == "LD_ERR_NULL"


# ---------------------------------------------------------------- exactness within the configuration


class RandomTrees(Drafter):
    """Random trees whose first branch follows the reference continuation for a random depth."""

    name = "random-trees"

    def __init__(self, reference: list[int], seed: int):
        self.reference, self.rng = reference, random.Random(seed)

    def propose(self, tokens, max_nodes):
        n = self.rng.randint(0, min(max_nodes, 10))
        true = self.rng.randint(0, n)
        ids = [self.reference[min(len(tokens) + i, len(self.reference) - 1)] for i in range(true)]
        parents = list(range(-1, true - 1))
        for i in range(true, n):
            ids.append(self.rng.randrange(V))
            parents.append(self.rng.randint(-1, i - 1))
        return Draft(ids, parents, source=self.name)


def _engines():
    torch64 = LinearSpec("torch", "none", "float32", "int8")
    out = [tiny_engine_for(_cfg(), seed=3, dtype=torch.float64, spec=torch64)]
    if "native" in available_backends():
        for quant, act, hd in (("int4", "int8", 16), ("none", "float32", 64)):
            spec = LinearSpec("native", quant, act, "int8")
            out.append(tiny_engine_for(_cfg(hd), seed=hd, dtype=torch.float32, spec=spec))
    return out


ENGINES = _engines()


@pytest.mark.parametrize("which", range(len(ENGINES)))
@pytest.mark.parametrize("drafter", ["pld", "suffix", "recycling", "random-trees"])
def test_speculative_decoding_equals_plain_decoding_with_an_int8_cache(which, drafter):
    engine, rng = ENGINES[which], random.Random(f"{drafter}{which}")
    assert engine.model.new_cache(4).kv_dtype == "int8"
    for _ in range(4):
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 24))]
        prompt = prompt + prompt[: rng.randint(0, len(prompt))]
        ref = engine.generate(prompt, GenerationConfig(max_new_tokens=30, drafter="none")).token_ids
        config = GenerationConfig(max_new_tokens=30, drafter="none" if drafter == "random-trees" else drafter)
        d = RandomTrees(prompt + ref, rng.randrange(1 << 16)) if drafter == "random-trees" else None
        out = engine.generate(prompt, config, drafter=d)
        assert out.token_ids == ref, f"{drafter} changed the greedy output with an int8 cache"


@pytest.mark.parametrize("which", range(len(ENGINES)))
def test_a_reused_int8_prefix_changes_nothing(which):
    engine = ENGINES[which]
    cold = GenerationConfig(max_new_tokens=16, drafter="pld")
    stem = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3, 4, 5]
    refs = [engine.generate(stem + tail, cold).token_ids for tail in ([], [7, 7], [20, 21, 22])]
    engine.prefix_cache = PrefixCache(16 * MIB, block_tokens=4)
    try:
        for tail, ref in zip(([], [7, 7], [20, 21, 22]), refs):
            out = engine.generate(stem + tail, cold)
            assert out.token_ids == ref
        assert out.stats.prefix_cached_tokens > 0
        assert engine.prefix_cache.nbytes > 0
    finally:
        engine.prefix_cache = None
