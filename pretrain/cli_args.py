"""argparse ``type`` functions shared by the project's command lines (demo, plan, sample, chat, the
benchmarks and scripts/gpu_check).

A bad value is refused while parsing, with argparse's one ``error:`` line naming the option, before
any work starts: zero or negative counts failed later in a child process or divided by zero, and NaN
fails every comparison, so it slipped past range checks into sampling and figures.
An output file (``--json PATH`` of the benchmarks) is checked while parsing too: the figures are
written after the run (minutes on a GPU), and a path that cannot be written was a traceback at the
end, with the figures lost.
(``data_tools`` keeps its own: it and ``pretrain`` do not import each other.)
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
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


def output_file(text: str) -> str:
    """A file to (re)write: not a folder, in an existing folder this process may write to."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty; give a file path, e.g. figures.json")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path, e.g. {path / 'figures.json'}")
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"the folder {folder} {what}; create the folder first or give another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} cannot be written (permissions); give a path you can write to")
    return text
