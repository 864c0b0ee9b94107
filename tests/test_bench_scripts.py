"""The benchmark scripts' own bookkeeping (the scripts themselves need models too big for the test run)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _import_script(name: str):
    """Import a benchmark script, then take its folder off `sys.path` again: a script named like an
    installed package (say `kernels`) would otherwise shadow it for every later test."""
    saved = list(sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


draft_model = _import_script("draft_model")


def _record(method: str, index: int, wall: float, gbs: float) -> dict:
    return {
        "method": method,
        "question_id": index,
        "group": "g",
        "index": index,
        "prompt_tokens": 5,
        "new_tokens": 10,
        "wall_s": wall,
        "prefill_s": 0.5,
        "steps": 10 if method == "none" else 4,
        "accepted": 0 if method == "none" else 6,
        "draft_s": 0.0 if method == "none" else 0.2,
        "host_gbs": gbs,
        "token_ids": [1] * 10,
    }


def test_host_split_groups_questions_by_every_run_of_ours():
    """Question 0 ran slow-host only, 1 fast-host only, 2 met both states; transformers' runs (hf) never
    decide a question's state."""
    records = [
        _record("none", 0, 4.0, 45),
        _record("draft-model", 0, 2.0, 50),
        _record("none", 1, 3.0, 80),
        _record("draft-model", 1, 2.5, 78),
        _record("none", 2, 4.0, 45),
        _record("draft-model", 2, 2.0, 79),
        _record("hf", 0, 9.0, 80),
    ]
    text = draft_model.host_split(records)
    slower, faster, mixed = text.split("\n\n")[0:2], text.split("\n\n")[2:4], text.split("\n\n")[-1]
    assert "slower than 60 GB/s (1, readings 45-50 GB/s)" in slower[0]
    assert "| draft-model | 1 | 10 |" in slower[1] and "| 2.00x |" in slower[1]
    assert "faster than 60 GB/s (1, readings 78-80 GB/s)" in faster[0]
    assert "| 1.20x |" in faster[1] and "hf" not in text
    assert mixed == "(1 questions met the host in both states.)"


def test_host_split_without_a_state_says_so():
    records = [_record("none", 0, 4.0, 45), _record("draft-model", 0, 2.0, 79)]
    assert draft_model.host_split(records) == "(1 questions met the host in both states.)"


def test_importing_a_script_leaves_sys_path_as_it_was():
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    _import_script("models")
    assert benchmarks not in sys.path


llamacpp_speculative = _import_script("llamacpp_speculative")

# Recorded from llama.cpp (llama-cpp-python 0.3.36's) on a short chat prompt, 2 threads: the lines the
# script reads among the others each tool prints to stderr.
SPECULATIVE_LOG = """\
0.05.388.885 I common_speculative_init_result: loading draft model 'draft.gguf'
0.42.797.124 I encoded   32 tokens in    8.947 seconds, speed:    3.577 t/s
0.42.797.141 I decoded   10 tokens in   20.469 seconds, speed:    0.489 t/s
0.42.797.147 I 
0.42.797.153 I n_draft   = 3
0.42.797.159 I n_predict = 10
0.42.797.165 I n_drafted = 9
0.42.797.171 I n_accept  = 7
0.42.797.177 I accept    = 77.778%
0.42.797.260 I common_perf_print:    sampling time =       3.97 ms
0.42.797.285 I common_perf_print: prompt eval time =   24740.95 ms /    45 tokens\
 (  549.80 ms per token,     1.82 tokens per second)
0.42.797.292 I common_perf_print:        eval time =       0.00 ms /     1 runs  \
 (    0.00 ms per token,      inf tokens per second)
"""
COMPLETION_LOG = """\
0.07.211.028 I generate: n_ctx = 4096, n_batch = 2048, n_predict = 16, n_keep = 0
0.34.231.581 I common_perf_print:    sampling time =       5.49 ms
0.34.231.583 I common_perf_print:    samplers time =       0.88 ms /    42 tokens
0.34.231.590 I common_perf_print:        load time =    6158.75 ms
0.34.231.592 I common_perf_print: prompt eval time =    4975.39 ms /    32 tokens\
 (  155.48 ms per token,     6.43 tokens per second)
0.34.231.593 I common_perf_print:        eval time =   22038.65 ms /     9 runs  \
 ( 2448.74 ms per token,     0.41 tokens per second)
0.34.231.594 I common_perf_print:       total time =   27021.06 ms /    41 tokens
"""
PROMPT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"


def test_parse_speculative_reads_the_summary_not_the_target_perf_lines():
    t = llamacpp_speculative.parse_speculative(SPECULATIVE_LOG)
    assert (t.prompt_tokens, t.prefill_s, t.new_tokens, t.decode_s) == (32, 8.947, 10, 20.469)
    assert (t.drafted, t.accepted) == (9, 7)  # not n_draft (the limit, 3)


def test_parse_completion_counts_the_sampled_tokens_and_sampling_time():
    t = llamacpp_speculative.parse_completion(COMPLETION_LOG)
    assert (t.prompt_tokens, t.new_tokens) == (32, 10)  # 9 evaluations + the last sampled token
    assert abs(t.prefill_s - 4.97539) < 1e-9 and abs(t.decode_s - (22038.65 + 5.49) / 1000) < 1e-9
    assert (t.drafted, t.accepted) == (0, 0)


def test_a_log_without_the_summary_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="'decoded N tokens'"):
        llamacpp_speculative.parse_speculative(SPECULATIVE_LOG.replace("decoded", "done"))
    with pytest.raises(ValueError, match="'eval time'"):
        llamacpp_speculative.parse_completion(COMPLETION_LOG.replace(":        eval time", ": other"))


def test_answers_are_cut_out_of_each_tools_stdout():
    spec_out = b"\n\n" + PROMPT.encode() + b"Hello!\n\n\n\n\n\n"
    assert llamacpp_speculative.speculative_answer(spec_out, PROMPT) == "Hello!\n\n"
    assert llamacpp_speculative.completion_answer(b"Hello!\n\n [end of text]\n\n\n") == "Hello!\n\n"
    assert llamacpp_speculative.completion_answer(b"Hello! How\n\n") == "Hello! How"
    import pytest

    with pytest.raises(ValueError, match="did not echo the prompt"):
        llamacpp_speculative.speculative_answer(b"\n\nsomething else", PROMPT)


def test_summary_steps_and_acceptance_over_the_turns():
    rec = {"prompt_tokens": 5, "our_prompt_tokens": 5, "question_id": 1, "turn": 1, "answer": "a"}
    plain = {**rec, "method": "llama.cpp plain", "new_tokens": 10, "prefill_s": 1.0, "decode_s": 4.0}
    plain |= {"drafted": 0, "accepted": 0}
    spec = {**rec, "method": "llama.cpp draft-model", "new_tokens": 10, "prefill_s": 1.0, "decode_s": 1.5}
    spec |= {"drafted": 9, "accepted": 6, "prompt_tokens": 6}
    s = llamacpp_speculative.summarize([plain, spec], "llama.cpp draft-model")
    assert s["tokens_per_step"] == 2.5 and s["acceptance"] == 6 / 9 and s["same_prompt"] == 0
    text = llamacpp_speculative.table([plain, spec], ["llama.cpp plain", "llama.cpp draft-model"])
    row = "| 1 | 4.00 | 2.00x | 2.00x | 6.67 | 2.67x | 2.50 | 66.7% (6 / 9) | 1/1 | 0/1 |"
    assert f"| llama.cpp draft-model {row}" in text


def test_answers_agree_up_to_the_shorter_one():
    """The speculative tool may sample a few tokens past the budget: a longer answer that starts with
    plain decoding's agrees; one that differs inside the shorter length does not."""
    base = {"question_id": 1, "turn": 1}
    records = [
        {**base, "method": "llama.cpp plain", "answer": "Anna was played by"},
        {**base, "method": "a", "answer": "Anna was played by actress"},
        {**base, "method": "b", "answer": "Anna is played by actress"},
    ]
    assert llamacpp_speculative.same_answers(records, "a") == (1, 1)
    assert llamacpp_speculative.same_answers(records, "b") == (0, 1)


def test_paired_median_pairs_each_turn_with_plain_decodings_own():
    def rec(method, qid, seconds):
        return {"method": method, "question_id": qid, "turn": 1, "new_tokens": 10}, seconds

    records = []
    for method, qid, seconds in [
        ("llama.cpp plain", 1, 10.0),
        ("llama.cpp plain", 2, 1.0),
        ("llama.cpp plain", 3, 2.0),
        ("s", 1, 5.0),  # 2x
        ("s", 2, 4.0),  # 0.25x: plain met a quiet machine here
        ("s", 3, 1.0),  # 2x
    ]:
        r, sec = rec(method, qid, seconds)
        records.append(r | {"prefill_s": 0.0, "decode_s": sec})
    assert llamacpp_speculative.paired_median(records, "s") == 2.0
