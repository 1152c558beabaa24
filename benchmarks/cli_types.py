"""argparse ``type`` for the output files of the benchmarks and scripts/gpu_check (``--json PATH``).

The figures are written after the run (minutes on a GPU): a path that cannot be written was a
traceback at the end, with the figures lost. It is checked while parsing, with argparse's one
``error:`` line naming the option. Counts and numbers: ``pretrain.cli_args`` (``whole_number``,
``finite_number``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


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
