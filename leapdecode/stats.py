"""Per-request statistics of generation. See `leapdecode.draft` for "accepted" and "bonus"."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not prefilled)
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # verification forwards after prefill
    drafted: int = 0  # draft nodes sent to the target
    accepted: int = 0  # draft nodes accepted (bonus tokens excluded)
    draft_s: float = 0.0  # proposing and learning from each step (propose + observe)
    verify_s: float = 0.0  # the verification forward, acceptance and cache compaction
    accepted_by_depth: list[int] = field(default_factory=list)  # [d] = steps that accepted >= d+1 nodes
    drafter: str = "none"
    backend: str = "torch"
    kernels: str = "torch"  # the compiled kernels' instruction set (avx512, avx2), or torch
    finish_reason: str = ""

    def observe_step(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.draft_s += draft_s
        self.verify_s += verify_s
        while len(self.accepted_by_depth) < accepted:
            self.accepted_by_depth.append(0)
        for d in range(accepted):
            self.accepted_by_depth[d] += 1

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per verification step, the bonus token included (1.0 = plain decoding)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the whole request, prefill included."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            mean_accepted=round(self.mean_accepted, 4),
            decode_tokens_per_s=round(self.decode_tokens_per_s, 3),
            tokens_per_s=round(self.tokens_per_s, 3),
        )
        return d
