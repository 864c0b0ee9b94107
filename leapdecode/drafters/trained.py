"""What the trained drafters (`eagle`, `medusa`) share: the head file, the target's parts they read,
and the vocabulary their output layer covers.

A head file is one safetensors file: the head's tensors, ``vocab`` (the ascending token ids its output
layer covers: the ones the target emitted on the training text, VocabTrim), ``norm`` (the target's final
norm weight, which the head's predicted features go through before the target's own output layer) and
``check`` (the target's embeddings of a few ids, so a head is never run on another model), with its
kind and config as JSON metadata. Heads ship as float16 and run in float32 (or the target's dtype).

The target's parts come through the runner's public forward: an embedding is a forward with every
sub-layer skipped (its hidden state is the embedding), the output layer is `output_rows(ids)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leapdecode.draft import StepResult
from leapdecode.errors import LeapError
from leapdecode.model import quant as Q
from leapdecode.model.linear import NativeLinear
from leapdecode.model.runner import Head, Plan, Runner

CHECK_IDS = (0, 1, 2, 3, 100, 1000)  # ids whose embeddings identify the target (those below its vocab)
CHECK_TOLERANCE = 2e-2  # float16 storage of the embeddings, quantized or not
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "drafters"


@dataclass(frozen=True)
class HeadFile:
    kind: str  # "eagle" or "medusa"
    config: dict  # the head's own config (its dataclass as a dict)
    model: dict  # what it was trained for: dim, vocab_size, n_layers, name
    tensors: dict[str, torch.Tensor]
    vocab: torch.Tensor  # [N] ascending token ids
    norm: torch.Tensor  # [D]
    check: torch.Tensor  # [len(check ids), D]


def save_head(path: Path, head: HeadFile) -> None:
    tensors = {f"head.{k}": v.detach().to(torch.float16).contiguous() for k, v in head.tensors.items()}
    tensors |= {"vocab": head.vocab.to(torch.int64), "norm": head.norm.float(), "check": head.check.float()}
    meta = {"kind": head.kind, "config": json.dumps(head.config), "model": json.dumps(head.model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_head(path: Path | str, kind: str) -> HeadFile:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LeapError(f"{kind}: no head file at {path} (train one with `leap train-drafter --kind {kind}`)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") != kind:
        raise LeapError(f"{kind}: {path} holds a {meta.get('kind', 'unknown')!r} head, not a {kind} head")
    t = load_file(str(path))
    heads = {k.removeprefix("head."): v.float() for k, v in t.items() if k.startswith("head.")}
    return HeadFile(
        kind, json.loads(meta["config"]), json.loads(meta["model"]), heads, t["vocab"], t["norm"], t["check"]
    )


def bundled_path(kind: str) -> Path:
    """The head shipped in the package for the bundled model."""
    return BUNDLED / f"{kind}.safetensors"


def model_info(runner: Runner, name: str = "") -> dict:
    cfg = runner.cfg
    return {"dim": cfg.dim, "vocab_size": cfg.vocab_size, "n_layers": cfg.n_layers, "name": name}


class TargetParts:
    """The target's embeddings and output layer, through its runner's forward."""

    def __init__(self, runner: Runner, rows: int = 256):
        self.runner, self.rows = runner, rows
        self.cache = runner.new_cache(rows)  # never advanced: skipped blocks write nothing
        n = runner.cfg.n_layers
        self.plan = Plan(layers=((True, True),) * n, rows="none", hidden=True, advance=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, D]
        out = []
        for chunk in ids.split(self.rows):
            pos = torch.zeros_like(chunk)  # no block runs, so rope never applies
            hidden = self.runner.forward(chunk, pos, self.cache, plan=self.plan).hidden
            assert hidden is not None  # the plan asks for it
            out.append(hidden)
        return torch.cat(out) if out else torch.empty(0, self.runner.cfg.dim)

    def check(self, head: HeadFile, kind: str) -> None:
        """Refuse a head trained for another model (sizes first, then a few embeddings)."""
        mine = model_info(self.runner)
        for key in ("dim", "vocab_size", "n_layers"):
            if head.model.get(key) != mine[key]:
                raise LeapError(
                    f"{kind}: the head was trained for a model with {key} {head.model.get(key)}, "
                    f"this one has {mine[key]} (train a head for it with `leap train-drafter`)"
                )
        ids = torch.tensor([i for i in CHECK_IDS if i < mine["vocab_size"]])
        got = self.embed(ids).float()  # [C, D]
        if not torch.allclose(got, head.check.float(), atol=CHECK_TOLERANCE, rtol=CHECK_TOLERANCE):
            name = head.model.get("name") or "another model"
            raise LeapError(
                f"{kind}: the head was trained for {name}, whose embeddings differ from this model's"
            )


def check_embeddings(parts: TargetParts) -> torch.Tensor:
    ids = torch.tensor([i for i in CHECK_IDS if i < parts.runner.cfg.vocab_size])
    return parts.embed(ids).float()  # [C, D]


class HeadVocab:
    """The output layer over the trimmed vocabulary plus the request's own prompt ids."""

    def __init__(self, runner: Runner, trimmed: torch.Tensor):
        self.runner = runner
        self.trimmed = set(trimmed.tolist())
        self.reset(())

    def reset(self, prompt: Iterable[int]) -> None:
        ids = sorted(self.trimmed | set(prompt))
        self.ids = torch.tensor(ids, dtype=torch.long)  # [N] ascending
        self.head: Head = self.runner.output_rows(self.ids)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] after the final norm -> [..., N]
        return self.head(x.to(self.runner.dtype))


def head_config(cls, d: dict):
    """A head config dataclass from its JSON dict, naming what is missing."""
    try:
        return cls(**d)
    except TypeError as exc:
        raise LeapError(f"head file config does not match {cls.__name__}: {exc}") from exc


def as_dict(cfg) -> dict:
    return asdict(cfg)


def on_kernels(module: torch.nn.Module, runner: Runner) -> torch.nn.Module:
    """On the native backend, the head's linear layers run on the compiled kernels as 8-bit weights:
    a draft step reads a quarter of the float32 bytes. The head's precision changes which tokens are
    proposed, never the output. Other backends keep the float layers."""
    if runner.backend != "native":
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            w = child.weight.detach().float()
            bias = None if child.bias is None else child.bias.detach()
            setattr(module, name, NativeLinear([Q.quantize(w, "q8_0")], bias, "int8"))
        else:
            on_kernels(child, runner)
    return module


SIZES = ("cost", "fixed")


class Sizer:
    """How many of a head's best nodes to verify. `fixed`: all it was allowed. `cost`: the N maximising

        (1 + trust * sum of the N best path probabilities) / (cost(1 + N) + drafting time so far)

    with `cost` the measured time of verifying 1 + N tokens after the current context (as `auto` sizes
    its trees), and `trust` the head's calibration: a moving ratio of the nodes accepted to the path
    probabilities proposed (the head's confidence is its own estimate). A step where the head proposed
    nothing still counts its best guess (a child of the root) against the target's bonus token, which is
    the token after the root then: without that evidence a trust that once fell below what pays would
    never rise again, and the head would stay silent for good."""

    def __init__(self, size: str, host) -> None:
        self.size, self.host = size, host
        self.accepted = self.predicted = 1.0
        self.remember([], None)

    @property
    def trust(self) -> float:
        return min(2.0, max(0.2, self.accepted / self.predicted))

    def choose(self, probs: list[float], context: int, spent: float) -> int:
        """How many of `probs` (descending path probabilities) to keep."""
        if self.size == "fixed" or self.host.cost is None:
            return len(probs)
        curve, trust = self.host.cost(), self.trust
        best_n, best, expected = 0, 1.0 / (curve(1, context) + spent), 1.0
        for n, p in enumerate(probs, start=1):
            expected += min(1.0, trust * p)
            rate = expected / (curve(1 + n, context) + spent)
            if rate > best:
                best_n, best = n, rate
        return best_n

    def remember(self, proposed: list[float], guess: tuple[int, float] | None) -> None:
        """What this step's draft holds: the proposed nodes' path probabilities, and the head's best
        child of the root (token, probability), the shadow guess when nothing is proposed."""
        self.proposed, self.guess = proposed, guess

    def learn(self, step: StepResult, name: str) -> None:
        """Update the calibration from a verified step of the drafter `name`."""
        if step.draft.source == name and self.proposed:
            self.observe(self.proposed, len(step.accepted))
        elif not step.draft.token_ids and self.guess is not None:  # the bonus follows the root
            self.observe([self.guess[1]], int(step.bonus == self.guess[0]))
        self.remember([], None)

    def observe(self, proposed: list[float], accepted: int) -> None:
        self.predicted += 0.05 * (sum(proposed) - self.predicted)
        self.accepted += 0.05 * (accepted - self.accepted)
