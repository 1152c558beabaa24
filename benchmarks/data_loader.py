"""Loader throughput in packed sequences/s per worker, on 4,096-token shards with 384-px images.

Builds a small set of shards (understanding captions + generation pairs + text, 384-px JPEG sources)
with `python -m data_tools build`, then times `PackedLoader` (decode rows, decode images, build
`PackedBatch`) in-process (one worker) and with DataLoader workers. A GPU consumes about 2 packed
4,096-token sequences/s for this model; the target is 10x that per worker.

Usage: python benchmarks/data_loader.py [--records 240] [--batches 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from pretrain.cli_args import whole_number  # noqa: E402
from data_tools.synthetic import encode, make_caption, make_image, tiny_tokenizer, write_jsonl, write_tar  # noqa: E402


def write_inputs(root: str, n: int) -> dict:
    rng = np.random.default_rng(0)
    paths = {}
    for task, words in (("und", (20, 400)), ("gen", (10, 120))):
        members = []
        for i in range(n):
            w, h = (384, int(rng.integers(256, 385))) if i % 2 else (int(rng.integers(256, 385)), 384)
            members += [(f"{task}{i:05d}.jpg", encode(make_image(w, h, int(rng.integers(1 << 30))))),
                        (f"{task}{i:05d}.txt", make_caption(rng, *words).encode())]
        paths[task] = write_tar(os.path.join(root, f"{task}.tar"), members)
    paths["text"] = write_jsonl(os.path.join(root, "text.jsonl"),
                                [{"text": make_caption(rng, 50, 3000)} for _ in range(n // 2)])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Refused while parsing: fewer than 2 records left the text task (records // 2 documents) empty
    # and the mix failed with a traceback; 0 batches divided by zero and negative ones printed
    # negative rates; negative workers were a DataLoader traceback.
    ap.add_argument("--records", type=whole_number(2), default=240, help="records per task, at least 2 (default 240)")
    ap.add_argument("--batches", type=whole_number(1), default=60, help="packed sequences timed per run (default 60)")
    ap.add_argument("--workers", type=whole_number(0), default=2,
                    help="DataLoader workers of the second run, next to the in-process one (default 2)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure reaches a log file as it is printed
    from data_tools.cli import main as cli
    from pretrain.data.loader import PackedLoader
    from pretrain.data.step_mix import MixSchedule
    from datacontract.shards import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_inputs(tmp, args.records)
        tok = tiny_tokenizer(os.path.join(tmp, "tok"))
        out = os.path.join(tmp, "out")
        cli(["build", "--tokenizer", tok, "--out", out, "--und-wds", paths["und"], "--gen-wds", paths["gen"],
             "--text-jsonl", paths["text"], "--quiet"])
        m = read_manifest(out)
        print("shards: " + ", ".join(f"{k} {v['sequences']} seq (fill {v['fill']:.3f}, "
                                     f"{v['documents']})" for k, v in m["tasks"].items()))
        mixes = {
            "und only": MixSchedule.constant(und=1),
            "gen only": MixSchedule.constant(gen=1),
            "mix und .4 / gen .4 / text .2": MixSchedule.constant(und=0.4, gen=0.4, text=0.2),
        }
        for name, sched in mixes.items():
            for workers in sorted({0, args.workers}):  # --workers 0: the in-process run once, not twice
                loader = PackedLoader(out, sched, micro_batch_size=1, num_workers=workers)
                it = iter(loader)
                next(it)  # start-up (worker processes, first shard open) is not throughput
                t = time.perf_counter()
                images = 0
                for _ in range(args.batches):
                    b = next(it)
                    images += b.und_pixels.shape[0] + b.gen_pixels.shape[0]
                dt = time.perf_counter() - t
                per_worker = args.batches / dt / max(1, workers)
                print(f"{name:32s} workers={workers}: {args.batches / dt:6.1f} seq/s, {per_worker:6.1f} seq/s per "
                      f"worker ({per_worker / 2:.0f}x a GPU's ~2 seq/s), {images / args.batches:.1f} images/seq")
                del it


if __name__ == "__main__":
    main()
