"""Build the torch `Transformer` from a `WeightSource`, and read Hugging Face folders (`HFSource`).

`build_model` pulls one tensor at a time from the source (q/k/v and gate/up fused as it goes), so the
float model is the only full copy of the weights in memory. GGUF files are read by
`leapdecode.model.gguf`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from leapdecode.errors import LeapError
from leapdecode.model.config import ModelConfig
from leapdecode.model.gguf import gguf_config, gguf_file
from leapdecode.model.linear import Linear
from leapdecode.model.llama import MLP, Attention, Block, RMSNorm, Rope, Transformer
from leapdecode.model.quant import QuantWeight
from leapdecode.model.weights import (
    DOWN,
    EMBED,
    GATE_UP,
    LAYER_NORMS,
    LM_HEAD,
    NORM,
    QKV,
    WO,
    WeightSource,
    check_shapes,
    expected_shapes,
    layer_prefix,
)

# Re-exported for callers that still import them from here.
__all__ = ["HFSource", "build_model", "expected_shapes", "gguf_config", "gguf_file", "hf_config"]


def build_model(
    source: WeightSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """The fused float model of `source`'s weights, in `dtype` on `device`."""

    def t(name: str) -> torch.Tensor:
        return source.float(name).to(dtype=dtype, device=device)

    cfg = source.cfg
    blocks = [_block(cfg, layer_prefix(n), t) for n in range(cfg.n_layers)]
    embed = t(EMBED)
    head = embed if cfg.tie_embeddings else t(LM_HEAD)
    model = Transformer(cfg, embed, blocks, RMSNorm(t(NORM), cfg.norm_eps), Linear(head)).eval()
    if source.rope_factors is not None:  # llama3-style GGUFs store per-frequency divisors instead
        model.rope = Rope(cfg, model.dtype, model.device, freq_factors=source.rope_factors)
    return model


def _block(cfg: ModelConfig, p: str, t: Callable[[str], torch.Tensor]) -> Block:
    wqkv = torch.cat([t(p + x + ".weight") for x in QKV])
    bias = torch.cat([t(p + x + ".bias") for x in QKV]) if cfg.qkv_bias else None
    attn = Attention(cfg, Linear(wqkv, bias), Linear(t(p + WO + ".weight")))
    mlp = MLP(Linear(torch.cat([t(p + x + ".weight") for x in GATE_UP])), Linear(t(p + DOWN + ".weight")))
    norms = [RMSNorm(t(p + x), cfg.norm_eps) for x in LAYER_NORMS]
    return Block(attn, mlp, *norms)


# ---------------------------------------------------------------- Hugging Face folder


def hf_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise LeapError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return ModelConfig.from_hf(json.loads(cfg_path.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise LeapError(f"{cfg_path}: malformed config ({exc})") from exc


class HFSource:
    """A Hugging Face folder (config.json, *.safetensors) as a `WeightSource`; tensors are read from the
    files when asked for."""

    rope_factors: torch.Tensor | None = None  # rope scaling comes from config.json
    path: Path | None

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.name = self.path.name
        self.cfg = hf_config(self.path)
        self._files, shapes = self._index(self.path)
        check_shapes(shapes, self.cfg, str(self.path))

    def _index(self, folder: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
        """Which file holds each tensor the model uses, and its shape (read from the headers)."""
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise LeapError(f"{folder}: no *.safetensors weight files")
        where, shapes = {}, {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                for name in [k for k in f.keys() if self._used(k)]:  # noqa: SIM118 (not a dict)
                    where[name], shapes[name] = file, tuple(f.get_slice(name).get_shape())
        return where, shapes

    def _used(self, name: str) -> bool:
        """Tied checkpoints may still carry lm_head; older ones carry rotary tables: both unused."""
        tied_head = self.cfg.tie_embeddings and name == LM_HEAD
        return not (tied_head or name.endswith("rotary_emb.inv_freq"))

    def names(self) -> list[str]:
        return list(self._files)

    def float(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._files:
            raise LeapError(f"{self.path}: no tensor {name!r}")
        with safe_open(str(self._files[name]), "pt") as f:
            return f.get_tensor(name).to(torch.float32)

    def stored(self, name: str) -> QuantWeight | None:
        return None

    def stored_type(self, name: str) -> str:
        return "F32"
