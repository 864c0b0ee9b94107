"""Build the compiled CPU kernels once per machine and cache the shared library.

The kernels are one C++ source (with two headers) without Python or torch headers, so a build takes a
few seconds with the system compiler and needs nothing from the network. There is a build per
instruction set (AVX2; AVX-512 VNNI where the CPU has it; AVX-512 with Intel AMX int8 tiles where the CPU
has them and the OS grants this process their register state); a library's name carries a hash of the
sources, the flags and the compiler, so an edited source or another compiler never reuses a stale build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from leapdecode.cpu import flag_set, vendor
from leapdecode.errors import LeapError

SOURCE = Path(__file__).with_name("native.cpp")
HEADERS = tuple(
    Path(__file__).with_name(h)
    for h in ("abi.h", "pool.h", "vnni512.h", "kquant.h", "amx.h", "attention.h", "stack.h")
)
BASE_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-pthread", "-shared", "-fPIC")
_AVX512 = (
    ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
    ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
)
# Instruction sets, best last: compiler flags and the /proc/cpuinfo flags they need.
ISAS = {
    "avx2": (("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
    "avx512": _AVX512,
    "amx": (_AVX512[0] + ("-mamx-tile", "-mamx-int8"), _AVX512[1] + ("amx_tile", "amx_int8")),
}

# Linux keeps the AMX tile registers off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM for
# XFEATURE_XTILEDATA); an AMX instruction before that kills the process.
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.cache
def amx_permission() -> str | None:
    """Ask the OS once for the AMX tile data state: None when granted, else why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError) as exc:
        return f"cannot ask the OS for the AMX tile state ({exc})"
    if rc != 0:
        return f"the OS refused the AMX tile state (arch_prctl: {os.strerror(ctypes.get_errno())})"
    return None


def cache_dir() -> Path:
    """LEAPDECODE_CACHE, else $XDG_CACHE_HOME/leapdecode, else ~/.cache/leapdecode."""
    if os.environ.get("LEAPDECODE_CACHE"):
        return Path(os.environ["LEAPDECODE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "leapdecode"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_problem(isa: str = "avx2") -> str | None:
    """Why this CPU cannot run the `isa` build of the kernels, or None when it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU (this is {platform.machine()})"
    flags = flag_set()
    if flags is None:
        return "cannot read /proc/cpuinfo to check the CPU's instruction sets"
    missing = [f for f in ISAS[isa][1] if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return amx_permission() if isa == "amx" else None


def best_isa() -> str:
    """LEAPDECODE_ISA (avx2, avx512 or amx) when set, else the best build this CPU runs."""
    forced = os.environ.get("LEAPDECODE_ISA")
    if forced:
        if forced not in ISAS:
            raise LeapError(f"LEAPDECODE_ISA={forced!r}: expected one of {', '.join(ISAS)}")
        return forced
    return next((isa for isa in reversed(ISAS) if cpu_problem(isa) is None), "avx2")


# The software prefetch hint of the weight streams, per CPU vendor. Measured with builds alternating
# (BENCHMARKS.md): on the AMD EPYC hosts the non-temporal hint (NTA) made one-token steps 0.91-0.98x the
# time of T0; on the Intel Xeon it held the streams to about half the read bandwidth, where L2 (T1)
# reaches it (float32 layers of the bundled model 0.37-0.48x the time of NTA, the K-quant ones 0.55x).
PREFETCH_HINTS = {"GenuineIntel": "_MM_HINT_T1", "AuthenticAMD": "_MM_HINT_NTA"}


def hint_flags(cpu_vendor: str | None = None) -> tuple[str, ...]:
    """Compiler flags choosing the weight streams' prefetch hint for this CPU's vendor (others: T1)."""
    hint = PREFETCH_HINTS.get(vendor() if cpu_vendor is None else cpu_vendor, "_MM_HINT_T1")
    return (f"-DQ_HINT={hint}", f"-DF32_HINT={hint}")


def flags(isa: str) -> tuple[str, ...]:
    return BASE_FLAGS + ISAS[isa][0] + hint_flags()


def _library_path(cxx: str, isa: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    text = b"".join(p.read_bytes() for p in (SOURCE, *HEADERS))
    digest = hashlib.sha256(text + " ".join(flags(isa)).encode() + version.encode()).hexdigest()
    return cache_dir() / f"leapdecode-native-{isa}-{digest[:16]}.so"


def build(isa: str | None = None) -> Path:
    """The path of the compiled library for `isa` (default: `best_isa()`), compiling it first if this
    machine has no cached build."""
    isa = isa or best_isa()
    problem = cpu_problem(isa)
    if problem:
        raise LeapError(f"backend 'native' ({isa}) is not available: {problem}")
    cxx = compiler()
    if cxx is None:
        raise LeapError("backend 'native' needs a C++ compiler (g++ or clang++, or set CXX)")
    out = _library_path(cxx, isa)
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    except OSError as exc:
        raise LeapError(
            f"cannot write the native kernels to {out.parent} ({exc}); set LEAPDECODE_CACHE "
            f"to a writable folder"
        ) from exc
    os.close(fd)
    try:
        run = subprocess.run(
            [cxx, *flags(isa), "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            raise LeapError(f"building the native kernels failed:\n{run.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builds never see a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
