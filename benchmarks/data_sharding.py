"""Sharding throughput on 384-px JPEGs: `python -m data_tools build` vs a plain single-process baseline.

Prints samples/s and samples/s per core for:
- baseline: one process, PIL decode -> resize (long side 384) -> JPEG encode -> pyarrow write;
- data_tools build (understanding + generation rules, tokenization, packing, shards, manifest) with
  1 worker and with all cores.

Usage: python benchmarks/data_sharding.py [--samples 1200] [--workers N]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import tarfile  # noqa: E402
from PIL import Image  # noqa: E402

from data_tools.synthetic import encode, make_caption, make_image, tiny_tokenizer, write_tar  # noqa: E402


def write_inputs(root: str, n: int) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for part in range(2):  # one tar read as understanding data, one as generation data
        members = []
        for i in range(n // 2):
            w, h = (384, int(rng.integers(256, 385))) if i % 2 else (int(rng.integers(256, 385)), 384)
            members += [(f"s{part}{i:05d}.jpg", encode(make_image(w, h, int(rng.integers(1 << 30))), quality=90)),
                        (f"s{part}{i:05d}.txt", make_caption(rng, 8, 40).encode())]
        paths.append(write_tar(os.path.join(root, f"part{part}.tar"), members))
    return paths


def baseline(paths: list, out: str) -> int:
    images, captions = [], []
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf:
                data = tf.extractfile(m).read()
                if m.name.endswith(".txt"):
                    captions.append(data.decode())
                    continue
                img = Image.open(io.BytesIO(data)).convert("RGB")
                s = 384 / max(img.size)
                img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=95)
                images.append(buf.getvalue())
    table = pa.table({"image": pa.array(images, pa.binary()), "caption": captions})
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return len(images)


def run_build(tok: str, out: str, und: str, gen: str, workers: int) -> float:
    """Wall time of one `python -m data_tools build` in a fresh process (as a user runs it)."""
    cmd = [sys.executable, "-m", "data_tools", "build", "--tokenizer", tok, "--out", out, "--und-wds", und,
           "--gen-wds", gen, "--workers", str(workers), "--quiet"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1200)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # Several tars per task so that every worker has files to process.
        und, gen = [], []
        for i in range(max(2, args.workers)):
            os.makedirs(os.path.join(tmp, f"in{i}"))
            a, b = write_inputs(os.path.join(tmp, f"in{i}"), args.samples // max(2, args.workers))
            und.append(a)
            gen.append(b)
        n = sum(args.samples // max(2, args.workers) // 2 * 2 for _ in und)
        small = write_inputs(tmp, 2)
        tok = tiny_tokenizer(os.path.join(tmp, "tok"))
        print(f"{n} samples (half understanding, half generation), JPEG, long side 384, short side 256-384; "
              f"{os.cpu_count()} cores")
        t = time.perf_counter()
        baseline(und + gen, os.path.join(tmp, "baseline.arrow"))
        dt = time.perf_counter() - t
        print(f"baseline, 1 process (decode/resize/encode/pyarrow write): {n / dt:7.1f} samples/s = "
              f"{n / dt:6.1f} per core")
        startup = run_build(tok, os.path.join(tmp, "small"), small[0], small[1], 1)
        print(f"data_tools build start-up (imports, tokenizer, 2 samples): {startup:.1f} s")
        for workers in sorted({1, args.workers}):
            dt = run_build(tok, os.path.join(tmp, f"out{workers}"), os.path.join(tmp, "in*", "part0.tar"),
                           os.path.join(tmp, "in*", "part1.tar"), workers)
            steady = n / max(1e-9, dt - startup)
            print(f"data_tools build, {workers} worker(s): {n / dt:7.1f} samples/s end to end = "
                  f"{n / dt / workers:6.1f} per core; {steady:7.1f} samples/s = {steady / workers:6.1f} per core "
                  f"without start-up")


if __name__ == "__main__":
    main()
