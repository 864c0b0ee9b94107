"""`leap train-drafter` end to end: answers, features, the trimmed vocabulary, training, the head file.

Every stage keeps its result in the output folder (samples.jsonl, features.pt, <kind>.ckpt.pt) and is
skipped when it is there, so a run resumes after an interruption; the head is written last as
<kind>.safetensors with its curve beside it (<kind>.curve.json).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from leapdecode.drafters.trained import HeadFile, TargetParts, check_embeddings, model_info, save_head
from leapdecode.engine import Engine
from leapdecode.errors import LeapError
from leapdecode.model.weights import EMBED, LM_HEAD, NORM, WeightSource
from leapdecode.train import data
from leapdecode.train.loop import Example, Target, TrainConfig, build_module, save_curve, train

HELD_OUT = 20  # one conversation in this many is held out for the curve


@dataclass(frozen=True)
class DataConfig:
    prompts: int = 400  # conversations of the prompt set answered
    max_new_tokens: int = 200  # per answer
    vocab: int = 8192  # most token ids the head's output layer covers (the most frequent ones)


Progress = Callable[[str, int], Callable[[int], None]]  # (description, total) -> tick


def examples(
    engine: Engine, out: Path, dc: DataConfig, seed: int, progress: Progress
) -> list[tuple[int, Example]]:
    samples = data.generate(engine, out, dc.prompts, seed, dc.max_new_tokens, progress("answers", dc.prompts))
    path = out / data.FEATURES
    feats = torch.load(path) if path.exists() else None
    if feats is None or len(feats) != len(samples):
        feats = data.record_features(engine, samples, progress("features", len(samples)))
        torch.save(feats, path)
    return [(s.conv, Example(torch.tensor(s.ids), f, s.start)) for s, f in zip(samples, feats, strict=True)]


def trimmed_vocab(train_set: list[Example], size: int, extra: set[int]) -> torch.Tensor:
    """The `size` ids the target emitted most on the training text (plus `extra`), ascending."""
    counts: Counter[int] = Counter()
    for ex in train_set:
        counts.update(ex.ids[ex.start :].tolist())
    keep = {i for i, _ in counts.most_common(size)} | extra
    return torch.tensor(sorted(keep), dtype=torch.long)


def target_parts(source: WeightSource, vocab: torch.Tensor, train_set: list[Example]) -> Target:
    cfg = source.cfg
    embed = source.float(EMBED).float()  # [V, D]
    out = embed if cfg.tie_embeddings else source.float(LM_HEAD).float()
    feats = torch.cat([ex.feats[:64].float() for ex in train_set[:64]])
    scale = float(feats.pow(2).mean().sqrt())
    return Target(embed, source.float(NORM).float(), out[vocab].contiguous(), vocab, cfg.norm_eps, scale)


def run(
    engine: Engine, source: WeightSource, out: Path, tc: TrainConfig, dc: DataConfig, progress: Progress,
    say: Callable[[str], None],
) -> tuple[Path, list[dict]]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    pairs = examples(engine, out, dc, tc.seed, progress)
    train_set = [ex for conv, ex in pairs if conv % HELD_OUT != 0]
    held = [ex for conv, ex in pairs if conv % HELD_OUT == 0]
    if not train_set or not held:
        raise LeapError(f"too few samples to train and hold out ({len(pairs)}); raise --prompts")
    eos = set(engine.tokenizer.eos_ids)
    vocab = trimmed_vocab(train_set, dc.vocab, eos)
    t = target_parts(source, vocab, train_set)
    module, head_cfg = build_module(tc, engine.model.cfg)
    say(f"{len(train_set)} training and {len(held)} held-out samples, vocabulary {len(vocab)} ids")
    ckpt = out / f"{tc.kind}.ckpt.pt"
    curve = train(module, t, train_set, held, tc, ckpt, lambda e, n: progress(f"epoch {e + 1}", n), say)
    save_curve(out / f"{tc.kind}.curve.json", curve)
    check = check_embeddings(TargetParts(engine.model))
    head = HeadFile(
        tc.kind,
        head_cfg,
        model_info(engine.model, engine.name),
        dict(module.state_dict()),
        vocab,
        t.norm,
        check,
    )
    path = out / f"{tc.kind}.safetensors"
    save_head(path, head)
    return path, curve
