"""`leap train-drafter` on a tiny random model: the prompt set, the data, determinism, resuming, the
curve and a head the drafters load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import random_state, tiny_config, tiny_engine_for

from leapdecode.bench.data import SPEC_BENCH
from leapdecode.drafters.trained import load_head
from leapdecode.engine import GenerationConfig
from leapdecode.errors import LeapError
from leapdecode.model.weights import StateSource
from leapdecode.train import data
from leapdecode.train.loop import Example, TrainConfig, labels_at, unroll_mask
from leapdecode.train.pipeline import DataConfig, run, trimmed_vocab
from leapdecode.train.prompts import prompt_set

CFG = tiny_config(vocab=64, tie=True)


def engine_and_source():
    return tiny_engine_for(CFG), StateSource(random_state(CFG), CFG)


def quiet(desc, total):
    return lambda n: None


class Interrupted(Exception):
    pass


def interrupt_in(desc_to_stop: str):
    """A progress callback that interrupts the run a few samples into the stage `desc_to_stop`."""

    def progress(desc, total):
        seen = [0]

        def tick(n):
            seen[0] += n
            if desc == desc_to_stop and seen[0] >= 3:
                raise Interrupted

        return tick

    return progress


def train(tmp_path, kind="eagle", epochs=2, progress=quiet, **kw):
    engine, source = engine_and_source()
    tc = TrainConfig(kind, epochs=epochs, bf16=False, **kw)
    dc = DataConfig(prompts=24, max_new_tokens=16, vocab=40)
    return run(engine, source, tmp_path, tc, dc, progress, lambda msg: None)


def test_prompt_set_is_deterministic_varied_and_not_spec_bench():
    a, b = prompt_set(300, seed=3), prompt_set(300, seed=3)
    assert a == b and a != prompt_set(300, seed=4)
    assert len({c.first for c in a}) > 250 and 50 < sum(c.follow_up is not None for c in a) < 150
    spec = {t for line in SPEC_BENCH.read_text().splitlines() for t in json.loads(line)["turns"]}
    assert not spec & {c.first for c in prompt_set(2000)}


def test_samples_are_the_targets_own_greedy_answers(tmp_path):
    engine, _ = engine_and_source()
    samples = data.generate(engine, tmp_path, 6, 0, 12, lambda n: None)
    assert {s.conv for s in samples} == set(range(6))
    for s in samples[:3]:
        prompt = s.ids[: s.start]
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=12, drafter="none")).token_ids
        assert s.ids[s.start :][: len(out)] == out
    again = data.generate(engine, tmp_path, 8, 0, 12, lambda n: None)  # resumes: the first six kept
    assert again[: len(samples)] == samples and {s.conv for s in again} == set(range(8))


def test_labels_mark_generated_tokens_and_misses():
    ex = Example(torch.tensor([5, 6, 7, 8, 9]), torch.zeros(5, 4, dtype=torch.float16), start=3)
    slot = torch.full((10,), -1, dtype=torch.long)
    slot[torch.tensor([8])] = 0
    assert labels_at(ex, slot, 2, 4).tolist() == [-100, 0, -101, -100]  # 9 is outside the vocabulary


def test_unroll_mask_follows_each_rows_chain_of_predictions():
    m = unroll_mask(4, 2)  # pass 2, row j: true rows <= j - 1 and its own pass-2 row
    assert m[2].tolist() == [True, True, False, False, False, False, True, False]
    assert unroll_mask(3, 1).tolist() == torch.ones(3, 3, dtype=torch.bool).tril().tolist()


def test_trimmed_vocab_keeps_the_most_emitted_ids():
    ex = Example(torch.tensor([1, 2, 3, 3, 4, 4, 4]), torch.zeros(7, 2, dtype=torch.float16), start=2)
    assert trimmed_vocab([ex], 2, {60}).tolist() == [3, 4, 60]


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_training_is_deterministic_resumable_and_loads(kind, tmp_path):
    path, curve = train(tmp_path / "a", kind)
    assert [row["epoch"] for row in curve] == [1, 2] and all(0 <= a <= 1 for r in curve for a in r["top1"])
    assert json.loads((tmp_path / "a" / f"{kind}.curve.json").read_text()) == curve
    # an interrupted run (one epoch done) resumed to two epochs ends as the uninterrupted one
    shutil.copytree(
        tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("*.ckpt.pt", "*.safetensors")
    )
    with pytest.raises(Interrupted):
        train(tmp_path / "b", kind, progress=interrupt_in("epoch 2"))
    path_b, curve_b = train(tmp_path / "b", kind)
    assert curve_b == curve
    a, b = load_head(path, kind), load_head(path_b, kind)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    engine, _ = engine_and_source()
    engine.drafter_options[kind] = {"path": str(path), "size": "fixed"}
    ref = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=20, drafter="none")).token_ids
    out = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=20, drafter=kind))
    assert out.token_ids == ref and out.stats.drafted > 0


def test_bad_kind_is_a_clear_error():
    with pytest.raises(LeapError, match="--kind"):
        TrainConfig("lookahead")
