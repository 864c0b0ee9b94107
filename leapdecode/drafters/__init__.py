"""Drafters, one module each; importing this package registers them all."""

import importlib

from leapdecode.draft import StepResult
from leapdecode.drafters.base import Drafter, DrafterHost, RequestContext, available, make_drafter, register

_BUILTIN = ("pld", "suffix", "recycling", "copy", "swift", "draft_model", "eagle", "medusa", "auto")
for _name in _BUILTIN:
    importlib.import_module(f"leapdecode.drafters.{_name}")

__all__ = ["Drafter", "DrafterHost", "RequestContext", "StepResult", "available", "make_drafter", "register"]
