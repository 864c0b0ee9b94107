"""Load weights from a GGUF file or a Hugging Face folder into a `Transformer`.

Both sources are mapped to Hugging Face tensor names, checked against the exact key set and shapes the
config implies, and only then assembled (q/k/v and gate/up fused).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from leapdecode.errors import LeapError
from leapdecode.model.config import ModelConfig, RopeScaling
from leapdecode.model.linear import Linear
from leapdecode.model.llama import MLP, Attention, Block, RMSNorm, Rope, Transformer

GGUF_MAGIC = b"GGUF"
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_file(path: Path) -> Path | None:
    """`path` when it is a GGUF file (whose own weight blocks the kernels may run), else None."""
    return path if path.is_file() and is_gguf(path) else None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape, in Hugging Face naming."""
    d, hd, i = cfg.dim, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for n in range(cfg.n_layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (cfg.n_heads * hd, d),
                p + "self_attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
                p + "self_attn.v_proj.weight": (cfg.n_kv_heads * hd, d),
                p + "self_attn.o_proj.weight": (d, cfg.n_heads * hd),
                p + "mlp.gate_proj.weight": (i, d),
                p + "mlp.up_proj.weight": (i, d),
                p + "mlp.down_proj.weight": (d, i),
            }
        )
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.n_heads * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.n_kv_heads * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.n_kv_heads * hd,)
    return shapes


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise LeapError(
            f"{source}: tensor names do not match the model config "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise LeapError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, expected {shape}")


def build_model(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "weights",
) -> Transformer:
    """Check `state` (HF names) against `cfg`, then assemble the fused model."""
    check_state(state, cfg, source)

    def t(name):
        return state[name].to(dtype=dtype, device=device)

    blocks = []
    for n in range(cfg.n_layers):
        p = f"model.layers.{n}."
        a = p + "self_attn."
        wqkv = torch.cat([t(a + "q_proj.weight"), t(a + "k_proj.weight"), t(a + "v_proj.weight")])
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([t(a + "q_proj.bias"), t(a + "k_proj.bias"), t(a + "v_proj.bias")])
        attn = Attention(cfg, Linear(wqkv, bias), Linear(t(a + "o_proj.weight")))
        w13 = torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")])
        mlp = MLP(Linear(w13), Linear(t(p + "mlp.down_proj.weight")))
        blocks.append(
            Block(
                attn,
                mlp,
                RMSNorm(t(p + "input_layernorm.weight"), cfg.norm_eps),
                RMSNorm(t(p + "post_attention_layernorm.weight"), cfg.norm_eps),
            )
        )
    embed = t("model.embed_tokens.weight")
    head = embed if cfg.tie_embeddings else t("lm_head.weight")
    return Transformer(cfg, embed, blocks, RMSNorm(t("model.norm.weight"), cfg.norm_eps), Linear(head)).eval()


# ---------------------------------------------------------------- GGUF


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise LeapError(
            f"GGUF architecture {arch!r} is not supported; expected one of {SUPPORTED_GGUF_ARCHS}"
        )
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    return ModelConfig(
        vocab_size=int(vocab),
        dim=int(_field(reader, f"{arch}.embedding_length")),
        n_layers=int(_field(reader, f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, f"{arch}.context_length", 4096)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", 0) or 0),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        rope_scaling=RopeScaling(
            kind="linear" if scaling_type == "linear" else "none",
            factor=float(_field(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0),
        ),
    )


def dequantize_tensor(t) -> np.ndarray:
    """A GGUF tensor as float32 numpy in PyTorch's [rows, cols] order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists the fastest dimension first
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(t.data).astype(np.float32)
    else:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise LeapError(
                f"GGUF tensor {t.name}: quantization {t.tensor_type.name} is not supported"
            ) from exc
    return arr.reshape(shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split rotary layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_name(name: str) -> str | None:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    if name.startswith("blk."):
        _, n, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{n}.{_GGUF_LAYER_NAMES[rest]}"
    return None


def load_gguf_state(reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    arch = _field(reader, "general.architecture")
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # llama3 frequency factors, stored precomputed
            continue
        name = _gguf_name(t.name)
        if name is None:
            raise LeapError(f"GGUF tensor {t.name!r} is not part of a {arch} model")
        w = torch.from_numpy(dequantize_tensor(t).copy())
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.n_heads)
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.n_kv_heads)
        state[name] = w
    return state


def load_gguf(path: Path, dtype=torch.float32, device="cpu") -> tuple[Transformer, object]:
    """Returns (model, reader); the reader carries the tokenizer metadata."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise LeapError(f"{path}: not a readable GGUF file ({exc})") from exc
    cfg = gguf_config(reader)
    state = load_gguf_state(reader, cfg)
    model = build_model(state, cfg, dtype, device, source=str(path))
    rope_freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if rope_freqs:
        _apply_rope_factors(model, torch.from_numpy(dequantize_tensor(rope_freqs[0]).copy()))
    return model, reader


def _apply_rope_factors(model: Transformer, factors: torch.Tensor) -> None:
    """llama3-style GGUFs store per-frequency divisors instead of rope_scaling parameters."""
    model.rope = Rope(model.cfg, model.dtype, model.device, freq_factors=factors)


# ---------------------------------------------------------------- Hugging Face folder


def load_hf_folder(folder: Path, dtype=torch.float32, device="cpu") -> Transformer:
    from safetensors.torch import load_file

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise LeapError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        cfg = ModelConfig.from_hf(json.loads(cfg_path.read_text()))
    except (KeyError, json.JSONDecodeError) as exc:
        raise LeapError(f"{cfg_path}: malformed config ({exc})") from exc
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LeapError(f"{folder}: no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return build_model(state, cfg, dtype, device, source=str(folder))
