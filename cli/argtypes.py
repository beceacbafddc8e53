"""argparse types for numbers: a bad value is a usage error (exit 64) before anything starts,
not a failure minutes later (a zero timeout, a negative duration, ``nan``)."""

from __future__ import annotations

import argparse
import math


def _number(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{value!r}: give a finite number")
    return x


def positive(value: str) -> float:
    """Seconds above 0 (durations, timeouts, gap caps)."""
    x = _number(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number above 0")
    return x


def non_negative(value: str) -> float:
    """Seconds, 0 allowed (a settle time)."""
    x = _number(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of 0 or more")
    return x


def positive_int(value: str) -> int:
    """A count or a size above 0."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number above 0")
    return n
