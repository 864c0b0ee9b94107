"""Checks of integer options, one wording for all: configuration fields, drafter options, CLI flags.

`check_int` validates a value already in hand (a dataclass field, a keyword argument) and raises a
`LeapError` naming it; `int_at_least` is the argparse type of a flag, whose errors argparse prints as
`argument --flag: expected an integer >= 1, got '0'`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from leapdecode.errors import LeapError


def _expected(low: int, high: int | None) -> str:
    return f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"


def is_int_in(value: object, low: int, high: int | None = None) -> bool:
    """Whether `value` is an integer (not a bool) in [low, high]; high None: no upper bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return low <= value and (high is None or value <= high)


def check_int(what: str, value: object, low: int = 1, high: int | None = None) -> int:
    """`value` when it is an integer in [low, high]; else a LeapError naming `what`."""
    if not is_int_in(value, low, high):
        raise LeapError(f"{what} must be {_expected(low, high)}, got {value!r}")
    assert isinstance(value, int)  # for the type checker: is_int_in said so
    return value


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: the flag's text as an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_expected(low, high)}, got {text!r}") from None
        if not is_int_in(value, low, high):
            raise argparse.ArgumentTypeError(f"expected {_expected(low, high)}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
