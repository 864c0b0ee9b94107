"""What the CPU is, read from /proc/cpuinfo: its model name, physical cores and instruction-set flags.

Light on purpose (standard library only): the kernel build asks it which instruction sets to compile
for, and the benchmark report states it next to every number.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The vector extensions that decide kernel speed, as a report lists them.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def read_cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, or None where it cannot be read (not Linux, a sandbox)."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def _fields(cpuinfo: str | None, key: str) -> list[str]:
    """Every value of `key`, in order, from `cpuinfo` (default: this machine's)."""
    text = cpuinfo if cpuinfo is not None else read_cpuinfo() or ""
    values = []
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            values.append(value.strip())
    return values


def cpu_model(cpuinfo: str | None = None) -> str:
    names = [v for v in _fields(cpuinfo, "model name") if v]
    return names[0] if names else platform.processor() or platform.machine() or "unknown"


def physical_cores(cpuinfo: str | None = None) -> int | None:
    """Distinct (physical id, core id) pairs; None when the file does not say."""
    text = cpuinfo if cpuinfo is not None else read_cpuinfo() or ""
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def vendor(cpuinfo: str | None = None) -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...), or "" where the file does not say."""
    names = _fields(cpuinfo, "vendor_id")
    return names[0] if names else ""


def flag_set(cpuinfo: str | None = None) -> frozenset[str] | None:
    """Every instruction-set flag of the first CPU; None when /proc/cpuinfo cannot be read."""
    if cpuinfo is None and (cpuinfo := read_cpuinfo()) is None:
        return None
    flags = _fields(cpuinfo, "flags")
    return frozenset(flags[0].split()) if flags else frozenset()


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The vector extensions that decide kernel speed (AVX2, FMA, AVX-512, AMX) this CPU has."""
    flags = flag_set(cpuinfo) or frozenset()
    return [f for f in VECTOR_FLAGS if f in flags]
