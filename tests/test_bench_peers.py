"""The transformers peer answers our token ids: on a float64 random model it must match plain decoding."""

from __future__ import annotations

import pytest
import torch
import transformers  # a dev dependency: the reference implementation
from conftest import char_tokenizer

from leapdecode.bench import parse_questions, run_bench
from leapdecode.bench.peers import PeerContext, cut_at_eos, make_peers
from leapdecode.engine import Engine

VOCAB = 64


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float64)
    with torch.no_grad():  # livelier than the default init, so greedy outputs are not constant
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    char_tokenizer(VOCAB).backend.save(str(folder / "tokenizer.json"))
    return folder


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7], frozenset({2})) == [5, 6]
    assert cut_at_eos([5, 6], frozenset()) == [5, 6]


def test_hf_peers_match_plain_decoding_in_float64(hf_folder):
    engine = Engine.load(str(hf_folder), dtype="float64")
    ctx = PeerContext(
        model_path=hf_folder,
        dtype=torch.float64,
        eos_ids=frozenset(engine.tokenizer.eos_ids),
        threads=torch.get_num_threads(),
        n_ctx=256,
    )
    peers = make_peers(["hf", "hf-pld"], ctx)
    assert peers[0].model is peers[1].model  # one load for both variants
    qs = parse_questions(
        [
            '{"question_id": 1, "category": "qa", "turns": ["ABCABCABC DEF ABC"]}',
            '{"question_id": 2, "category": "writing", "turns": ["XYZ XY", "ZZZ XYZ"]}',
        ]
    )
    records = run_bench(engine, qs, ["none"], peers, max_new_tokens=20, progress=False)
    assert len(records) == 9
    plain = {(r["question_id"], r["turn"]): r["output_ids"] for r in records if r["method"] == "none"}
    assert len({tuple(v) for v in plain.values()}) > 1  # the outputs depend on the prompt
    for r in records:
        if r["kind"] == "peer":
            assert r["output_ids"] == plain[(r["question_id"], r["turn"])] and r["lossless"] is True
            assert r["steps"] is None and r["mean_accepted"] is None and r["new_tokens"] == 20
    assert {r["method"] for r in records} == {"none", "hf", "hf-pld"}


def test_a_peer_that_cannot_load_is_a_one_line_error(tmp_path):
    from leapdecode.errors import LeapError

    ctx = PeerContext(model_path=tmp_path, dtype=torch.float32, eos_ids=frozenset(), threads=1, n_ctx=64)
    with pytest.raises(LeapError, match="--peers hf: cannot load") as info:
        make_peers(["hf"], ctx)
    assert "\n" not in str(info.value)
