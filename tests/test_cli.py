"""The `leap` command as a user runs it: default model, --json, chat, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from leapdecode.checks import check_int, int_at_least
from leapdecode.engine import GenerationConfig
from leapdecode.errors import LeapError

LEAP = [sys.executable, "-m", "leapdecode.cli"]


def leap(*args, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        LEAP + list(args), check=False, input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "flags,engine_fixture",
    [
        ([], "default_engine"),  # the fastest kernels, as users get them
        (
            ["--backend", "torch", "--quant", "none", "--activations", "float32"],
            "bundled_engine",
        ),  # == transformers
    ],
)
def test_generate_json_default_model_equals_api(flags, engine_fixture, request):
    engine = request.getfixturevalue(engine_fixture)
    proc = leap(
        "generate", "Name two planets.", "--json", "--max-new-tokens", "24", "--drafter", "pld", *flags
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "token_ids", "stats"}
    ref = engine.generate("Name two planets.", GenerationConfig(max_new_tokens=24, drafter="none"))
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text
    assert out["stats"]["drafter"] == "pld" and out["stats"]["new_tokens"] == len(ref.token_ids)
    assert out["stats"]["backend"] == engine.backend


def test_generate_streams_text_and_stats():
    proc = leap("generate", "Say hello.", "--max-new-tokens", "12", "--stats", "--drafter", "auto")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "[auto | backend" in proc.stderr and "mean accepted" in proc.stderr


def test_chat_keeps_the_conversation():
    proc = leap("chat", "--max-new-tokens", "16", stdin="My name is Ada.\nWhat is my name?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 2
    assert "Ada" in proc.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "hi", "--model", "no/such/model.gguf"], "model not found"),
        (["generate", "hi", "--dtype", "float17"], "unknown dtype"),
        (["generate", "hi", "--model", "pyproject.toml"], "not a GGUF file"),
        (["generate", "hi", "--drafter", "telepathy"], "unknown drafter"),
        (["generate", "hi", "--max-new-tokens", "-3"], "--max-new-tokens: expected an integer >= 1, got -3"),
        (["generate", "hi", "--top-k", "x"], "--top-k: expected an integer >= 0, got 'x'"),
        (["generate", "hi", "--max-draft", "-1"], "--max-draft: expected an integer >= 0"),
        (["generate", "hi", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--drafter", "draft-model"], "--draft-model"),
        (["generate"], "prompt"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, needle):
    proc = leap(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("leap") and needle in last, proc.stderr


def test_prompt_longer_than_context_is_a_clean_error():
    proc = leap("generate", "word " * 9000, "--raw")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "context" in proc.stderr.strip().splitlines()[-1]


def test_integer_checks_name_the_value_and_the_bound():
    assert check_int("k", 3) == 3 and check_int("k", 0, low=0) == 0 and check_int("k", 512, 0, 512) == 512
    for value, low, high in ((0, 1, None), (True, 0, None), (2.0, 1, None), ("3", 1, None), (513, 0, 512)):
        with pytest.raises(LeapError, match=r"^k must be an integer (>= \d+|in \[0, 512\]), got "):
            check_int("k", value, low, high)
    parse = int_at_least(2, 4)
    assert parse("3") == 3
    for text in ("1", "5", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected an integer in \[2, 4\]"):
            parse(text)
