"""The kernels' C interface (kernels/abi.h) against its Python side (kernels/abi.py): the layout check at
load, the status codes and their messages, and errors from inside a kernel call."""

from __future__ import annotations

import ctypes
import re
import types
from pathlib import Path

import pytest
import torch

from leapdecode.errors import LeapError
from leapdecode.kernels import abi, build, native

ISAS = [isa for isa in build.ISAS if build.cpu_problem(isa) is None]  # every build this CPU runs
pytestmark = pytest.mark.skipif(
    not ISAS or build.compiler() is None, reason="the native kernels need AVX2+FMA+F16C and a C++ compiler"
)
HEADER = Path(abi.__file__).with_name("abi.h")
_ABI_FUNCTIONS = (
    "ld_abi_version",
    "ld_status_count",
    "ld_status_name",
    "ld_status_message",
    "ld_abi_code",
    "ld_abi_layout",
    "ld_abi_field",
)


def _struct(name: str, fields: list[tuple]) -> type[ctypes.Structure]:
    """A ctypes struct called `name` (as the check looks it up) with these fields."""
    return type(name, (ctypes.Structure,), {"_fields_": fields})


def _without(cls: type[ctypes.Structure], field: str) -> type[ctypes.Structure]:
    return _struct(cls.__name__, [f for f in cls._fields_ if f[0] != field])


def _retyped(cls: type[ctypes.Structure], field: str, t) -> type[ctypes.Structure]:
    return _struct(cls.__name__, [(n, t if n == field else ft) for n, ft, *_ in cls._fields_])


@pytest.mark.parametrize("isa", ISAS)
def test_every_struct_agrees_with_the_library(isa):
    dll = native.lib(isa)  # loading ran the check already; run it again, struct by struct
    abi.check(dll)
    for cls in abi.STRUCTS:
        assert abi.layout_problem(dll, cls) is None
        assert [f[0] for f in abi.library_fields(dll, cls.__name__)] == [n for n, *_ in cls._fields_]
        assert dll.ld_abi_layout(cls.__name__.encode(), b"sizeof") == ctypes.sizeof(cls)
    assert dll.ld_abi_layout(b"LdForwardArgs", b"threads") == abi.LdForwardArgs.threads.offset
    assert dll.ld_abi_layout(b"LdForwardArgs", b"no_such_field") == -1
    assert dll.ld_abi_layout(b"NoSuchStruct", b"sizeof") == -1


def test_the_header_lists_every_struct_the_package_declares():
    text = HEADER.read_text()
    declared = re.findall(r"^\s*X\((Ld\w+), LD_\w+_FIELDS\)", text, re.MULTILINE)
    assert declared == [cls.__name__ for cls in abi.STRUCTS]
    assert f"#define LD_ABI_VERSION {abi.ABI_VERSION}\n" in text
    assert f"#define LD_MAX_PARTS {abi.MAX_PARTS} " in text


@pytest.mark.parametrize(
    "bad,words",
    [
        # two int32 fields swapped: same offsets and sizes, the names tell
        (
            _struct("LdPart", [abi.LdPart._fields_[1], abi.LdPart._fields_[0], *abi.LdPart._fields_[2:]]),
            "act",
        ),
        (_without(abi.LdInputs, "max_pos"), "max_pos"),  # the last field missing
        (_without(abi.LdForwardArgs, "nfeat"), "nfeat"),  # a middle one: every later offset moves
        (_retyped(abi.LdStack, "eps", ctypes.c_double), "eps"),  # fits the padding: only its size tells
        (_retyped(abi.LdForwardArgs, "threads", ctypes.c_float), "threads"),  # same size, another kind
        (_struct("LdLinear", [*abi.LdLinear._fields_, ("extra", ctypes.c_int64)]), "extra"),
        (_struct("LdBlock", [("qkv", abi.LdPart * 4), *abi.LdBlock._fields_[1:]]), "qkv"),
        (_struct("LdNothing", abi.LdPart._fields_), "no struct LdNothing"),
    ],
)
def test_a_struct_that_differs_from_the_library_is_refused_naming_the_field(bad, words):
    dll = native.lib()
    problem = abi.layout_problem(dll, bad)
    assert problem is not None and bad.__name__ in problem and words in problem
    with pytest.raises(LeapError, match=f"does not match this package: .*{words}"):
        abi.check(dll, [bad])


@pytest.mark.parametrize("isa", ISAS)
def test_format_and_activation_codes_agree_with_the_library(isa):
    dll = native.lib(isa)
    for kind, codes in (("format", abi.FORMAT_CODES), ("act", abi.ACT_CODES)):
        assert {n: dll.ld_abi_code(kind.encode(), n.encode()) for n in codes} == codes
    assert dll.ld_abi_code(b"format", b"q5_1") == -1  # a format the kernels do not run
    wrong = types.SimpleNamespace(**{n: getattr(dll, n) for n in _ABI_FUNCTIONS})
    wrong.ld_abi_code = lambda kind, name: 7 if name == b"int8" else dll.ld_abi_code(kind, name)
    with pytest.raises(LeapError, match="act 'int8' has code 7 in the library, 1 here"):
        abi.check(wrong)


def test_a_library_of_another_version_or_without_the_abi_functions_is_refused():
    dll = native.lib()
    names = [n for n in _ABI_FUNCTIONS if n != "ld_abi_version"]
    other = types.SimpleNamespace(**{n: getattr(dll, n) for n in names}, ld_abi_version=lambda: 3)
    with pytest.raises(LeapError, match=f"ABI version 3, this package {abi.ABI_VERSION}"):
        abi.check(other)
    with pytest.raises(LeapError, match="lacks its ABI description"):
        abi.check(types.SimpleNamespace(ld_abi_version=dll.ld_abi_version))


def test_every_status_has_its_name_and_a_message_and_matches_the_header():
    dll = native.lib()
    table = abi.statuses(dll)
    text = HEADER.read_text()
    block = text[text.index("#define LD_STATUSES(X)") : text.index("enum LdStatus")]
    in_header = re.findall(r"X\((LD_\w+), (-?\d+), \"([^\"]+)\"\)", block)
    assert [(int(c), (n, m)) for n, c, m in in_header] == sorted(table.items(), reverse=True)
    assert table[0] == ("LD_OK", "ok") and len(table) >= 16
    messages = [m for _, m in table.values()]
    assert all(messages) and len(set(messages)) == len(messages)
    unknown = -len(table)
    assert dll.ld_status_name(unknown) is None and abi.status_message(dll, unknown) == "unknown status code"


def _code(name: str) -> int:
    return next(c for c, (n, _) in abi.statuses(native.lib()).items() if n == name)


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_errors_surface_with_the_library_message(isa):
    q = torch.randn(1, 2, 3, 12)  # head_dim 12: not a multiple of 8
    with pytest.raises(LeapError, match="native attention: head_dim must be a multiple of 8"):
        native.attention(q, q, q, isa=isa)
    x, y = torch.randn(2, 40), torch.empty(2, 4)  # a block format with 40 inputs
    with pytest.raises(LeapError, match=r"native linear \(q8_0.*: in_features must be a multiple of 32"):
        native.linear_into(y, x, "q8_0", "int8", 4, 40, isa=isa)
    assert native.status_message(_code("LD_ERR_TOKEN"), isa) == "a token id is outside the vocabulary"


class _Call:
    """A stack call whose checks fail before any weight is read (the weight pointers stay null)."""

    def __init__(self, vocab: int = 16, layers: int = 2, hd: int = 8, tokens=(1, 2)):
        d, h, hkv, inter = 16, 2, 1, 32
        self.blocks = (abi.LdBlock * layers)()
        for b in self.blocks:
            for lin, n, k in (
                (b.qkv, (h + 2 * hkv) * hd, d),
                (b.o, d, h * hd),
                (b.w13, 2 * inter, d),
                (b.w2, d, inter),
            ):
                lin.nparts, lin.N, lin.K = 1, n, k
                lin.parts[0].N, lin.parts[0].K = n, k
        self.stack = abi.LdStack(layers, d, h, hkv, hd, inter, 1e-6, self.blocks)
        self.tokens = torch.tensor(tokens, dtype=torch.int64)
        self.positions = torch.arange(len(tokens))
        self.table = torch.zeros(8, hd)
        self.embed = torch.zeros(vocab, d)
        self.inputs = abi.LdInputs(
            self.tokens.data_ptr(),
            self.embed.data_ptr(),
            vocab,
            self.positions.data_ptr(),
            self.table.data_ptr(),
            self.table.data_ptr(),
            8,
        )
        self.x, self.cache = torch.empty(len(tokens), d), torch.empty(layers, hkv, 8, hd)
        self.seqs = (abi.LdSeq * 2)()  # one sequence of every row, and room for a second
        self.seqs[0] = abi.LdSeq(S=len(tokens), kc=self.cache.data_ptr(), vc=self.cache.data_ptr(), Tmax=8)
        self.args = abi.LdForwardArgs(x=self.x.data_ptr(), S=len(tokens), nseq=1, threads=1)
        self.args.seqs = ctypes.cast(self.seqs, ctypes.POINTER(abi.LdSeq))

    def status(self, args=True) -> str:
        fn = native.lib().ld_stack_forward
        rc = fn(
            ctypes.byref(self.stack), ctypes.byref(self.inputs), ctypes.byref(self.args) if args else None
        )
        return abi.statuses(native.lib())[rc][0]


def test_the_stack_call_checks_its_arguments_and_names_each_failure():
    assert _Call(vocab=2).status() == "LD_ERR_TOKEN"
    assert _Call(hd=12).status() == "LD_ERR_HEAD_DIM"
    assert _Call(tokens=tuple(range(9))).status() == "LD_ERR_CACHE_FULL"
    assert _Call().status(args=False) == "LD_ERR_NULL"
    call = _Call()
    call.blocks[1].w13.nparts = abi.MAX_PARTS + 1
    assert call.status() == "LD_ERR_PARTS"
    call = _Call()
    call.blocks[0].o.K += 1
    assert call.status() == "LD_ERR_LINEAR_SHAPE"
    call = _Call()
    layers = torch.tensor([0, 2])  # block 2 of 2
    call.args.nfeat, call.args.feat_layers, call.args.feats = 2, layers.data_ptr(), call.x.data_ptr()
    assert call.status() == "LD_ERR_FEATURE_LAYER"
    call = _Call()
    call.args.head = ctypes.pointer(call.blocks[0].w2)  # w2 reads I inputs, not D
    assert call.status() == "LD_ERR_LINEAR_SHAPE"


def test_the_stack_call_checks_each_sequence():
    call = _Call()
    call.args.nseq = 2  # the second sequence's rows are missing from the call's
    call.seqs[1] = abi.LdSeq(S=1, kc=call.cache.data_ptr(), vc=call.cache.data_ptr(), Tmax=8)
    assert call.status() == "LD_ERR_SEQ_ROWS"
    call.args.S = 3
    call.seqs[1].n = 8  # its row does not fit after its 8 cached ones
    assert call.status() == "LD_ERR_CACHE_FULL"
    call.seqs[1].n, call.seqs[1].vc = 0, None
    assert call.status() == "LD_ERR_NULL"
    call = _Call()
    call.args.head, call.seqs[0].head_from = ctypes.pointer(call.blocks[0].w2), 3  # past its 2 rows
    assert call.status() == "LD_ERR_HEAD_ROWS"
    call = _Call()
    call.args.seqs = None
    assert call.status() == "LD_ERR_NULL"


def test_the_prefetch_hint_follows_the_cpu_vendor():
    from leapdecode.cpu import vendor

    assert vendor("vendor_id\t: AuthenticAMD\nflags\t: avx2\n") == "AuthenticAMD"
    assert vendor("flags: x\n") == ""
    assert build.hint_flags("AuthenticAMD") == ("-DQ_HINT=_MM_HINT_NTA", "-DF32_HINT=_MM_HINT_NTA")
    assert build.hint_flags("GenuineIntel") == ("-DQ_HINT=_MM_HINT_T1", "-DF32_HINT=_MM_HINT_T1")
    assert build.hint_flags("SomethingElse") == ("-DQ_HINT=_MM_HINT_T1", "-DF32_HINT=_MM_HINT_T1")
    assert set(build.hint_flags()) <= set(build.flags("avx2"))  # every build carries this machine's hint
