"""Packing fill on the realistic mix of the issue, with the packer the build uses.

Mix (per the issue): understanding documents of 578 image positions + 20-400 text tokens, generation
documents of 578 + 10-120 prompt tokens, text documents of 50-6,000 tokens; sequences of 4,096.
Prints the fill (share of real tokens in the packed sequences) per task and overall, with and without
text fillers, and the planning speed.

Usage: python benchmarks/data_packing.py [--documents 30000] [--seq-length 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data_tools.packing import plan_packing  # noqa: E402
from pretrain.cli_args import whole_number  # noqa: E402
from datacontract.format import Task  # noqa: E402
from datacontract.shards import TASK_DIRS  # noqa: E402


# The longest document of the mix: an understanding image (578 positions) with 400 text tokens. The
# packer does not split image documents, so a shorter sequence was a ValueError traceback.
LONGEST_IMAGE_DOCUMENT = 578 + 400


def realistic_mix(n: int, seed: int = 0, text_share: float = 1 / 3) -> list:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        r = rng.random()
        if r < (1 - text_share) / 2:
            docs.append((len(docs), Task.UNDERSTANDING, 578 + int(rng.integers(20, 401))))
        elif r < 1 - text_share:
            docs.append((len(docs), Task.GENERATION, 578 + int(rng.integers(10, 121))))
        else:
            docs.append((len(docs), Task.TEXT, int(rng.integers(50, 6001))))
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # At least 1 document (0 divided by zero), a sequence that holds the longest image document, and a
    # window of at least 1 (0 or less planned nothing ahead and printed a fill of half the real one).
    ap.add_argument("--documents", type=whole_number(1), default=30000, help="documents in the mix (default 30000)")
    ap.add_argument("--seq-length", type=whole_number(LONGEST_IMAGE_DOCUMENT), default=4096,
                    help=f"tokens per packed sequence, at least {LONGEST_IMAGE_DOCUMENT} (the longest image "
                         "document; default 4096)")
    ap.add_argument("--window", type=whole_number(1), default=5000,
                    help="documents the packer looks ahead (default 5000)")
    args = ap.parse_args()
    docs = realistic_mix(args.documents)
    counts = {TASK_DIRS[t]: sum(1 for _, k, _ in docs if k == t) for t in Task}
    print(f"{len(docs)} documents {counts}, sequence length {args.seq_length}, window {args.window}")
    for fillers in (True, False):
        t = time.perf_counter()
        plan = plan_packing(docs, args.seq_length, args.window, text_fillers=fillers)
        dt = time.perf_counter() - t
        per_task = ", ".join(f"{TASK_DIRS[k]} {plan.fill(k):.4f} ({len(plan.bins[k])} seq)" for k in Task)
        total_tokens = sum(n for _, _, n in docs)
        print(f"text fillers {'on ' if fillers else 'off'}: fill {plan.fill():.4f} overall; {per_task}; "
              f"filler tokens {plan.filler_tokens / total_tokens:.2%} of all; planned in {dt:.2f} s "
              f"({len(docs) / dt:,.0f} documents/s)")


if __name__ == "__main__":
    main()
