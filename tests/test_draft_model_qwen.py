"""Slow: the real pair, Qwen2.5-Coder-0.5B-Instruct drafting for Qwen2.5-Coder-1.5B-Instruct (Q4_K_M
GGUF files, dequantized), and our Qwen2 runtime (q/k/v biases, Q4_K/Q5_0/Q6_K/Q8_0 tensors) against
transformers. Fetch the files first: python benchmarks/models.py fetch qwen-pair."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from leapdecode.engine import Engine, GenerationConfig

pytestmark = pytest.mark.slow

FILES = {
    "qwen-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "qwen-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
]


def cached(name: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leapdecode" / "models"
    path = base / FILES[name]
    if not path.is_file():
        pytest.skip(f"{name} is not cached: run python benchmarks/models.py fetch qwen-pair")
    return path


def test_qwen_05b_matches_transformers():
    from transformers import AutoModelForCausalLM

    path = cached("qwen-0.5b")
    engine = Engine.load(str(path), quant="none", activations="float32")  # float32, as transformers runs it
    ids = engine.encode_prompt(PROMPTS[0])
    ours = engine.generate(ids, GenerationConfig(max_new_tokens=24, drafter="none")).token_ids
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        theirs = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=sorted(engine.tokenizer.eos_ids),
        )[0, len(ids) :].tolist()
        hf_logits = hf(x).logits[0]  # [P, V]
    assert ours == theirs[: len(ours)] and len(ours) >= 16
    our_logits = engine.model.forward(x[0], torch.arange(len(ids)), engine.model.new_cache(len(ids))).logits
    assert torch.allclose(our_logits, hf_logits, atol=1e-3, rtol=0)


def test_qwen_pair_draft_model_is_lossless_and_accepts():
    engine = Engine.load(
        str(cached("qwen-1.5b")),
        threads=None,
        drafter_options={"draft-model": {"path": str(cached("qwen-0.5b")), "num_draft": 5}},
    )
    drafter = engine.drafter("draft-model")  # loads the 0.5B and compares the tokenizers
    assert drafter.model.cfg.n_layers == 24 and engine.model.cfg.n_layers == 28
    accepted = drafted = 0
    for prompt in PROMPTS:
        ids = engine.encode_prompt(prompt)
        plain = engine.generate(ids, GenerationConfig(max_new_tokens=32, drafter="none"))
        spec = engine.generate(ids, GenerationConfig(max_new_tokens=32, drafter="draft-model"))
        assert spec.token_ids == plain.token_ids
        accepted, drafted = accepted + spec.stats.accepted, drafted + spec.stats.drafted
    assert accepted > drafted / 3  # the same family agrees often (about 2/3 of drafted tokens measured)
