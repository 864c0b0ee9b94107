"""Tokenizers built from GGUF metadata: the file's own pre-tokenizer, chat template, and SentencePiece."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leapdecode.model.tokenizer import Tokenizer

TEXTS = [
    "\n\n1. First item\n2. Second item",
    "x = [i * 2 for i in range(10)]\nprint(sum(x))",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "def f(a, b):\n    return a ** 2 + b // 3\n",
    "Call 555-0199 or email a.b@example.com before 12:30.",
    "   leading spaces and\ttabs\n\n\nnewlines",
    "Unicode: café, naïve, 日本語, emoji 🎉 and 1000000.",
    "SELECT id, COUNT(*) FROM t WHERE v > 42 GROUP BY id;",
]


def test_smollm_splits_digits_one_by_one(default_engine):
    tok = default_engine.tokenizer
    ids = tok.encode("\n\n1")
    assert [tok.token(i) for i in ids] == ["ĊĊ", "1"]
    assert [tok.token(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_agrees_with_transformers_after_its_pre_tokenizer_fix(default_engine):
    """transformers builds this GGUF's tokenizer without digit splitting; with SmolLM2's own
    pre-tokenizer restored it agrees with llama.cpp, and must agree with us on every text."""
    import transformers
    from tokenizers import pre_tokenizers

    from leapdecode.model.source import default_model_path

    path = default_model_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    ours = default_engine.tokenizer
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.render_chat(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_stop_tokens_include_the_end_of_turn(default_engine):
    tok = default_engine.tokenizer
    assert tok.token(min(tok.eos_ids)) == "<|im_end|>"


def spm_metadata() -> dict:
    tokens = (
        ["<unk>", "<s>", "</s>"]
        + [f"<0x{b:02X}>" for b in range(256)]
        + ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "▁c", "bc"]
    )
    scores = [0.0] * 259 + [-1.0, -2.0, -2.0, -2.0, -0.5, -0.7, -0.1, -0.6, -0.9]
    types = [2, 3, 3] + [6] * 256 + [1] * 9
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.mark.parametrize(
    "text,pieces",
    [
        ("ab ab", ["<s>", "▁ab", "▁ab"]),
        ("c abc", ["<s>", "▁c", "▁ab", "c"]),
        ("a!", ["<s>", "▁a", "<0x21>"]),  # byte fallback for a character outside the vocabulary
    ],
)
def test_sentencepiece_gguf_tokenizer(text, pieces):
    tok = Tokenizer.from_gguf_metadata(spm_metadata())
    ids = tok.encode(text)
    assert [tok.token(i) for i in ids] == pieces
    assert tok.decode(ids) == text


def _streamed(tok, ids: list[int], sizes: list[int]) -> str:
    """The text a TextStream emits for `ids` pushed in groups of `sizes` (cycled), then flushed."""
    from leapdecode.streaming import TextStream

    stream, out, i, k = TextStream(tok), [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        out.append(stream.push(ids[i : i + n])[0])
        i, k = i + n, k + 1
    return "".join(out) + stream.flush()


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=60), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_streamed_text_is_the_full_decode_byte_level(default_engine, text, sizes):
    """Each push decodes a window of a few ids: the pieces must still join to what decoding every id
    at once gives, multi-byte characters split across tokens included."""
    tok = default_engine.tokenizer
    ids = tok.encode(text)
    assert _streamed(tok, ids, sizes) == tok.decode(ids)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 49151), min_size=1, max_size=40),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
)
def test_streamed_text_is_the_full_decode_for_any_ids(default_engine, ids, sizes):
    tok = default_engine.tokenizer
    assert _streamed(tok, ids, sizes) == tok.decode(ids)


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="abc é日", min_size=1, max_size=40),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
)
def test_streamed_text_is_the_full_decode_sentencepiece(text, sizes):
    """SentencePiece drops the first token's leading space: both windows of a push start at the same
    token, so the new text still comes out as the full decode writes it (byte fallback included)."""
    tok = Tokenizer.from_gguf_metadata(spm_metadata())
    ids = tok.encode(text)
    assert _streamed(tok, ids, sizes) == tok.decode(ids)
