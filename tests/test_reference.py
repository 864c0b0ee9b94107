"""Our runtime against transformers: logits and greedy output, on the bundled GGUF and random configs."""

from __future__ import annotations

import pytest
import torch
import transformers  # a dev dependency: the reference implementation
from conftest import char_tokenizer

from leapdecode.engine import GenerationConfig
from leapdecode.model.backends import load_runner
from leapdecode.model.linear import LinearSpec
from leapdecode.model.source import default_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three uses of copper, numbered 1 to 3.",
    "Translate to German: The weather is nice today and I want to go for a walk.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog did not react at all.",
]


@pytest.fixture(scope="module")
def hf_bundled():
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def test_bundled_logits_equal_transformers(hf_bundled, bundled_engine):
    tok = bundled_engine.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "A poem about 12345 seas, and x = [i*2 for i in y]"}])
    ids = (ids * 4)[:64]
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_bundled(x).logits[0]  # [64, V]
    model = bundled_engine.model
    ours = model.forward(x[0], torch.arange(64), model.new_cache(64)).logits
    assert (ref - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_bundled_greedy_equals_transformers_generate(hf_bundled, bundled_engine, prompt):
    ids = bundled_engine.encode_prompt(prompt)
    ours = bundled_engine.generate(ids, GenerationConfig(max_new_tokens=64, drafter="none"))
    with torch.no_grad():
        out = hf_bundled.generate(
            torch.tensor([ids]),
            max_new_tokens=64,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    ref = out[0, len(ids) :].tolist()
    eos = bundled_engine.tokenizer.eos_ids
    if ref and ref[-1] in eos:
        ref = ref[:-1]
    assert ours.token_ids == ref


def _hf_config(arch: str, **kw):
    common = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    common.update(kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common)


CASES = {
    "llama": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": ("qwen2", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
# The reference normalises and builds rope tables in float32 even for float64 models, so float64 agreement
# is bounded near 1e-7 by the reference, not by us.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_random_config_logits_equal_transformers(tmp_path, case, dtype, tol):
    arch, kw = CASES[case]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(arch, **kw)).to(dtype).eval()
    if arch == "qwen2":  # random init leaves biases at zero; make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    char_tokenizer(96).backend.save(str(tmp_path / "tokenizer.json"))
    name = {torch.float32: "float32", torch.float64: "float64"}[dtype]
    model = load_runner(tmp_path, dtype=name, spec=LinearSpec("torch", "none", "float32")).runner
    x = torch.randint(0, 96, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits[0]
    ours = model.forward(x[0], torch.arange(80), model.new_cache(80)).logits
    assert (ref - ours).abs().max().item() < tol
    assert model.cfg.qkv_bias == (arch == "qwen2")
