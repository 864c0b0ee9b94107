"""The kernels' C interface on the Python side: the structs of abi.h declared once, and the check, when
the library loads, that they agree with the library's own layout.

abi.h is the one description of the interface. The library reports its version (`ld_abi_version`), the
layout of every struct it takes (`ld_abi_field`: each field's name, offset, size and kind, in order), the
codes of the weight formats, activation types and key/value cache formats (`ld_abi_code`) and the
message of every status it returns (`ld_status_message`). `check` compares the structs below with that
report, so a struct edited on one side only is an error naming the struct and the field when the
library is loaded, never a kernel reading the wrong bytes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

from leapdecode.errors import LeapError

ABI_VERSION = 7  # LD_ABI_VERSION in abi.h
MAX_PARTS = 4  # LD_MAX_PARTS
FORMAT_CODES = {"f32": 0, "q8_0": 1, "q4_1": 2, "q4_k": 3, "q5_k": 4, "q6_k": 5, "q5_0": 6}  # LD_FORMATS
ACT_CODES = {"float32": 0, "int8": 1}  # LD_ACTS: LdPart.act
KV_CODES = {"float32": 0, "int8": 1}  # LD_KV_FORMATS: LdSeq.kv_fmt

_I32, _I64, _F32, _P = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class LdPart(ctypes.Structure):
    _fields_ = [
        ("fmt", _I32),
        ("act", _I32),
        ("N", _I64),
        ("K", _I64),
        ("col", _I64),
        ("qs", _P),
        ("d", _P),
        ("m", _P),
        ("f", _P),
    ]


class LdLinear(ctypes.Structure):
    _fields_ = [("nparts", _I64), ("N", _I64), ("K", _I64), ("parts", LdPart * MAX_PARTS), ("bias", _P)]


class LdBlock(ctypes.Structure):
    _fields_ = [
        ("qkv", LdLinear),
        ("o", LdLinear),
        ("w13", LdLinear),
        ("w2", LdLinear),
        ("attn_norm", _P),
        ("mlp_norm", _P),
    ]


class LdStack(ctypes.Structure):
    _fields_ = [
        ("L", _I64),
        ("D", _I64),
        ("H", _I64),
        ("Hkv", _I64),
        ("hd", _I64),
        ("I", _I64),
        ("eps", _F32),
        ("blocks", ctypes.POINTER(LdBlock)),
    ]


class LdInputs(ctypes.Structure):
    _fields_ = [
        ("tokens", _P),
        ("embed", _P),
        ("vocab", _I64),
        ("positions", _P),
        ("cos_table", _P),
        ("sin_table", _P),
        ("max_pos", _I64),
    ]


class LdSeq(ctypes.Structure):
    _fields_ = [
        ("S", _I64),
        ("n", _I64),
        ("kc", _P),
        ("vc", _P),
        ("ks", _P),
        ("vs", _P),
        ("kv_fmt", _I64),
        ("Tmax", _I64),
        ("mask", _P),
        ("mask_stride", _I64),
        ("head_from", _I64),
    ]


class LdForwardArgs(ctypes.Structure):
    _fields_ = [
        ("x", _P),
        ("S", _I64),
        ("seqs", ctypes.POINTER(LdSeq)),
        ("nseq", _I64),
        ("skip", _P),
        ("norm_w", _P),
        ("norm_eps", _F32),
        ("head", ctypes.POINTER(LdLinear)),
        ("logits", _P),
        ("nfeat", _I64),
        ("feat_layers", _P),
        ("feats", _P),
        ("threads", _I32),
    ]


STRUCTS: tuple[type[ctypes.Structure], ...] = (
    LdPart,
    LdLinear,
    LdBlock,
    LdStack,
    LdInputs,
    LdSeq,
    LdForwardArgs,
)


def bind(dll: ctypes.CDLL) -> None:
    """Declares the signatures of the library's ABI functions (see abi.h)."""
    dll.ld_abi_version.restype = ctypes.c_int
    dll.ld_status_count.restype = ctypes.c_int
    dll.ld_status_name.argtypes = [ctypes.c_int]
    dll.ld_status_name.restype = ctypes.c_char_p
    dll.ld_status_message.argtypes = [ctypes.c_int]
    dll.ld_status_message.restype = ctypes.c_char_p
    dll.ld_abi_code.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    dll.ld_abi_code.restype = ctypes.c_int
    dll.ld_abi_layout.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    dll.ld_abi_layout.restype = _I64
    dll.ld_abi_field.argtypes = [ctypes.c_char_p, _I64, _P, _P, _P]  # byref of c_int64, c_int64, c_char
    dll.ld_abi_field.restype = ctypes.c_char_p


def status_message(dll: ctypes.CDLL, code: int) -> str:
    """The library's message for status `code` (see LD_STATUSES in abi.h)."""
    return dll.ld_status_message(code).decode()


def statuses(dll: ctypes.CDLL) -> dict[int, tuple[str, str]]:
    """Every status the library returns: code -> (enumerator name, message)."""
    return {
        -i: (dll.ld_status_name(-i).decode(), status_message(dll, -i)) for i in range(dll.ld_status_count())
    }


def _kind(t: type) -> str:
    """abi.h's kind of a ctypes field type: 'i', 'f', 'p' or 's' (a struct or an array of them)."""
    while issubclass(t, ctypes.Array):
        t = t._type_  # type: ignore[assignment]  # an array's element type
    if issubclass(t, ctypes.Structure):
        return "s"
    if issubclass(t, (ctypes._Pointer, ctypes.c_void_p, ctypes.c_char_p)):
        return "p"
    return "f" if t in (ctypes.c_float, ctypes.c_double) else "i"


def library_fields(dll: ctypes.CDLL, name: str) -> list[tuple[str, int, int, str]]:
    """The fields of struct `name` as the library lays it out: (name, offset, size, kind), in order."""
    fields, i = [], 0
    offset, size, kind = _I64(), _I64(), ctypes.c_char()
    out = (ctypes.byref(offset), ctypes.byref(size), ctypes.byref(kind))
    while (field := dll.ld_abi_field(name.encode(), i, *out)) is not None:
        fields.append((field.decode(), offset.value, size.value, kind.value.decode()))
        i += 1
    return fields


def _fields(cls: type[ctypes.Structure]) -> list[tuple[str, int, int, str]]:
    return [
        (name, getattr(cls, name).offset, getattr(cls, name).size, _kind(t)) for name, t, *_ in cls._fields_
    ]


def layout_problem(dll: ctypes.CDLL, cls: type[ctypes.Structure], name: str | None = None) -> str | None:
    """How ctypes struct `cls` differs from the library's struct `name` (default: the class's name), or
    None when they agree in size and in every field's name, offset, size and kind."""
    name = name or cls.__name__
    theirs, ours = library_fields(dll, name), _fields(cls)
    if not theirs:
        return f"the library has no struct {name}"
    for i in range(max(len(theirs), len(ours))):
        if i >= len(theirs) or i >= len(ours):
            extra = ours[i][0] if i < len(ours) else theirs[i][0]
            side = "here only" if i < len(ours) else "in the library only"
            return f"struct {name} field {extra!r}: {side}"
        if theirs[i][0] != ours[i][0]:
            return f"struct {name} field {i}: {theirs[i][0]!r} in the library, {ours[i][0]!r} here"
        if theirs[i] != ours[i]:
            return (
                f"struct {name} field {ours[i][0]!r}: (offset, size, kind) {theirs[i][1:]} in the library, "
                f"{ours[i][1:]} here"
            )
    size = dll.ld_abi_layout(name.encode(), b"sizeof")
    if size != ctypes.sizeof(cls):
        return f"struct {name}: sizeof {size} in the library, {ctypes.sizeof(cls)} here"
    return None


def check(dll: ctypes.CDLL, structs: Iterable[type[ctypes.Structure]] = STRUCTS) -> None:
    """Raises LeapError unless the library speaks this ABI: its version, the weight format, activation and
    key/value cache codes, and every struct's layout."""
    try:
        bind(dll)
        version = dll.ld_abi_version()
    except AttributeError as exc:  # a library from before the checked ABI
        raise LeapError(f"the native kernels' library lacks its ABI description ({exc})") from exc
    if version != ABI_VERSION:
        raise LeapError(f"the native kernels' library has ABI version {version}, this package {ABI_VERSION}")
    for kind, codes in (("format", FORMAT_CODES), ("act", ACT_CODES), ("kv", KV_CODES)):
        for name, code in codes.items():
            theirs = dll.ld_abi_code(kind.encode(), name.encode())
            if theirs != code:
                raise LeapError(
                    f"the native kernels' library does not match this package: {kind} {name!r} has code "
                    f"{theirs} in the library, {code} here"
                )
    for cls in structs:
        problem = layout_problem(dll, cls)
        if problem:
            raise LeapError(f"the native kernels' library does not match this package: {problem}")
