"""A compact Llama-family transformer (Llama 2/3, SmolLM, Mistral, Qwen2) for inference.

Every forward takes explicit rope positions and an optional boolean attention mask over
(cache + new tokens), so one call can verify a whole draft tree. Weights are plain tensors in the
Hugging Face layout; q/k/v and gate/up are fused so a layer makes four weight calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leapdecode.cache import KVCache
from leapdecode.model.config import ModelConfig
from leapdecode.model.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [D]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D]
        # Half precision is normalised in float32, as the reference implementation does.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rope(nn.Module):
    """Rotary embeddings in the half-split layout (rotate_half).

    Tables are computed in float32 for float32 and narrower models, exactly as the reference
    implementation does (so logits match it bit for bit), and in float64 for float64 models.
    `freq_factors` are per-frequency divisors (llama3-style GGUFs store them instead of parameters).
    """

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device, freq_factors: torch.Tensor | None = None
    ):
        super().__init__()
        work = torch.float64 if dtype == torch.float64 else torch.float32
        hd = cfg.head_dim
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).to(work) / hd)
        )  # [hd/2]
        inv_freq = cfg.rope_scaling.apply(inv_freq)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.to(work)
        freqs = torch.outer(torch.arange(cfg.max_seq_len, dtype=work), inv_freq)  # [T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, hd]
        self.register_buffer("cos", emb.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype=dtype, device=device), persistent=False)

    cos: torch.Tensor  # [T, hd]
    sin: torch.Tensor  # [T, hd]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [S] -> 2x [S, hd]
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, H, S, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, wqkv: Linear, wo: Linear):
        super().__init__()
        self.wqkv, self.wo = wqkv, wo
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def forward(self, x, cos, sin, cache: KVCache, layer: int, mask):
        b, s, _ = x.shape  # [B, S, D]
        q_size, kv_size = self.n_heads * self.hd, self.n_kv * self.hd
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, s, self.n_heads, self.hd).transpose(1, 2)  # [B, H, S, hd]
        k = k.view(b, s, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(b, s, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, S, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(layer, k, v)  # [B, Hkv, T, hd]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads
        )  # [B, H, S, hd]
        return self.wo(y.transpose(1, 2).reshape(b, s, q_size))  # [B, S, D]


class MLP(nn.Module):
    def __init__(self, w13: Linear, w2: Linear):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D]
        gate, up = self.w13(x).chunk(2, dim=-1)  # 2x [B, S, I]
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, attn_norm: RMSNorm, mlp_norm: RMSNorm):
        super().__init__()
        self.attn, self.mlp, self.attn_norm, self.mlp_norm = attn, mlp, attn_norm, mlp_norm

    def forward(self, x, cos, sin, cache, layer, mask, skip_attn=False, skip_mlp=False):
        if not skip_attn:
            x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        if not skip_mlp:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class Transformer(nn.Module):
    """The reference model as torch modules. `forward` runs the blocks and returns the hidden states;
    `TorchRunner` (leapdecode.model.torch_runner) adds the final norm, the output layer and the plan."""

    def __init__(
        self, cfg: ModelConfig, embed: torch.Tensor, blocks: list[Block], norm: RMSNorm, lm_head: Linear
    ):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(embed, requires_grad=False)  # [V, D]
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.lm_head = norm, lm_head
        self.rope = Rope(cfg, embed.dtype, embed.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | None = None,
        layers: tuple[tuple[bool, bool], ...] | None = None,
        features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """tokens [B, S], positions [S], mask bool [S, cache.length + S] or None (causal); `layers`:
        (skip_attn, skip_mlp) per block. Writes the rows' keys and values at cache slots [length, length +
        S) without advancing `length`. Returns the hidden states [B, S, D] before the final norm; with a
        `features` list, appends every block's output [B, S, D] to it."""
        s, n = tokens.shape[1], cache.length
        x = F.embedding(tokens, self.embed)  # [B, S, D]
        cos, sin = self.rope(positions)  # [S, hd]
        if mask is None and s > 1:
            mask = torch.ones(s, n + s, dtype=torch.bool, device=tokens.device).tril(n)  # causal
        for i, block in enumerate(self.blocks):
            skip_attn, skip_mlp = layers[i] if layers is not None else (False, False)
            x = block(x, cos, sin, cache, i, mask, skip_attn, skip_mlp)
            if features is not None:
                features.append(x)
        return x
