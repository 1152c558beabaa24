"""argparse types the data_tools subcommands share: bounds checked when the options are parsed, so a
nonsense value is one usage line, not a traceback hours into a job."""

from __future__ import annotations

import argparse


def whole_number(low: int, meaning: str = ""):
    """An argparse type: a whole number of at least ``low`` (``meaning``: said after the bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            bound = f"at least {low}" if low else "0 or more"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}{meaning}")
        return value
    return parse


def share(text: str) -> float:
    """An argparse type: a fraction between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return value
