"""Training a drafter head on recorded features: deterministic for a seed, resumable per epoch.

Each epoch visits the training samples in an order drawn from (seed, epoch), steps AdamW every `batch`
samples (warm-up, then cosine decay) and ends with a checkpoint (weights, optimizer, curve), so an
interrupted run resumes at its last finished epoch and ends as an uninterrupted one would. The curve is
the held-out top-1 agreement of the head with the target's next token, per epoch (tokens outside the
trimmed vocabulary count as misses). Matrix products run in bfloat16 (autocast), weights in float32.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leapdecode.drafters.eagle import EagleConfig, EagleLayer
from leapdecode.drafters.medusa import MedusaConfig, MedusaHeads
from leapdecode.errors import LeapError

KINDS = ("eagle", "medusa")


@dataclass(frozen=True)
class TrainConfig:
    kind: str
    epochs: int = 8
    lr: float = 5e-4
    batch: int = 4  # samples per optimizer step
    seed: int = 0
    unroll: int = 3  # eagle: passes over its own predicted features (training-time drafting depth)
    heads: int = 4  # medusa: number of heads
    reg: float = 1.0  # eagle: weight of the feature regression beside the token loss
    bf16: bool = True  # autocast matrix products to bfloat16 (several times faster on CPUs with AMX)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LeapError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("epochs", "batch", "unroll", "heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LeapError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class Example:
    ids: torch.Tensor  # [S] long
    feats: torch.Tensor  # [S, D] float16: the target's hidden states
    start: int  # first generated position


@dataclass
class Target:
    """The target's fixed parts in float32: embeddings [V, D], final norm [D], output rows [N, D] of
    the trimmed vocabulary `vocab` [N], and where each id sits in it (`slot` [V], -1 = not covered)."""

    embed: torch.Tensor
    norm: torch.Tensor
    out: torch.Tensor
    vocab: torch.Tensor
    eps: float
    scale: float  # the features' RMS, so the regression loss is of order one

    @property
    def slot(self) -> torch.Tensor:
        s = torch.full((self.embed.shape[0],), -1, dtype=torch.long)
        s[self.vocab] = torch.arange(len(self.vocab))
        return s

    def __post_init__(self):
        self.out_bf16 = self.out.to(torch.bfloat16)  # converted once, not at every product

    def head(self, h: torch.Tensor) -> torch.Tensor:  # [S, D] after the final norm -> [S, N]
        if torch.is_autocast_enabled("cpu"):
            return h.to(torch.bfloat16) @ self.out_bf16.T
        return h @ self.out.to(h.dtype).T

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [S, D] features -> [S, N]
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.head(self.norm * h)


def labels_at(ex: Example, slot: torch.Tensor, ahead: int, rows: int) -> torch.Tensor:
    """Label of row j = the slot of token j + ahead when it was generated, else -100; [rows]."""
    lab = torch.full((rows,), -100, dtype=torch.long)
    j = torch.arange(rows)
    ok = (j + ahead < len(ex.ids)) & (j + ahead >= ex.start)
    covered = slot[ex.ids[j[ok] + ahead]]
    lab[ok] = covered.masked_fill(covered < 0, -101)  # generated but outside the trimmed vocabulary: a miss
    return lab


def unroll_mask(n: int, p: int) -> torch.Tensor:
    """Attention of pass p's rows over passes 1..p (each n rows): row j sees the true rows up to
    j - p + 1 and, of each later pass q, row j - p + q (its chain of own predictions); [n, p * n]."""
    j = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    parts = [c <= j - p + 1] + [c == j - p + q for q in range(2, p + 1)]
    return torch.cat(parts, 1)


def eagle_losses(layer: EagleLayer, t: Target, ex: Example, cfg: TrainConfig, slot) -> list[tuple]:
    """Per pass: (loss, predictions, labels) over the rows that pass can use."""
    f = ex.feats.float()  # [S, D]
    n = len(ex.ids) - 1
    emb = t.embed[ex.ids[1:]]  # [n, D]: embedding of the next token
    pos = torch.arange(n)
    labels = labels_at(ex, slot, 2, n)  # row j predicts token j + 2
    feat_in, keys, values, out = f[:-1], [], [], []
    for p in range(1, cfg.unroll + 1):
        x, q, k, v = layer.project(feat_in, emb, pos)
        keys.append(k)
        values.append(v)
        o = layer.finish(x, q, torch.cat(keys, 1), torch.cat(values, 1), unroll_mask(n, p))  # [n, D]
        valid = pos >= p - 1
        lab = torch.where(valid, labels, torch.full_like(labels, -100))
        use = lab != -100
        logits = t.logits(o[use])  # [U, N]
        ce = F.cross_entropy(logits.float(), lab[use].clamp(min=-100).masked_fill(lab[use] < 0, -100))
        reg = F.smooth_l1_loss(o[valid].float() / t.scale, f[1:][valid] / t.scale)
        loss = (0.0 if math.isnan(ce.item()) else ce) + cfg.reg * reg
        out.append((loss, logits.detach().argmax(-1) if not layer.training else None, lab[use]))
        feat_in = torch.cat([o[:1], o[:-1]])  # row j now reads its predecessor's prediction
    return out


def medusa_losses(heads: MedusaHeads, t: Target, ex: Example, cfg: TrainConfig, slot) -> list[tuple]:
    f = ex.feats.float()
    h = t.norm * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + t.eps))  # [S, D]
    z = heads(h)  # [K, S, D]
    out = []
    for i in range(cfg.heads):
        lab = labels_at(ex, slot, i + 2, len(ex.ids))
        use = lab != -100
        logits = t.head(z[i][use])  # [U, N]
        ce = F.cross_entropy(logits.float(), lab[use].masked_fill(lab[use] < 0, -100))
        pred = logits.detach().argmax(-1) if not heads.training else None
        out.append((0.0 if math.isnan(ce.item()) else ce, pred, lab[use]))
    return out


def build_module(cfg: TrainConfig, model_cfg) -> tuple[nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    if cfg.kind == "eagle":
        ec = EagleConfig(
            model_cfg.dim, model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.head_dim,
            model_cfg.intermediate_size, model_cfg.norm_eps, model_cfg.rope_theta,
        )  # fmt: skip
        return EagleLayer(ec), ec.__dict__
    mc = MedusaConfig(model_cfg.dim, cfg.heads)
    return MedusaHeads(mc), mc.__dict__


LOSSES: dict[str, Callable[..., list[tuple]]] = {"eagle": eagle_losses, "medusa": medusa_losses}


def agreement(module, t: Target, examples: list[Example], cfg: TrainConfig) -> list[float]:
    """Held-out top-1 agreement per pass (eagle: drafting depth) or per head (medusa)."""
    slot = t.slot
    hits = counts = torch.zeros(cfg.unroll if cfg.kind == "eagle" else cfg.heads)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
        for ex in examples:
            res = LOSSES[cfg.kind](module, t, ex, cfg, slot)
            h = torch.tensor([float((pred == lab).sum()) for _, pred, lab in res])
            c = torch.tensor([float(len(lab)) for _, _, lab in res])
            hits, counts = hits + h, counts + c
    return (hits / counts.clamp(min=1)).tolist()


def train(
    module: nn.Module,
    t: Target,
    train_set: list[Example],
    held: list[Example],
    cfg: TrainConfig,
    ckpt: Path,
    progress: Callable[[int, int], Callable[[int], None]],
    say: Callable[[str], None],
) -> list[dict]:
    """Train `module` in place; returns the curve (one dict per epoch)."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    total = cfg.epochs * math.ceil(len(train_set) / cfg.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    curve, first = [], 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        curve, first = state["curve"], state["epoch"]
        say(f"resuming after epoch {first}")
    slot = t.slot
    for epoch in range(first, cfg.epochs):
        order = torch.randperm(
            len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        )
        tick = progress(epoch, len(order))
        module.train()
        total_loss = 0.0
        for i, idx in enumerate(order.tolist()):
            with torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
                res = LOSSES[cfg.kind](module, t, train_set[idx], cfg, slot)
            loss = sum(r[0] for r in res) / len(res)
            if isinstance(loss, torch.Tensor):
                (loss / cfg.batch).backward()
                total_loss += loss.item()
            if (i + 1) % cfg.batch == 0 or i + 1 == len(order):
                nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            tick(1)
        module.eval()
        acc = agreement(module, t, held, cfg)
        curve.append({"epoch": epoch + 1, "loss": total_loss / len(order), "top1": acc})
        say(
            f"epoch {epoch + 1}: loss {total_loss / len(order):.3f}, held-out top-1 "
            + " ".join(f"{a:.3f}" for a in acc)
        )
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "module": module.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "curve": curve,
                "epoch": epoch + 1,
            },
            tmp,
        )
        tmp.replace(ckpt)
    return curve


def save_curve(path: Path, curve: list[dict]) -> None:
    path.write_text(json.dumps(curve, indent=1) + "\n")
