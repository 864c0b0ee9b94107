"""Model configuration shared by the GGUF and Hugging Face loaders."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from leapdecode.errors import LeapError


@dataclass(frozen=True)
class RopeScaling:
    """The rope_scaling variants Llama-family checkpoints use: linear and llama3."""

    kind: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("none", "linear", "llama3"):
            raise LeapError(f"unsupported rope scaling {self.kind!r}; expected none, linear or llama3")

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "llama3":
            return self._llama3(inv_freq)
        return inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        mid = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return torch.where(is_mid, mid, out)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    head_dim: int = 0  # 0 = dim // n_heads
    tie_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: RopeScaling = RopeScaling()

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise LeapError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise LeapError(
                f"model config: n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    @staticmethod
    def from_hf(cfg: dict) -> ModelConfig:
        """From a Hugging Face config.json (Llama, Mistral, Qwen2, SmolLM)."""
        arch = cfg.get("model_type", "llama")
        if arch not in ("llama", "mistral", "qwen2"):
            raise LeapError(f"config.json: model_type {arch!r} is not a supported Llama-family model")
        n_heads = cfg["num_attention_heads"]
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            head_dim=cfg.get("head_dim") or 0,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=_hf_rope_scaling(cfg.get("rope_scaling") or cfg.get("rope_parameters")),
        )


def _hf_rope_scaling(rs: dict | None) -> RopeScaling:
    if not rs:
        return RopeScaling()
    kind = rs.get("rope_type", rs.get("type", "none"))
    if kind == "default":
        return RopeScaling()
    return RopeScaling(
        kind=kind,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
    )
