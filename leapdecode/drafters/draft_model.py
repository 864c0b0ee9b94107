"""Draft-model speculation: a smaller model with the same tokenizer proposes, the target verifies.

The draft model keeps its own KV cache in step with the sequence: before drafting it truncates its cache
to the longest common prefix with the committed tokens and feeds only what it has not seen (usually the
accepted tokens and the bonus), so each proposal costs one small forward per drafted depth.

A chain (``branch=1``) or a tree with top-k branching along the chain (``branch=k``: at every depth
k children of the previous main-chain node, the chain continues from the first). Under sampling, tokens
are drawn from the draft's own distribution (the request's temperature/top-k/top-p applied to the draft
logits) and ``Draft.probs`` carries those rows, so the verifier's rejection sampling keeps the output
distribution exactly the target's; siblings are independent draws from one row, as that requires.

The chain helpers here (`Picker`, `draft_nodes`) are shared with the self-drafters in `swift`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from leapdecode.checks import check_int
from leapdecode.draft import Draft
from leapdecode.drafters.base import Drafter, DrafterHost, RequestContext, parse_options, register
from leapdecode.drafters.vocab import DraftVocab
from leapdecode.errors import LeapError
from leapdecode.model.linear import LinearSpec
from leapdecode.model.runner import Plan, Runner
from leapdecode.sampling import SamplingParams, target_probs
from leapdecode.sequences import common_prefix

#: Token ids compared between the two tokenizers (evenly spread over the vocabulary, plus its tail).
VOCAB_SAMPLE = 512


# ---------------------------------------------------------------- options


def check_fraction(name: str, option: str, value, closed_low: bool = True) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (0.0 <= value <= 1.0 if closed_low else 0.0 < value <= 1.0)
    )
    if not ok:
        raise LeapError(
            f"{name} option {option} must be a number in {'[' if closed_low else '('}0, 1], got {value!r}"
        )


# ---------------------------------------------------------------- drafting helpers


class Picker:
    """Chooses draft tokens from draft logits: argmax when the request is greedy, else independent
    draws from the draft distribution (with their probability rows, for exact rejection sampling)."""

    def __init__(self, params: SamplingParams | None, salt: int):
        self.params = params or SamplingParams()
        self.generator = None
        if not self.params.greedy:
            self.generator = torch.Generator()
            if self.params.seed is None:
                self.generator.seed()
            else:  # seeded requests are reproducible; the salt keeps this stream apart from the verifier's
                self.generator.manual_seed((self.params.seed * 1_000_003 + salt) % (1 << 63))

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def pick(self, logits: torch.Tensor, k: int) -> tuple[list[int], float, torch.Tensor | None]:
        """k children from logits [V]: (tokens, confidence of the first, row they were drawn from or None).

        Greedy: the k most likely tokens (distinct), confidence = softmax probability of the top one.
        Sampling: k independent draws from q = the request's distribution over the draft logits,
        confidence = q of the first draw.
        """
        if self.greedy:
            top = torch.topk(logits.float(), k)
            conf = torch.softmax(logits.float(), -1)[top.indices[0]].item()
            return top.indices.tolist(), conf, None
        q = target_probs(logits.cpu(), self.params)  # [V] float64
        tokens = torch.multinomial(q, k, replacement=True, generator=self.generator).tolist()
        return tokens, q[tokens[0]].item(), q


#: How a chain decides to stop (see `draft_nodes`).
STOP_RULES = ("token", "path")


def draft_nodes(
    first_logits: torch.Tensor,
    step: Callable[[int], torch.Tensor],
    picker: Picker,
    max_nodes: int,
    max_depth: int,
    branch: int,
    threshold: float,
    source: str,
    stop: str = "token",
) -> Draft:
    """Grow a chain (branch=1) or a chain with `branch` children per depth from draft logits.

    `step(token)` feeds the main-chain token to the draft model and returns the logits [V] after it.
    Drafting stops at `max_depth`, when the nodes would exceed `max_nodes`, or after a main-chain token
    where the confidence falls below `threshold` (that token is still proposed: verifying it costs
    little). `stop="token"` compares each token's own confidence; `stop="path"` compares the product of
    the confidences along the chain so far, the draft's estimate that the whole chain is accepted.
    """
    token_ids: list[int] = []
    parents: list[int] = []
    rows: list[torch.Tensor] = []
    logits, parent, path = first_logits, -1, 1.0
    for depth in range(max_depth):
        width = min(branch, max_nodes - len(token_ids))
        if width <= 0:
            break
        kids, conf, q = picker.pick(logits, width)
        main = len(token_ids)
        token_ids += kids
        parents += [parent] * width
        if q is not None:
            rows += [q] * width
        path *= conf
        confident = (path if stop == "path" else conf) >= threshold
        if not confident or depth + 1 == max_depth or len(token_ids) >= max_nodes:
            break
        logits, parent = step(kids[0]), main
    probs = torch.stack(rows) if rows else None  # [n, V]
    return Draft(token_ids, parents, probs, source)


# ---------------------------------------------------------------- vocabulary check


def check_same_vocab(target, draft, target_tok=None, draft_tok=None) -> None:
    """Refuse a draft model whose vocabulary differs from the target's: its token ids would mean other
    text, so it would propose garbage (still lossless, but only slower)."""
    tv, dv = target.cfg.vocab_size, draft.cfg.vocab_size
    if tv != dv:
        raise LeapError(
            f"draft-model: the draft model's vocabulary has {dv} tokens, the target's {tv}; "
            f"a draft model must use the target's tokenizer"
        )
    if target_tok is None or draft_tok is None:
        return
    if target_tok.vocab_size != draft_tok.vocab_size:
        raise LeapError(
            f"draft-model: the draft tokenizer has {draft_tok.vocab_size} tokens, the target's "
            f"{target_tok.vocab_size}; a draft model must use the target's tokenizer"
        )
    n = target_tok.vocab_size
    ids = sorted(set(range(0, n, max(1, n // VOCAB_SAMPLE))) | set(range(max(0, n - 64), n)))
    for i in ids:
        if target_tok.token(i) != draft_tok.token(i):
            raise LeapError(
                f"draft-model: token {i} is {draft_tok.token(i)!r} for the draft model but "
                f"{target_tok.token(i)!r} for the target; a draft model must use the target's tokenizer"
            )


# ---------------------------------------------------------------- the drafter


@dataclass(frozen=True)
class DraftModelOptions:
    path: str | None = None  # GGUF file or Hugging Face folder of the draft model
    model: object = None  # a Runner instead of `path` (same dtype and device as the target)
    tokenizer: object = None  # the draft model's Tokenizer, to compare token strings (with `model`)
    num_draft: int = 10  # deepest chain
    branch: int = 1  # children per depth (1 = a chain)
    threshold: float = 0.3  # stop after a main-chain token where the draft's confidence is below this
    # "path": the confidence is the product along the chain (the draft's estimate that the whole chain is
    # accepted); "token": that token's alone. Measured on Qwen2.5-Coder 0.5B drafting for 1.5B, one
    # process, 18 Spec-Bench questions rotating: path / 0.3 / 10 deep took 0.94x the time of token / 0.3 /
    # 6 deep (3.67 against 3.49 tokens per step; path with 0.2 / 12 deep 0.97x, 0.4 / 10 deep 0.96x).
    stop: str = "path"
    # the draft's output layer covers the ids below this and the request's own tokens (see drafters.vocab);
    # 0 = the whole vocabulary. It changes what is proposed, never the output.
    vocab: int = 65536
    # the draft model's own linear kernels and weights (with `path`): its precision never changes the
    # output, only how often its guesses are accepted, so `auto` picks speed (see draft_spec)
    backend: str = "auto"
    quant: str = "auto"
    activations: str = "auto"

    def __post_init__(self):
        if (self.path is None) == (self.model is None):
            raise LeapError(
                "draft-model needs exactly one of the options path (a GGUF file or Hugging Face "
                "folder) or model (a Transformer)"
            )
        if self.path is not None and not isinstance(self.path, str):
            raise LeapError(f"draft-model option path must be a string, got {self.path!r}")
        check_int("draft-model option num_draft", self.num_draft, 1)
        check_int("draft-model option branch", self.branch, 1)
        check_int("draft-model option vocab", self.vocab, 0)
        check_fraction("draft-model", "threshold", self.threshold)
        if self.stop not in STOP_RULES:
            raise LeapError(
                f"draft-model option stop must be one of {', '.join(STOP_RULES)}, got {self.stop!r}"
            )
        LinearSpec(self.backend, self.quant, self.activations)  # unknown names fail here


def draft_spec(options: DraftModelOptions, target: Runner, runs_stored: bool | None) -> LinearSpec:
    """The kernels and weights the draft model runs with: as asked, except that `quant=auto` on the native
    kernels takes int4 where the file's own blocks cannot run there (instead of 8 bits or float32: twice or
    over six times the bytes per drafted token; measured in BENCHMARKS.md)."""
    asked = LinearSpec(options.backend, options.quant, options.activations)
    spec = asked.resolve(target.dtype, target.device, runs_stored)
    if options.quant == "auto" and spec.backend == "native" and spec.quant in ("none", "int8"):
        spec = LinearSpec(spec.backend, "int4", options.activations).resolve(
            target.dtype, target.device, runs_stored
        )
    return spec


def load_draft(options: DraftModelOptions, target: Runner):
    """(runner, tokenizer) of the draft model file at `options.path`, in the target's dtype and device."""
    from leapdecode.model.backends import build_runner, runs_stored
    from leapdecode.model.source import open_source

    source, tok, _ = open_source(options.path)
    runner, _ = build_runner(
        source, draft_spec(options, target, runs_stored(source)), target.dtype, target.device
    )
    return runner, tok


@register("draft-model")
class DraftModel(Drafter):
    """A separate, smaller model drafts; see the module docstring."""

    name = "draft-model"
    model: Runner  # the draft model's runner, set by bind

    def __init__(self, **options):
        self.options = parse_options(DraftModelOptions, options, "draft-model")
        self.ctx = RequestContext(())
        self._cache = None  # the draft model's own KVCache
        self._seen: list[int] = []  # tokens whose keys/values are in self._cache, in order
        self._picker: Picker | None = None
        self._vocab: DraftVocab | None = None  # the draft's output layer over part of the vocabulary
        self._vocab_seen = 0  # tokens of the request already given to self._vocab

    def bind(self, host: DrafterHost) -> None:
        target = host.target
        model, tok = self.options.model, self.options.tokenizer
        if self.options.path is not None:
            model, tok = load_draft(self.options, target)
        if model.dtype != target.dtype or model.device != target.device:
            raise LeapError(
                f"draft-model: the draft model is {model.dtype} on {model.device}, the target "
                f"{target.dtype} on {target.device}; they must match"
            )
        check_same_vocab(target, model, host.tokenizer, tok)
        self.model = model
        size = model.cfg.vocab_size
        self._vocab = (
            DraftVocab(model.output_rows, size, self.options.vocab) if 0 < self.options.vocab < size else None
        )

    def start(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self._picker = Picker(ctx.sampling, salt=0x5EED)
        if self._vocab is not None:
            self._vocab.reset(ctx.prompt_ids)
            self._vocab_seen = len(ctx.prompt_ids)

    def propose(self, tokens: Sequence[int], max_nodes: int) -> Draft:
        if self._picker is None:  # proposing outside a request: greedy
            self._picker = Picker(SamplingParams(), salt=0x5EED)
        self._ensure_cache()
        if self._vocab is not None:
            self._vocab.add(tokens[min(self._vocab_seen, len(tokens)) :])
            self._vocab_seen = len(tokens)
        room = self._cache.max_len - len(tokens) + 1  # the last drafted token is never fed
        depth = min(self.options.num_draft, max_nodes, room)
        if depth <= 0 or not tokens:
            return Draft(source=self.name)
        first = self._feed(list(tokens))
        return draft_nodes(
            first,
            self._feed_one,
            self._picker,
            max_nodes,
            depth,
            self.options.branch,
            self.options.threshold,
            self.name,
            self.options.stop,
        )

    def _ensure_cache(self) -> None:
        cache = self.ctx.cache
        want = cache.max_len if cache is not None else self.model.cfg.max_seq_len
        if self._cache is None or self._cache.max_len < min(want, self.model.cfg.max_seq_len):
            self._cache = self.model.new_cache(want)
            self._seen = []

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Sync the draft cache with `tokens` (keep the common prefix, feed the rest); logits [V] after
        them."""
        keep = min(common_prefix(self._seen, tokens), len(tokens) - 1)  # feed at least the root
        self._cache.truncate(keep)
        del self._seen[keep:]
        return self._append(tokens[keep:])

    def _feed_one(self, token: int) -> torch.Tensor:
        return self._append([token])

    def _append(self, fresh: list[int]) -> torch.Tensor:
        """Run the draft model on `fresh` after the cached tokens; logits [V] after the last one."""
        start = self._cache.length
        ids = torch.tensor(fresh, device=self.model.device)  # [S]
        positions = torch.arange(start, start + len(fresh), device=self.model.device)  # [S]
        logits = self.model.forward(
            ids, positions, self._cache, plan=Plan(rows="last", head=self._vocab)
        ).logits
        self._seen += fresh
        return logits[-1]  # [V]
