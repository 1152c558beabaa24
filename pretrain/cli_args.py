"""argparse ``type`` functions shared by the project's command lines (demo, plan, sample, chat).

A bad value is refused while parsing, with argparse's one ``error:`` line naming the option, before
any work starts: zero or negative counts failed later in a child process or divided by zero, and NaN
fails every comparison, so it slipped past range checks into sampling and figures.
(``data_tools`` keeps its own: it and ``pretrain`` do not import each other.)
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def whole_number(minimum: int) -> Callable[[str], int]:
    """An integer option of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value
    return parse


def finite_number(low: float = -math.inf, high: float = math.inf) -> Callable[[str], float]:
    """A float option in [low, high]; NaN and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            what = "a finite number" if (low, high) == (-math.inf, math.inf) else f"a number from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse
