"""The native runner (all blocks in one kernel call) against its layers called one block at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_engine_for, tiny_runner

from leapdecode.draft import Draft, tree_inputs
from leapdecode.errors import LeapError
from leapdecode.model.linear import LinearSpec, available_backends
from leapdecode.model.llama import MLP, Attention, Block, RMSNorm, Transformer
from leapdecode.model.runner import Plan
from leapdecode.model.stack import SeqRows
from leapdecode.model.torch_runner import TorchRunner

pytestmark = pytest.mark.skipif(
    "native" not in available_backends(), reason="the native backend needs AVX2+FMA+F16C and a C++ compiler"
)

COMBOS = [("none", "float32"), ("int8", "int8"), ("int4", "int8"), ("int8", "float32")]


def _native(quant="none", act="float32", seed=0, **cfg):
    defaults = {"dim": 64, "inter": 128, "heads": 4, "kv_heads": 2, "vocab": 96, "layers": 3}
    return tiny_runner(tiny_config(**(defaults | cfg)), seed, torch.float32, LinearSpec("native", quant, act))


def _per_block(runner) -> TorchRunner:
    """The same packed layers called one at a time from the torch model's blocks (torch's attention)."""
    st, cfg = runner.stack, runner.cfg
    blocks = [
        Block(
            Attention(cfg, b.qkv, b.o),
            MLP(b.w13, b.w2),
            RMSNorm(b.attn_norm, cfg.norm_eps),
            RMSNorm(b.mlp_norm, cfg.norm_eps),
        )
        for b in st.blocks
    ]
    return TorchRunner(Transformer(cfg, st.embed, blocks, runner.norm, runner.lm_head))


def _run(model, ids, n_cached=0, mask=None, layers=None):
    cache = model.new_cache(64)
    if n_cached:
        model.forward(ids[:n_cached], torch.arange(n_cached), cache)
    s = len(ids) - n_cached
    plan = Plan(layers=layers)
    logits = model.forward(ids[n_cached:], torch.arange(n_cached, n_cached + s), cache, mask, plan).logits
    return logits, cache


@pytest.mark.parametrize("quant,act", COMBOS)
@pytest.mark.parametrize(
    "cfg", [{}, {"qkv_bias": True}, {"heads": 4, "kv_heads": 4}, {"dim": 96, "heads": 3, "kv_heads": 1}]
)
def test_stack_agrees_with_the_per_block_path(quant, act, cfg):
    model = _native(quant, act, **cfg)
    ref = _per_block(model)
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(5))
    a, ca = _run(model, ids, n_cached=11)
    b, cb = _run(ref, ids, n_cached=11)
    tol = 1e-4 if act == "float32" else 0.05  # int8 activations may round one block differently
    assert float((a - b).abs().max()) < tol
    n = ca.length
    assert n == cb.length == 20
    assert float((ca.k[:, :, :, :n] - cb.k[:, :, :, :n]).abs().max()) < tol * 10


def test_stack_follows_the_skip_plan():
    model = _native(layers=4)
    ref = _per_block(model)
    ids = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(6))
    plan = [(False, True), (True, False), (True, True), (False, False)]
    a, _ = _run(model, ids, n_cached=5, layers=plan)
    b, _ = _run(ref, ids, n_cached=5, layers=plan)
    full, _ = _run(model, ids, n_cached=5)
    assert float((a - b).abs().max()) < 1e-4
    assert float((a - full).abs().max()) > 1e-2  # the plan did skip something


def test_tree_verification_through_the_stack_is_bitwise_equal_to_single_steps():
    model = _native("int4", "int8")
    prefix = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(7))
    draft = Draft(token_ids=[3, 4, 5, 6, 7], parents=[-1, 0, 0, 2, 1])
    cache = model.new_cache(64)
    model.forward(prefix, torch.arange(7), cache)
    tokens, positions, mask = tree_inputs(draft, root_token=9, n_cached=7)
    tree = model.forward(tokens, positions, cache, mask, Plan(advance=False)).logits  # [6, V]
    for node in range(len(draft.token_ids)):
        path = draft.path_to(node)
        ids = torch.tensor([9] + [draft.token_ids[i] for i in path])
        c = model.new_cache(64)
        model.forward(prefix, torch.arange(7), c)
        alone = model.forward(ids, torch.arange(7, 7 + len(ids)), c).logits[-1]
        assert torch.equal(tree[node + 1], alone)


def test_a_chain_verified_causally_equals_its_explicit_mask_bitwise():
    """Chains reach the model with mask None (see tree_inputs): the causal path must give the bits of
    the explicit mask a tree of one branch would get."""
    model = _native("none", "float32")
    prefix = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(3))
    chain = torch.tensor([9, 3, 4, 5, 6])
    outs = []
    for mask in (None, torch.ones(5, 14, dtype=torch.bool).tril(9)):
        cache = model.new_cache(64)
        model.forward(prefix, torch.arange(9), cache)
        outs.append(model.forward(chain, torch.arange(9, 14), cache, mask).logits)
    assert torch.equal(outs[0], outs[1])


def test_bad_mask_and_full_cache_are_clear_errors():
    model = _native()
    cache = model.new_cache(8)
    ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(LeapError, match="mask"):
        model.forward(ids, torch.arange(4), cache, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(LeapError, match="context full"):
        model.forward(torch.zeros(9, dtype=torch.long), torch.arange(9), cache)
    with pytest.raises(LeapError, match="tokens \\[S\\]"):
        model.forward(torch.zeros(1, 4, dtype=torch.long), torch.arange(4), cache)


def test_kernel_scope_keeps_torch_single_threaded_and_restores_it():
    from leapdecode.kernels.native import kernel_scope, kernel_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernel_scope():
            assert torch.get_num_threads() == 1 and kernel_threads() == 2
            with kernel_scope(3):
                assert kernel_threads() == 3 and torch.get_num_threads() == 1
            assert kernel_threads() == 2
        assert torch.get_num_threads() == 2 and kernel_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_generation_on_native_kernels_leaves_torch_threads_as_found():
    from leapdecode.engine import Engine, GenerationConfig

    eng = Engine(_native("int4", "int8"), tiny_engine_for(tiny_config(vocab=96)).tokenizer)
    before = torch.get_num_threads()
    stream = eng.stream(list(range(10)) * 2, GenerationConfig(max_new_tokens=12, drafter="pld"), raw=True)
    for _ in stream:
        assert torch.get_num_threads() == before  # between steps the caller sees its own setting
    assert len(stream.result.token_ids) == 12


def test_the_output_layer_runs_inside_the_call_bitwise_as_a_separate_layer():
    """With a native output layer the final norm and logits come from the same kernel call; the last row
    and a drafter's part of the vocabulary (`Plan.head`) are the same bits as the full layer's rows and
    columns, and the hidden states are the final norm's input."""
    model = _native("int4", "int8")
    ids = torch.randint(0, 96, (8,), generator=torch.Generator().manual_seed(4))
    full, _ = _run(model, ids)  # [8, V]
    last = model.forward(ids, torch.arange(8), model.new_cache(64), plan=Plan(rows="last", hidden=True))
    assert last.logits.shape == (1, 96) and torch.equal(last.logits[0], full[-1])
    assert last.hidden.shape == (8, 64)
    rows = torch.tensor([1, 5, 17, 60])
    part = model.forward(ids, torch.arange(8), model.new_cache(64), plan=Plan(head=model.output_rows(rows)))
    assert torch.equal(part.logits, full[..., rows])
    none = model.forward(ids, torch.arange(8), model.new_cache(64), plan=Plan(rows="none", hidden=True))
    assert none.logits.numel() == 0 and torch.equal(none.hidden, last.hidden)
    ref, _ = _run(_per_block(model), ids)
    assert float((full - ref).abs().max()) < 0.05  # the torch norm rounds its own way


def test_token_ids_and_positions_are_checked_inside_the_call():
    model = _native()
    cache = model.new_cache(8)
    with pytest.raises(LeapError, match="vocabulary"):
        model.forward(torch.tensor([3, 96]), torch.arange(2), cache)
    with pytest.raises(LeapError, match="rope"):
        model.forward(torch.tensor([3, 4]), torch.tensor([0, model.cfg.max_seq_len]), cache)
    assert cache.length == 0  # nothing was written
    logits = model.forward(torch.tensor([3, 4]), torch.arange(2), cache).logits
    assert logits.shape == (2, 96) and cache.length == 2


def test_feature_outputs_are_copies_of_the_residual_stream_after_their_blocks():
    """Features of the last block equal the returned residual stream; of a middle block, the stream of a
    run that skips every later block. Asking for them changes no output bit."""
    model = _native("int4", "int8", layers=4)
    ids = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(11))

    def call(layers=None, head=None, features=()):
        seq = SeqRows(ids, torch.arange(7), model.new_cache(64))
        return model.stack([seq], layers, head, features)

    x, _, none = call()  # [7, D]
    assert none is None
    same, _, feats = call(features=(3, 1, 3))
    assert feats.shape == (3, 7, model.cfg.dim)
    assert torch.equal(same, x) and torch.equal(feats[0], x) and torch.equal(feats[2], x)
    assert torch.equal(feats[1], call(layers=[(False, False)] * 2 + [(True, True)] * 2)[0])
    assert not torch.equal(feats[1], x)
    head = (model.norm, model.lm_head)
    _, logits, last = call(head=head, features=(3,))
    assert torch.equal(logits, call(head=head)[1]) and torch.equal(last[0], x)
    with pytest.raises(LeapError, match="features: block 4 is outside the model's 4 blocks"):
        call(features=(0, 4))
    with pytest.raises(LeapError, match="plan layers: 3 .* for the model's 4 blocks"):
        call(layers=[(False, False)] * 3)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_a_plan_returns_the_chosen_blocks_features_on_either_backend(backend):
    """Features of block j are the residual stream after it: the last block's equal the hidden states,
    the first block's equal the hidden states of a run that skips every later block."""
    spec = LinearSpec(backend, "int4", "int8" if backend == "native" else "float32")
    cfg = tiny_config(dim=64, inter=128, heads=4, kv_heads=2, vocab=96, layers=3)
    model = tiny_runner(cfg, 1, torch.float32, spec)
    ids = torch.randint(0, 96, (6,), generator=torch.Generator().manual_seed(12))

    def run(plan):
        return model.forward(ids, torch.arange(6), model.new_cache(16), plan=plan)

    out = run(Plan(hidden=True, features=(2, 0)))
    assert out.features.shape == (2, 6, 64) and torch.equal(out.features[0], out.hidden)
    skip_later = ((False, False),) + ((True, True),) * 2
    assert torch.equal(out.features[1], run(Plan(hidden=True, layers=skip_later)).hidden)
    assert run(Plan()).features is None
    with pytest.raises(LeapError, match="features: block 3"):
        run(Plan(features=(3,)))


def test_embeddings_looked_up_from_the_files_blocks_give_the_float_tables_bits():
    """The default runner of a quantized file keeps its token embeddings as stored and dequantizes the rows
    a forward needs: the same logits, bit for bit, as with the whole float32 table."""
    from leapdecode.model.backends import build_runner
    from leapdecode.model.gguf import GGUFSource
    from leapdecode.model.native_runner import NativeRunner
    from leapdecode.model.source import default_model_path
    from leapdecode.model.stack import NativeStack
    from leapdecode.model.weights import EMBED

    source = GGUFSource(default_model_path())
    runner, _ = build_runner(source, LinearSpec("native", "gguf", "int8"))
    assert runner.embed is not None and runner.stack.embed is None
    st, cfg = runner.stack, runner.cfg
    table = NativeStack(cfg, st.blocks, source.float(EMBED).contiguous(), st.cos, st.sin)
    ref = NativeRunner(cfg, table, runner.norm, runner.lm_head, runner.spec)
    ids = torch.tensor([1, 2, 300, 2, 49151, 7])  # a repeated id and the vocabulary's last
    outs = []
    for model in (runner, ref):
        cache = model.new_cache(16)
        model.forward(ids[:4], torch.arange(4), cache)
        outs.append(model.forward(ids[4:], torch.arange(4, 6), cache).logits)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(LeapError, match="outside the vocabulary"):
        runner.forward(torch.tensor([cfg.vocab_size]), torch.arange(1), runner.new_cache(4))
