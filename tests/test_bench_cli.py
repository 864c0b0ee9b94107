"""leap bench: question files, one-line errors with exit code 2 (before any model loads), --report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import SPEC_BENCH, tiny_engine_for

import leapdecode
from leapdecode.bench import peers as peers_module
from leapdecode.bench.data import GROUPS, group_of, load_questions, parse_questions, spec_bench_path
from leapdecode.bench.methods import hist_from_depths
from leapdecode.bench.runner import RECORDS, run_bench
from leapdecode.cli import main
from leapdecode.cpu import cpu_flags, cpu_model, flag_set, physical_cores
from leapdecode.errors import LeapError

GOOD = {"question_id": 1, "category": "qa", "turns": ["ABC"]}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("leap: error: ") and "Traceback" not in err
    return err


# ------------------------------------------------------------------ questions


def test_spec_bench_file_groups_into_its_six_columns():
    qs = load_questions(SPEC_BENCH)
    assert len(qs) == 480
    assert {q.group for q in qs} == set(GROUPS)
    assert sum(len(q.turns) == 2 for q in qs) == 80  # MT-bench: two turns each
    assert all(q.group == "Multi-turn Conversation" for q in qs if len(q.turns) == 2)


def test_select_categories_and_first_n_per_category():
    qs = load_questions(SPEC_BENCH, ["qa", "math_reasoning"], per_category=2)
    assert [q.category for q in qs] == ["qa", "qa", "math_reasoning", "math_reasoning"]
    mt = load_questions(SPEC_BENCH, ["mt_bench"], per_category=1)
    assert [q.category for q in mt] == [
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    ]


def test_group_of():
    assert group_of("math_reasoning") == "Math" and group_of("math") == "Multi-turn Conversation"
    assert group_of("rag") == "RAG" and group_of("my_task") == "my_task"


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"question_id": 2, "category": "qa", "turns": ["A"]', "line 2: malformed JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"question_id": 2, "turns": ["A"]}', "line 2: missing category"),
        ('{"question_id": 2, "category": "qa", "turns": "A"}', "line 2: turns must be a list"),
        ('{"question_id": 2, "category": "qa", "turns": []}', "line 2: turns must be a non-empty list"),
        ('{"question_id": 2, "category": "qa", "turns": ["A", 3]}', "line 2: turns must be a non-empty list"),
        ('{"question_id": 1, "category": "qa", "turns": ["A"]}', "line 2: duplicate question_id 1"),
        ('{"question_id": [2], "category": "qa", "turns": ["A"]}', "line 2: question_id must be"),
    ],
)
def test_bad_question_lines_name_the_line(line, message):
    with pytest.raises(LeapError, match=message):
        parse_questions([json.dumps(GOOD), line], "q.jsonl")


def test_empty_question_file(tmp_path):
    with pytest.raises(LeapError, match="no questions"):
        load_questions(write_lines(tmp_path / "q.jsonl", ["", "  "]))


def test_hist_from_depths_is_exact():
    # 5 steps: 3 accepted >= 1 token, 1 accepted >= 2 -> exactly 0: 2 steps, 1: 2 steps, 2: 1 step
    assert hist_from_depths(5, [3, 1]) == [2, 2, 1]
    assert hist_from_depths(4, []) == [4]
    assert hist_from_depths(0, []) == [0]


def test_cpuinfo_parsing():
    info = (
        "processor : 0\nphysical id : 0\ncore id : 0\nmodel name : Test CPU 9000\n\n"
        "processor : 1\nphysical id : 0\ncore id : 0\n\nprocessor : 2\nphysical id : 0\ncore id : 1\n"
    )
    assert cpu_model(info) == "Test CPU 9000" and physical_cores(info) == 2


def test_cpu_flags_parsing():
    info = "processor : 0\nflags : fpu sse2 avx2 fma avx512f\n\nprocessor : 1\nflags : fpu sse2\n"
    assert flag_set(info) == {"fpu", "sse2", "avx2", "fma", "avx512f"}  # the first CPU's
    assert cpu_flags(info) == ["avx2", "fma", "avx512f"]
    assert flag_set("processor : 0\n") == frozenset() and cpu_flags("") == []


# ------------------------------------------------------------------ command line


@pytest.fixture
def qfile(tmp_path):
    return write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD)])


def test_cli_missing_data_file(capsys, tmp_path):
    err = cli_error(capsys, ["bench", "--data", str(tmp_path / "nope.jsonl")])
    assert "--data: question file not found" in err


def test_cli_reads_the_bundled_questions_without_data(capsys):
    err = cli_error(capsys, ["bench", "--categories", "nope"])  # fails before any model loads
    assert "unknown category 'nope'" in err and "math_reasoning" in err and "summarization" in err


def test_missing_matplotlib_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert "pip install 'leapdecode[report]'" in cli_error(capsys, ["bench", "--per-category", "1"])


def test_bundled_questions_are_spec_bench():
    assert SPEC_BENCH == spec_bench_path() and SPEC_BENCH.is_relative_to(Path(leapdecode.__file__).parent)
    assert (SPEC_BENCH.parent / "LICENSE").read_text().startswith("Apache License")


def test_cli_malformed_line(capsys, tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD), "{oops"])
    assert "q.jsonl line 2: malformed JSON" in cli_error(capsys, ["bench", "--data", str(path)])


def test_cli_unknown_method(capsys, qfile):
    err = cli_error(capsys, ["bench", "--data", str(qfile), "--methods", "none,warp"])
    assert "--methods: unknown method 'warp'; expected one of:" in err


def test_cli_unknown_peer(capsys, qfile):
    err = cli_error(capsys, ["bench", "--data", str(qfile), "--peers", "vllm"])
    assert "--peers: unknown peer 'vllm'; expected one of: hf, hf-pld, llamacpp, llamacpp-pld" in err


def test_cli_unknown_category(capsys, qfile):
    err = cli_error(capsys, ["bench", "--data", str(qfile), "--categories", "qa,poetry"])
    assert "--categories: unknown category 'poetry'; the data has: qa" in err


def test_cli_peer_not_installed_names_the_install_command(capsys, qfile, monkeypatch):
    spec = peers_module.PEERS["llamacpp"]
    monkeypatch.setitem(
        peers_module.PEERS,
        "llamacpp",
        peers_module.PeerSpec("no_such_module_for_leap", spec.package, spec.build),
    )
    err = cli_error(capsys, ["bench", "--data", str(qfile), "--peers", "llamacpp"])
    assert "llama-cpp-python is not installed" in err and "benchmarks/setup_peers.sh" in err


def test_cli_refuses_to_overwrite_records(capsys, qfile, tmp_path):
    (tmp_path / RECORDS).write_text('{"x": 1}\n')
    err = cli_error(capsys, ["bench", "--data", str(qfile), "--out", str(tmp_path)])
    assert "already exists; pass --resume" in err


def test_cli_report_of_a_folder_without_records(capsys, tmp_path):
    assert "--report: no records.jsonl" in cli_error(capsys, ["bench", "--report", str(tmp_path)])


def test_cli_report_with_a_bad_record_line(capsys, tmp_path):
    write_lines(tmp_path / RECORDS, ['{"method": "none"}'])
    assert "records.jsonl line 1: not a bench record" in cli_error(
        capsys, ["bench", "--report", str(tmp_path)]
    )


def test_cli_report_rerenders_from_saved_records(capsys, tmp_path):
    qs = parse_questions([json.dumps(GOOD), json.dumps({**GOOD, "question_id": 2, "category": "rag"})])
    run_bench(
        tiny_engine_for(),
        qs,
        ["none", "pld"],
        max_new_tokens=6,
        out_dir=tmp_path,
        progress=False,
        warmup=False,
    )
    assert main(["bench", "--report", str(tmp_path)]) == 0
    first = (tmp_path / "report.md").read_text()
    for name in ("report.md", "speedup.png", "accepted.png"):
        (tmp_path / name).unlink(missing_ok=True)
    assert main(["bench", "--report", str(tmp_path)]) == 0
    capsys.readouterr()
    assert (tmp_path / "report.md").read_text() == first
    assert (
        "| QA | Math | RAG |" in first
        and "| pld | - | - | - |" in first
        and (tmp_path / "speedup.png").is_file()
    )


@pytest.mark.parametrize(
    "flags,backend",
    [
        ([], "native/gguf/int8"),
        (["--quant", "none", "--activations", "float32"], "native/none/float32"),
        (["--backend", "torch"], "torch/none/float32"),
    ],
)
def test_cli_bench_runs_the_kernels_and_format_it_is_given(capsys, tmp_path, flags, backend):
    """The weight format and kernels of a bench run are the ones asked for, and the saved command says so."""
    pytest.importorskip("gguf")
    from leapdecode.model.linear import available_backends

    if "native" in backend and "native" not in available_backends():
        pytest.skip("the native backend needs AVX2+FMA+F16C and a C++ compiler")
    qfile = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD)])
    out = tmp_path / "run"
    assert (
        main(
            [
                "bench",
                "--data",
                str(qfile),
                "--methods",
                "none",
                "--max-new-tokens",
                "2",
                "--no-warmup",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
            + flags
        )
        == 0
    )
    capsys.readouterr()
    meta = json.loads((out / "run.json").read_text())
    assert meta["machine"]["backend"] == backend
    assert all(f in meta["command"] for f in flags)
