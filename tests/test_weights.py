"""Weight sources: GGUF files (read once, tensors on demand, q/k rows back in Hugging Face order, the
stored blocks unchanged), Hugging Face folders and in-memory state dicts, all checked when opened."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from conftest import random_state, tiny_config
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from leapdecode.errors import LeapError
from leapdecode.model import quant as Q
from leapdecode.model import source as S
from leapdecode.model.gguf import GGUFSource, stored_types
from leapdecode.model.linear import LinearSpec, available_backends
from leapdecode.model.loader import HFSource, build_model
from leapdecode.model.native_runner import build_native
from leapdecode.model.weights import StateSource, WeightSource, expected_shapes, linear_groups


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The q/k row order llama.cpp's converter writes for the llama architecture (its `permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def file_values(source: GGUFSource, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors of a GGUF file dequantized whole by gguf-py, found under the name gguf-py's own name map
    gives, in the file's row order."""
    arch = gguf.MODEL_ARCH[source.arch.upper()]
    gguf_names = gguf.get_tensor_name_map(arch, source.cfg.n_layers)
    tensors = {t.name: t for t in GGUFReader(str(source.path)).tensors}
    out = {}
    for name in names:
        t = tensors[gguf_names.get_name(name, try_suffixes=(".weight", ".bias"))]
        shape = tuple(int(x) for x in reversed(t.shape))
        out[name] = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
    return out


def _in_file_order(name: str, w: torch.Tensor, source: GGUFSource) -> torch.Tensor:
    """A Hugging Face tensor in the row order the file stores it."""
    if source.arch == "llama" and ".q_proj." in name:
        return llama_cpp_permute(w, source.cfg.n_heads)
    if source.arch == "llama" and ".k_proj." in name:
        return llama_cpp_permute(w, source.cfg.n_kv_heads)
    return w


# ---------------------------------------------------------------- the bundled file


@pytest.fixture(scope="module")
def bundled() -> GGUFSource:
    return GGUFSource(S.default_model_path())


def test_bundled_float_tensors_are_the_files_values_in_hf_row_order(bundled):
    assert sorted(bundled.names()) == sorted(expected_shapes(bundled.cfg))
    layers = ("model.layers.0.", f"model.layers.{bundled.cfg.n_layers - 1}.")
    names = [n for n in bundled.names() if not n.startswith("model.layers.") or n.startswith(layers)]
    want = file_values(bundled, names)
    for name in names:
        w = bundled.float(name)
        assert w.dtype == torch.float32 and tuple(w.shape) == expected_shapes(bundled.cfg)[name], name
        assert torch.equal(_in_file_order(name, w, bundled), want[name]), name  # bit-equal


def test_bundled_stored_blocks_hold_the_files_values(bundled):
    types = set()
    for name in [n for group in linear_groups(bundled.cfg) for n in group]:
        qw = bundled.stored(name)
        assert qw is not None, name
        assert torch.equal(Q.dequantize(qw), bundled.float(name)), name
        types.add((bundled.stored_type(name), qw.fmt))
    assert types == {("Q4_1", "q4_1"), ("Q8_0", "q8_0")}  # the file's own formats, repacked unchanged
    assert bundled.stored("model.norm.weight") is None and bundled.stored_type("model.norm.weight") == "F32"


@pytest.mark.skipif("native" not in available_backends(), reason="the native backend is not built here")
def test_tied_embeddings_are_looked_up_in_the_output_layers_own_blocks(bundled):
    """A tied model holds its embeddings once: the lookup reads the output layer's blocks, and its rows
    are the file's values."""
    runner = build_native(bundled, LinearSpec("native", "gguf", "int8").resolve(torch.float32, "cpu", True))
    assert bundled.cfg.tie_embeddings and runner.embed is runner.lm_head.parts[0]
    ids = torch.tensor([0, 7, bundled.cfg.vocab_size - 1])
    assert torch.equal(runner._embed_rows(ids), bundled.float("model.embed_tokens.weight")[ids])


def test_bundled_config_is_the_files(bundled):
    reader = GGUFReader(str(bundled.path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    cfg = bundled.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads) == (
        meta["llama.block_count"],
        meta["llama.embedding_length"],
        meta["llama.attention.head_count"],
    )
    assert cfg.tie_embeddings and bundled.rope_factors is None and isinstance(bundled, WeightSource)
    assert bundled.tokenizer_metadata()["tokenizer.ggml.model"] == meta["tokenizer.ggml.model"]


def test_float_reads_again_on_every_call(bundled):
    name = "model.layers.0.self_attn.q_proj.weight"
    a = bundled.float(name)
    a += 1.0
    assert not torch.equal(bundled.float(name), a)


@pytest.fixture
def count_opens(monkeypatch) -> list[str]:
    """The paths every GGUF header read from now on was read for."""
    from leapdecode.model import gguf_file

    opened: list[str] = []

    class CountingFile(gguf_file.GGUFFile):
        def __init__(self, path, *args, **kwargs):
            opened.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf_file, "GGUFFile", CountingFile)
    return opened


def test_a_load_opens_the_file_once(count_opens):
    from leapdecode.model.backends import load_runner

    source, tok, path = S.open_source(None)
    assert len(count_opens) == 1 and path == S.default_model_path() == source.path and tok.encode("hi")
    build_model(source)  # reads every tensor through the open file
    assert len(count_opens) == 1
    load_runner(None, spec=LinearSpec("torch", "int8"))  # open, resolve the spec, build (rounded weights)
    assert count_opens == [str(path)] * 2


# ---------------------------------------------------------------- written files


def write_gguf(path, state: dict[str, torch.Tensor], cfg, arch="llama", types=None, rename=None) -> None:
    """A GGUF file as llama.cpp's converter writes one (q/k rows permuted for llama); `types` maps a
    Hugging Face name to its stored type (F32 otherwise), `rename` renames tensors in the file."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layers)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_context_length(cfg.max_seq_len)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in state.items():
        data = t.to(torch.float32)
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, cfg.n_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, cfg.n_kv_heads)
        qtype = GGMLQuantizationType[(types or {}).get(name, "F32")]
        arr = data.numpy() if qtype == GGMLQuantizationType.F32 else quantize(data.numpy(), qtype)
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        w.add_tensor((rename or {}).get(gname, gname), arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def as_float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in state.items()}


@pytest.mark.parametrize("arch,qkv_bias", [("llama", False), ("qwen2", True)])
def test_a_written_file_reads_back_as_the_weights_written(tmp_path, arch, qkv_bias):
    cfg = tiny_config(qkv_bias=qkv_bias)
    state = as_float32(random_state(cfg, seed=1))
    q8 = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    write_gguf(tmp_path / "m.gguf", state, cfg, arch, types=dict.fromkeys(q8, "Q8_0"))
    source = GGUFSource(tmp_path / "m.gguf")
    assert source.cfg.norm_eps == pytest.approx(cfg.norm_eps)  # stored as float32
    assert dataclasses.replace(source.cfg, norm_eps=cfg.norm_eps) == cfg
    assert sorted(source.names()) == sorted(state)
    for name, w in state.items():
        if name in q8:  # the stored blocks hold the file's (rounded) values, the float read gives them too
            assert source.stored_type(name) == "Q8_0" and not torch.equal(source.float(name), w)
            assert torch.equal(Q.dequantize(source.stored(name)), source.float(name))
            assert (source.float(name) - w).abs().max() < 0.01
        else:
            assert torch.equal(source.float(name), w), name
    exact = {k: v for k, v in state.items() if k not in q8}
    mixed = {**exact, **{k: source.float(k) for k in q8}}
    a, b = build_model(source).state_dict(), build_model(StateSource(mixed, cfg)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_type_the_kernels_cannot_run_is_read_as_floats_only(tmp_path):
    cfg = tiny_config()
    state = as_float32(random_state(cfg))
    write_gguf(tmp_path / "m.gguf", state, cfg, types={"model.layers.0.mlp.down_proj.weight": "Q5_1"})
    source = GGUFSource(tmp_path / "m.gguf")
    name = "model.layers.0.mlp.down_proj.weight"
    assert source.stored_type(name) == "Q5_1" and source.stored(name) is None
    assert (source.float(name) - state[name]).abs().max() < 0.02
    assert set(stored_types(source.reader).values()) - set(Q.GGUF_TYPES) == {"Q5_1"}


def test_a_missing_tensor_is_named(tmp_path):
    cfg = tiny_config()
    state = as_float32(random_state(cfg))
    del state["model.layers.1.mlp.gate_proj.weight"]
    write_gguf(tmp_path / "m.gguf", state, cfg)
    with pytest.raises(LeapError, match=r"missing: \['model.layers.1.mlp.gate_proj.weight'\]"):
        GGUFSource(tmp_path / "m.gguf")


def test_a_tensor_of_another_model_is_named(tmp_path):
    cfg = tiny_config()
    write_gguf(
        tmp_path / "m.gguf", as_float32(random_state(cfg)), cfg, rename={"blk.0.ffn_up.weight": "blk.0.x"}
    )
    with pytest.raises(LeapError, match="'blk.0.x' is not part of a llama model"):
        GGUFSource(tmp_path / "m.gguf")


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    cfg = tiny_config()
    state = as_float32(random_state(cfg))
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(cfg.intermediate_size + 32, cfg.dim)
    write_gguf(tmp_path / "m.gguf", state, cfg)
    with pytest.raises(LeapError, match=r"model.layers.0.mlp.up_proj.weight has shape \(96, 32\), expected"):
        GGUFSource(tmp_path / "m.gguf")


def test_incomplete_metadata_and_other_files_are_refused(tmp_path):
    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LeapError, match="llama.attention.head_count' is missing"):
        GGUFSource(tmp_path / "m.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    with pytest.raises(LeapError, match="not a readable GGUF file"):
        GGUFSource(tmp_path / "x.gguf")
    (tmp_path / "y.bin").write_bytes(b"nope")
    with pytest.raises(LeapError, match="not a GGUF file"):
        S.open_source(tmp_path / "y.bin")


# ---------------------------------------------------------------- state dicts and Hugging Face folders


def test_state_source_checks_names_and_shapes():
    cfg = tiny_config()
    state = random_state(cfg)
    assert StateSource(state, cfg).float("model.norm.weight").dtype == torch.float64  # values kept
    with pytest.raises(LeapError, match=r"missing: \['lm_head.weight'\]"):
        StateSource({k: v for k, v in state.items() if k != "lm_head.weight"}, cfg)
    with pytest.raises(LeapError, match=r"unexpected: \['extra.weight'\]"):
        StateSource({**state, "extra.weight": torch.zeros(1)}, cfg, name="mine")
    with pytest.raises(LeapError, match=r"mine: tensor model.norm.weight has shape \(3,\), expected \(32,\)"):
        StateSource({**state, "model.norm.weight": torch.zeros(3)}, cfg, name="mine")


def write_hf_folder(folder, cfg, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir()
    config = {
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):  # two shards
        save_file({k: state[k].contiguous() for k in part}, str(folder / f"model-{i}.safetensors"))


def test_a_hugging_face_folder_reads_back_as_written(tmp_path):
    cfg = tiny_config(tie=True)
    state = {k: v.to(torch.bfloat16) for k, v in random_state(cfg, seed=2).items()}
    stray = {"lm_head.weight": state["model.embed_tokens.weight"].clone()}  # tied, yet saved
    write_hf_folder(tmp_path / "m", cfg, {**state, **stray})
    source = HFSource(tmp_path / "m")
    assert source.cfg == cfg and sorted(source.names()) == sorted(state) and source.name == "m"
    for name, w in state.items():
        assert source.float(name).dtype == torch.float32 and torch.equal(source.float(name), w.float())
        assert source.stored(name) is None and source.stored_type(name) == "F32"
    a, b = build_model(source).state_dict(), build_model(StateSource(as_float32(state), cfg)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_hugging_face_folder_with_other_tensors_is_refused(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg)
    write_hf_folder(tmp_path / "m", cfg, {**state, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(LeapError, match="unexpected"):
        HFSource(tmp_path / "m")
    (tmp_path / "n").mkdir()
    with pytest.raises(LeapError, match="no config.json"):
        HFSource(tmp_path / "n")


def test_released_pages_of_a_memory_map_read_back_the_same_bytes(tmp_path):
    """Loading drops a memory map's pages once copied (gguf.release_pages); reading them again must give
    the file's bytes, for aligned, unaligned and tiny views."""
    from leapdecode.model.gguf import release_pages

    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    data.tofile(path)
    mapped = np.memmap(path, mode="r")
    for view in (mapped, mapped[5:9000], mapped[4096:8192], mapped[10:20]):
        before = np.array(view)
        release_pages(view)
        assert np.array_equal(np.array(view), before)
    assert np.array_equal(np.array(mapped), data)


def test_our_gguf_header_reader_agrees_with_gguf_py(bundled):
    """GGUFFile (a light header reader: gguf-py's costs 0.5 GB for a 150k-token vocabulary) gives every
    metadata value and every tensor's type, shape and bytes exactly as gguf-py reads them."""
    from leapdecode.model.gguf_file import GGUFFile

    ours, theirs = GGUFFile(bundled.path), GGUFReader(str(bundled.path))
    assert list(ours.fields) == list(theirs.fields)
    for name, f in theirs.fields.items():
        assert ours.fields[name].contents() == f.contents(), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("damage", ["magic", "truncated", "version"])
def test_a_damaged_gguf_header_is_a_clear_error(bundled, tmp_path, damage):
    raw = bytearray(bundled.path.read_bytes()[: 1 << 20])
    if damage == "magic":
        raw[:4] = b"GGUX"
    elif damage == "version":
        raw[4:8] = (9).to_bytes(4, "little")
    else:
        raw = raw[:100]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(LeapError, match="not a readable GGUF file"):
        GGUFSource(bad)
