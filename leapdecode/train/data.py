"""Self-distillation data: the target answers the training prompts, then its own features are recorded.

`generate` writes one JSON line per conversation turn to ``samples.jsonl`` (token ids and which of them
the target generated), appending, so an interrupted run resumes where it stopped. Answers are greedy,
the text the heads will draft for. `record_features` runs one forward per sample over its whole text
and keeps the hidden states (the final norm's input, [S, D], float16): the native backend computes
each row as a one-token step would, so these are the features decoding will hand the heads.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from leapdecode.engine import Engine, GenerationConfig
from leapdecode.model.runner import Plan
from leapdecode.train.prompts import Conversation, prompt_set

SAMPLES = "samples.jsonl"
FEATURES = "features.pt"
HIDDEN_ONLY = Plan(rows="none", hidden=True)


@dataclass(frozen=True)
class Sample:
    """ids: the whole text (prompt then answer); start: index of the first generated id; conv: which
    conversation of the prompt set it answers."""

    ids: list[int]
    start: int
    conv: int = 0

    def to_json(self) -> str:
        return json.dumps({"ids": self.ids, "start": self.start, "conv": self.conv})


def read_samples(out: Path) -> list[Sample]:
    path = out / SAMPLES
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    samples = []
    for line in lines:
        try:
            samples.append(Sample(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            break  # a line cut short by an interruption: that conversation is answered again
    return samples


def _answer(engine: Engine, messages: list[dict], max_new: int, conv: int) -> tuple[Sample, str]:
    prompt = engine.encode_prompt(messages)
    res = engine.generate(prompt, GenerationConfig(max_new_tokens=max_new, drafter="suffix"))
    stopped = res.stats.finish_reason == "stop" and engine.tokenizer.eos_ids
    eos = [min(engine.tokenizer.eos_ids)] if stopped else []
    return Sample(prompt + res.token_ids + eos, len(prompt), conv), res.text


def _turns(engine: Engine, i: int, conv: Conversation, passage: str | None, max_new: int) -> list[Sample]:
    """One or two samples for conversation i; with `passage`, the first turn asks to summarize it."""
    first = conv.first if passage is None else f"Summarize the following text.\n\n{passage}"
    messages = [{"role": "user", "content": first}]
    sample, text = _answer(engine, messages, max_new, i)
    if conv.follow_up is None:
        return [sample]
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": conv.follow_up}]
    return [sample, _answer(engine, messages, max_new, i)[0]]


def _passage(i: int, seed: int, answers: dict[int, str]) -> str | None:
    """About one conversation in ten asks to summarize an earlier answer (summaries and retrieval copy
    their input); chosen per conversation, so a resumed run chooses the same."""
    rng = random.Random(seed * 1_000_003 + i)
    if i == 0 or rng.random() >= 0.1:
        return None
    return answers.get(rng.randrange(i))


def generate(
    engine: Engine, out: Path, n: int, seed: int, max_new: int, tick: Callable[[int], None]
) -> list[Sample]:
    """Answers to the first `n` conversations of the prompt set, resuming after the ones on disk."""
    done = read_samples(out)
    complete = {s.conv for s in done}
    answers = {s.conv: engine.tokenizer.decode(s.ids[s.start :]) for s in reversed(done)}  # first turns
    with (out / SAMPLES).open("w") as f:  # rewritten without a torn last line, then appended
        f.writelines(s.to_json() + "\n" for s in done)
        for i, conv in enumerate(prompt_set(n, seed)):
            if i not in complete:
                turns = _turns(engine, i, conv, _passage(i, seed, answers), max_new)
                f.writelines(s.to_json() + "\n" for s in turns)
                f.flush()
                answers[i] = engine.tokenizer.decode(turns[0].ids[turns[0].start :])
            tick(1)
    return read_samples(out)


def record_features(engine: Engine, samples: list[Sample], tick: Callable[[int], None]) -> list[torch.Tensor]:
    """The target's hidden states [S, D] (float16) of every sample's whole text."""
    model, feats = engine.model, []
    with engine.compute_scope():
        for s in samples:
            ids = torch.tensor(s.ids)  # [S]
            cache = model.new_cache(len(ids))
            hidden = model.forward(ids, torch.arange(len(ids)), cache, plan=HIDDEN_ONLY).hidden
            assert hidden is not None  # the plan asks for it
            feats.append(hidden.to(torch.float16).clone())  # [S, D]
            tick(1)
    return feats
