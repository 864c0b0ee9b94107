"""`leap eval`: what a weight format, activation precision and key/value cache format cost in quality,
measured on real text.

Every format runs the same token windows as the float32 torch reference. Reported per format:
perplexity of the text, the mean KL divergence KL(reference || format) of the next-token
distributions, and how often both pick the same top-1 token (what greedy decoding sees).
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leapdecode.bench.data import json_lines, spec_bench_path
from leapdecode.cache import check_kv_dtype
from leapdecode.checks import int_at_least, positive_int
from leapdecode.errors import LeapError
from leapdecode.model.linear import ACTIVATIONS, QUANTS, LinearSpec

DEFAULT_FORMATS = "none:float32,int8:int8,int4:int8,gguf:float32,gguf:int8"


@dataclass(frozen=True)
class Format:
    quant: str
    activations: str

    @staticmethod
    def parse(text: str) -> Format:
        quant, _, act = text.strip().partition(":")
        fmt = Format(quant, act or "auto")
        if fmt.quant not in QUANTS or fmt.activations not in ACTIVATIONS:
            raise LeapError(
                f"--formats: {text!r} is not QUANT[:ACTIVATIONS] with QUANT in {QUANTS} and "
                f"ACTIVATIONS in {ACTIVATIONS}"
            )
        return fmt


@dataclass
class Score:
    """Running sums over every predicted position."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def add(self, ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> None:
        """ref_logp, logp [T, V] float64 log-probabilities; targets [T]."""
        self.nll -= float(logp.gather(1, targets[:, None]).sum())
        self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        self.agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        self.count += targets.numel()

    def to_dict(self) -> dict:
        n = max(self.count, 1)
        return {
            "perplexity": math.exp(self.nll / n),
            "mean_kl": self.kl / n,
            "top1_agreement": self.agree / n,
            "tokens": self.count,
            "forward_s": self.seconds,
            **self.extra,
        }


def add_arguments(p) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="question.jsonl with 'turns' (default: Spec-Bench's, bundled) or a .txt file",
    )
    p.add_argument(
        "--category", default="summarization", help="Spec-Bench category to read (default: summarization)"
    )
    p.add_argument("--docs", type=positive_int, default=8, help="number of documents (default 8)")
    p.add_argument(
        "--max-tokens", type=int_at_least(2), default=512, help="tokens per document window (default 512)"
    )
    p.add_argument(
        "--formats",
        default=DEFAULT_FORMATS,
        help=f"comma-separated QUANT:ACTIVATIONS to compare with float32 torch (default {DEFAULT_FORMATS})",
    )
    p.add_argument(
        "--kv-cache",
        default="float32",
        help="comma-separated key/value cache formats each format runs with: float32 (default), int8",
    )
    p.add_argument(
        "--backend", default="native", help="backend of the formats: native (default), torch or auto"
    )
    p.add_argument(
        "--model", default=None, help="GGUF file or Hugging Face folder (default: bundled SmolLM2-135M)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def load_texts(path: Path, category: str, docs: int) -> list[str]:
    """Documents from a Spec-Bench style .jsonl (first turn of each question of `category`) or a text file."""
    if not path.is_file():
        raise LeapError(f"--data: file not found: {path}")
    if path.suffix != ".jsonl":
        return [path.read_text()]
    texts = []
    for _, item in json_lines(path.read_text().splitlines(), f"--data: {path}"):
        if isinstance(item, dict) and item.get("category") == category and item.get("turns"):
            texts.append(item["turns"][0])
    if not texts:
        raise LeapError(f"--data: no questions of category {category!r} in {path}")
    return texts[:docs]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits [T - 1, V] (float32, as it computes them) for a window of token ids."""
    cache = model.new_cache(len(ids))
    x = torch.tensor(ids, device=model.device)  # [T]
    return model.forward(x, torch.arange(len(ids), device=model.device), cache).logits[:-1].float().cpu()


def log_probs(model, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities [T - 1, V] (float64) for a window of token ids."""
    return torch.log_softmax(logits_of(model, ids).double(), dim=-1)


def evaluate(
    source,
    windows: list[list[int]],
    formats: list[Format],
    backend: str,
    kv_caches: tuple[str, ...] = ("float32",),
) -> dict[str, dict]:
    """Scores of the reference (float32 torch, the weights as loaded, a float32 cache) and of every format
    with every key/value cache format, each a runner built from the same opened `source`, one at a time: a
    1.5B model in float32 is 6 GB, and holding every format at once took 22 GB. The reference's logits are
    kept (float32, as computed) to compare with. A window is one forward (its keys and values written to
    the cache, then read back as attention reads them: int8 rows see int8 keys, as in decoding)."""
    from leapdecode.model.backends import build_runner

    specs = [LinearSpec("torch", "none", "float32")]
    specs += [LinearSpec(backend, f.quant, f.activations, kv) for f in formats for kv in kv_caches]
    reference: list[torch.Tensor] = []
    results = {}
    for i, spec in enumerate(specs):
        runner, resolved = build_runner(source, spec)
        score = Score()
        score.extra["weight_mb"] = runner.nbytes / 1e6
        for w, ids in enumerate(windows):
            t0 = time.perf_counter()
            logits = logits_of(runner, ids)
            score.seconds += time.perf_counter() - t0
            if i == 0:
                reference.append(logits)
            ref = torch.log_softmax(reference[w].double(), dim=-1)
            score.add(ref, torch.log_softmax(logits.double(), dim=-1), torch.tensor(ids[1:]))
        results["reference" if i == 0 else resolved.describe()] = score.to_dict()
        del runner
        gc.collect()
    return results


def format_table(results: dict[str, dict]) -> str:
    lines = [
        (
            "| format (backend/quant/activations[/kv cache]) | linear weights MB | perplexity | "
            "mean KL vs float32 | top-1 agreement | forward s |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['weight_mb']:.1f} | {r['perplexity']:.4f} | {r['mean_kl']:.5f} | "
            f"{100 * r['top1_agreement']:.2f}% | {r['forward_s']:.2f} |"
        )
    return "\n".join(lines)


def run(args) -> int:
    from leapdecode.model.source import open_source

    formats = [Format.parse(f) for f in args.formats.split(",") if f.strip()]
    kv_caches = tuple(check_kv_dtype(k.strip()) for k in args.kv_cache.split(",") if k.strip())
    if not kv_caches:
        raise LeapError("--kv-cache: name at least one key/value cache format (float32, int8)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    texts = load_texts(Path(args.data) if args.data else spec_bench_path(), args.category, args.docs)
    source, tokenizer, path = open_source(args.model)
    windows = [ids[: args.max_tokens] for ids in (tokenizer.encode(t) for t in texts) if len(ids) >= 2]
    results = evaluate(source, windows, formats, args.backend, kv_caches)
    if args.json:
        print(json.dumps({"model": path.name, "tokens": results["reference"]["tokens"], "results": results}))
    else:
        print(f"{path.name}: {len(windows)} documents, {results['reference']['tokens']} predicted tokens\n")
        print(format_table(results))
    sys.stdout.flush()
    return 0
