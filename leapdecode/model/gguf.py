"""GGUF files: the one module that reads them.

`GGUFSource(path)` opens a file once (memory-mapped) and gives everything the rest of the code needs from
it: the model config, the tokenizer metadata, the tensors under Hugging Face names, each dequantized to
float32 only when asked for, and a tensor's own blocks as a `QuantWeight` when the kernels run its type
as stored. llama.cpp stores the q/k rows of the llama architecture permuted (interleaved rotary layout);
both paths permute whole rows back, which moves values (or whole blocks) without changing one.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leapdecode.errors import LeapError
from leapdecode.model.config import ModelConfig, RopeScaling
from leapdecode.model.quant import GGUF_TYPES, QuantWeight, from_gguf
from leapdecode.model.weights import check_shapes, is_linear_weight

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
ROPE_FREQS = "rope_freqs.weight"  # llama3 frequency factors, stored precomputed
_LAYER_NAMES = {
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
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_DEQUANT_ROWS = 1024  # rows dequantized at a time: bounds the scratch memory of one tensor


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_file(path: Path) -> Path | None:
    """`path` when it is a GGUF file (whose own weight blocks the kernels may run), else None."""
    return path if path.is_file() and is_gguf(path) else None


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None when it is not a model tensor."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, n, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{n}.{_LAYER_NAMES[rest]}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split rotary layout); works on float
    rows and on rows of raw blocks alike, since only whole rows move."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def required(reader: Any, key: str) -> Any:
    value = field(reader, key)
    if value is None:
        raise LeapError(f"GGUF metadata {key!r} is missing (is this a complete model file?)")
    return value


def gguf_config(reader: Any) -> ModelConfig:
    """The model config a GGUF file's metadata describes."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise LeapError(
            f"GGUF architecture {arch!r} is not supported; expected one of {SUPPORTED_GGUF_ARCHS}"
        )
    names = {t.name for t in reader.tensors}
    n_heads = int(required(reader, f"{arch}.attention.head_count"))
    vocab = field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = field(reader, f"{arch}.rope.scaling.type", "none")
    return ModelConfig(
        vocab_size=int(vocab),
        dim=int(required(reader, f"{arch}.embedding_length")),
        n_layers=int(required(reader, f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        intermediate_size=int(required(reader, f"{arch}.feed_forward_length")),
        norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(field(reader, f"{arch}.context_length", 4096)),
        head_dim=int(field(reader, f"{arch}.attention.key_length", 0) or 0),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        rope_scaling=RopeScaling(
            kind="linear" if scaling_type == "linear" else "none",
            factor=float(field(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0),
        ),
    )


def open_reader(path: Path) -> Any:
    """The file's header (`GGUFFile`: metadata, and tensors memory-mapped: read from disk when touched)."""
    from leapdecode.model.gguf_file import GGUFFile

    try:
        return GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise LeapError(f"{path}: not a readable GGUF file ({exc})") from exc


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(t.shape))  # ggml lists the fastest dimension first


def dequantize_tensor(t: Any) -> np.ndarray:
    """A GGUF tensor as float32 numpy in PyTorch's [rows, cols] order, a few rows at a time (every row
    is dequantized by itself, so the values are those of dequantizing the whole tensor at once)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = _shape(t)
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(t.data).astype(np.float32).reshape(shape)
    rows = t.data.reshape(-1, t.data.shape[-1])  # raw bytes, one tensor row each
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
    try:
        for start in range(0, rows.shape[0], _DEQUANT_ROWS):
            out[start : start + _DEQUANT_ROWS] = dequantize(
                rows[start : start + _DEQUANT_ROWS], t.tensor_type
            )
    except NotImplementedError as exc:
        raise LeapError(f"GGUF tensor {t.name}: quantization {t.tensor_type.name} is not supported") from exc
    return out.reshape(shape)


def stored_types(reader: Any) -> dict[str, str]:
    """The stored type of each linear-layer weight (Hugging Face name -> "Q4_K", "F32", ...), from the
    tensor list alone."""
    types = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is not None and is_linear_weight(name):
            types[name] = t.tensor_type.name
    return types


_MADV_DONTNEED = 4


def release_pages(view: np.ndarray) -> None:
    """Drop the memory map's pages under `view` from this process once its bytes are copied: the file
    stays in the page cache, but the pages no longer count as this process's memory, so loading holds one
    copy of the weights rather than two (peak resident memory of the 1.5B Qwen: BENCHMARKS.md)."""
    page = mmap.PAGESIZE
    start = -(-view.ctypes.data // page) * page
    end = (view.ctypes.data + view.nbytes) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


class GGUFSource:
    """A GGUF file as a `WeightSource`: opened and checked once, tensors read on demand."""

    path: Path | None
    rope_factors: torch.Tensor | None

    def __init__(self, path: str | Path, reader: Any = None):
        """`reader`: the file's header (`GGUFFile`, or gguf-py's reader) when the caller has opened it."""
        self.path = Path(path)
        self.name = self.path.name
        self.reader = open_reader(self.path) if reader is None else reader
        self.cfg = gguf_config(self.reader)
        self.arch = field(self.reader, "general.architecture")
        self._tensors = self._map_names()
        check_shapes({n: _shape(t) for n, t in self._tensors.items()}, self.cfg, str(self.path))
        factors = [t for t in self.reader.tensors if t.name == ROPE_FREQS]
        self.rope_factors = torch.from_numpy(dequantize_tensor(factors[0]).copy()) if factors else None

    def _map_names(self) -> dict[str, Any]:
        tensors = {}
        for t in self.reader.tensors:
            if t.name == ROPE_FREQS:
                continue
            name = hf_name(t.name)
            if name is None:
                raise LeapError(f"{self.path}: GGUF tensor {t.name!r} is not part of a {self.arch} model")
            tensors[name] = t
        return tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def float(self, name: str) -> torch.Tensor:
        w = torch.from_numpy(dequantize_tensor(self._get(name)))
        heads = self._qk_heads(name)
        return w if heads is None else unpermute_qk(w, heads)

    def stored(self, name: str) -> QuantWeight | None:
        t = self._get(name)
        shape = _shape(t)
        if t.tensor_type.name not in GGUF_TYPES or len(shape) != 2:
            return None
        raw = np.array(t.data).reshape(shape[0], -1)  # a copy out of the memory map, one row per row
        release_pages(t.data)
        heads = self._qk_heads(name)
        if heads is not None:
            raw = unpermute_qk(torch.from_numpy(raw), heads).numpy()
        return from_gguf(raw, t.tensor_type.name, *shape)

    def stored_type(self, name: str) -> str:
        return self._get(name).tensor_type.name

    def tokenizer_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` metadata (vocabulary, merges, special ids, chat template)."""
        return {k: f.contents() for k, f in self.reader.fields.items() if k.startswith("tokenizer.")}

    def _get(self, name: str) -> Any:
        if name not in self._tensors:
            raise LeapError(f"{self.path}: no tensor {name!r}")
        return self._tensors[name]

    def _qk_heads(self, name: str) -> int | None:
        """Rows of llama's q and k are stored permuted per head: the head count to undo it with."""
        if self.arch != "llama":
            return None
        if ".self_attn.q_proj." in name:
            return self.cfg.n_heads
        return self.cfg.n_kv_heads if ".self_attn.k_proj." in name else None
