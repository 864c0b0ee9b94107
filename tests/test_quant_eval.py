"""`leap eval` and the format choices that depend on the file: quality numbers are computed, not assumed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SPEC_BENCH, random_state, tiny_config, tiny_runner
from gguf import GGMLQuantizationType, GGUFWriter

from leapdecode.cli import main
from leapdecode.commands.evaluate import Format, Score, evaluate, load_texts, log_probs
from leapdecode.errors import LeapError
from leapdecode.model.backends import runs_stored
from leapdecode.model.linear import LinearSpec, available_backends
from leapdecode.model.native_runner import weight_part
from leapdecode.model.weights import StateSource

native_only = pytest.mark.skipif("native" not in available_backends(), reason="needs the native backend")


def test_score_of_identical_distributions():
    logp = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    targets = torch.tensor([0, 1, 2, 3, 4])
    s = Score()
    s.add(logp, logp, targets)
    r = s.to_dict()
    assert r["mean_kl"] == 0.0 and r["top1_agreement"] == 1.0 and r["tokens"] == 5
    assert math.isclose(r["perplexity"], math.exp(-float(logp[torch.arange(5), targets].mean())))


def test_score_kl_of_known_distributions():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    s = Score()
    s.add(p, q, torch.tensor([1]))
    expect = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(s.to_dict()["mean_kl"], expect) and s.to_dict()["top1_agreement"] == 0.0


@native_only
def test_evaluate_tiny_model():
    cfg = tiny_config(vocab=64, dim=64, inter=128)
    windows = [list(range(3, 40)), [5, 9, 2, 7] * 6]
    ref_model = tiny_runner(cfg, 0, torch.float32)
    source = StateSource(random_state(cfg, 0), cfg)
    res = evaluate(source, windows, [Format.parse("none:float32"), Format.parse("int4:int8")], "native")
    assert list(res) == ["reference", "native/none/float32", "native/int4/int8"]
    ref, f32, q4 = res.values()
    assert ref["tokens"] == 36 + 23 and ref["mean_kl"] == 0.0
    assert f32["mean_kl"] < 1e-9 and f32["top1_agreement"] == 1.0  # same weights, other kernels
    assert q4["mean_kl"] > 1e-6 and q4["weight_mb"] < f32["weight_mb"] / 3
    logp = log_probs(ref_model, windows[0])
    nll = -float(logp[torch.arange(36), torch.tensor(windows[0][1:])].sum())
    logp1 = log_probs(ref_model, windows[1])
    nll += -float(logp1[torch.arange(23), torch.tensor(windows[1][1:])].sum())
    assert math.isclose(ref["perplexity"], math.exp(nll / 59), rel_tol=1e-12)


def test_formats_and_data_errors(tmp_path):
    with pytest.raises(LeapError, match="QUANT"):
        Format.parse("int3:int8")
    with pytest.raises(LeapError, match="not found"):
        load_texts(tmp_path / "missing.jsonl", "summarization", 2)
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"category": "qa", "turns": ["x"]}\n')
    with pytest.raises(LeapError, match="summarization"):
        load_texts(bad, "summarization", 2)
    bad.write_text('{"category": "qa", "turns": ["x"]}\n{"category": \n')
    with pytest.raises(LeapError, match=r"q.jsonl line 2: malformed JSON"):
        load_texts(bad, "qa", 2)
    assert main(["eval", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["eval", "--data", str(bad), "--formats", "int3"]) == 2
    for flag, value in (("--docs", "0"), ("--max-tokens", "1"), ("--threads", "0")):
        with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error, before anything loads
            main(["eval", flag, value])


def test_spec_bench_summaries_are_read():
    texts = load_texts(SPEC_BENCH, "summarization", 3)
    assert len(texts) == 3 and all(t.startswith("Summarize") for t in texts)


@native_only
def test_leap_eval_on_the_bundled_model(capsys):
    rc = main(  # no --data: the bundled Spec-Bench summaries
        [
            "eval",
            "--docs",
            "1",
            "--max-tokens",
            "48",
            "--formats",
            "gguf:int8",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    res = out["results"]
    assert set(res) == {"reference", "native/gguf/int8"} and res["reference"]["tokens"] == 47
    assert 0 < res["native/gguf/int8"]["mean_kl"] < 0.1  # int8 activations: small, measured loss
    assert res["native/gguf/int8"]["weight_mb"] < res["reference"]["weight_mb"] / 4


def _write_gguf(path, qtype: str):
    """A GGUF holding one linear tensor of type `qtype` (raw bytes) and a norm."""
    w = GGUFWriter(str(path), "llama")
    cols = 256
    nbytes = {"Q3_K": 110, "Q4_1": 20 * cols // 32}[qtype]
    raw = np.zeros((4, nbytes), dtype=np.uint8)
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=GGMLQuantizationType[qtype])  # [4, 256] weights
    w.add_tensor("blk.0.attn_norm.weight", np.ones(cols, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class _Typed:
    """A source of a GGUF file whose every linear weight is stored as `qtype`."""

    def __init__(self, path, qtype: str):
        self.cfg, self.path, self.qtype = tiny_config(), path, qtype

    def stored_type(self, name: str) -> str:
        return self.qtype

    def stored(self, name: str):
        return None


@native_only
def test_auto_quant_runs_the_file_only_when_every_linear_type_is_supported(tmp_path):
    """A file with blocks the kernels cannot run as stored (Q3_K) is requantized to 8 bits, not float32."""
    for qtype, want in (("Q3_K", "int8"), ("Q4_1", "gguf")):
        path = tmp_path / f"{qtype}.gguf"
        _write_gguf(path, qtype)
        assert (
            LinearSpec("native", "auto").resolve(torch.float32, "cpu", runs_stored(_Typed(path, qtype))).quant
            == want
        )
    q3 = _Typed(tmp_path / "Q3_K.gguf", "Q3_K")
    with pytest.raises(LeapError, match="Q3_K"):
        weight_part(q3, "model.layers.0.self_attn.q_proj.weight", LinearSpec("native", "gguf", "int8"))
