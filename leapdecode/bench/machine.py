"""What a benchmark ran on: the report states it next to every number."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata

import torch

from leapdecode.cpu import cpu_flags, cpu_model, physical_cores

__all__ = ["cpu_flags", "cpu_model", "describe_machine", "package_version", "physical_cores"]


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(engine) -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": torch.get_num_threads(),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "backend": engine.backend,
        "kernels": engine.kernels,
        "model": engine.name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "leapdecode": package_version("leapdecode"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
