"""Drafters, one module each; importing this package registers them all."""

import importlib

from leapdecode.drafters.base import Drafter, StepResult, available, make_drafter, register

_BUILTIN = ("pld", "suffix", "recycling", "copy", "swift", "draft_model", "auto")
for _name in _BUILTIN:
    try:
        importlib.import_module(f"leapdecode.drafters.{_name}")
    except ModuleNotFoundError as exc:  # a drafter module not written yet must not break the others
        if exc.name != f"leapdecode.drafters.{_name}":
            raise

__all__ = ["Drafter", "StepResult", "available", "make_drafter", "register"]
