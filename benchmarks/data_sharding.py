"""Sharding throughput on real-looking photos: `python -m data_tools build` vs a resize-only loop.

Inputs: noisy photo-like JPEGs of 640-1600 px (quality 90, some portrait), in tars, half read as
understanding data and half as generation data, built at 384 px.

Printed side by side, in one run:
- baseline: the loop img2dataset users run, one process: decode -> resize (long side 384) -> JPEG
  encode (OpenCV when installed, else PIL), nothing else;
- data_tools build with 1 and with 2 workers: reading tars, EXIF/colour handling, the per-task image
  rules, tokenizing, packing, checking, Arrow shards and manifest.
Each as images per CPU-second (= images/s per fully used core), and the ratio build / baseline
(goal: >= 1.0). CPU time, not wall time: on a shared machine other processes steal wall time but not
CPU time (the build's CPU time includes its worker processes). The build's rate is the steady one:
builds of N and of 2N images are run and the rate is N / (cpu(2N) - cpu(N)), so process start-up
(imports, tokenizer) cancels out. The load average is printed: cache and memory-bandwidth
contention on a loaded machine still make the figures only indicative.

Usage: python benchmarks/data_sharding.py [--samples 400] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pretrain.cli_args import whole_number  # noqa: E402
from data_tools.synthetic import make_caption, tiny_tokenizer, write_tar  # noqa: E402

RESOLUTION = 384


def photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth shapes, texture and sensor noise (entropy like a real photo)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32) + rng.uniform(40, 200, 3)
    for _ in range(6):  # soft blobs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.1, 0.4) * max(width, height)
        w = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))[..., None]
        img += w * rng.uniform(-90, 90, 3)
    img += np.sin(xs[..., None] * rng.uniform(0.02, 0.2) + ys[..., None] * rng.uniform(0.02, 0.2)) * 12
    img += rng.normal(0, 10, img.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_inputs(root: str, n: int) -> list:
    rng = np.random.default_rng(0)
    distinct = [photo(*(sorted(rng.integers(640, 1601, 2))[::(1 if i % 3 else -1)]), seed=i) for i in range(16)]
    paths = []
    for part in range(2):  # one tar read as understanding data, one as generation data
        members = []
        for i in range(n // 2):
            key = f"s{part}{i:05d}"
            members += [(key + ".jpg", distinct[(i + part) % len(distinct)]),
                        (key + ".txt", make_caption(rng, 8, 40).encode())]
        paths.append(write_tar(os.path.join(root, f"part{part}.tar"), members))
    return paths


def baseline(paths: list) -> tuple:
    """(images, seconds) of decode -> resize -> encode, one process."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        cv2 = None
    blobs = []
    for path in paths:
        with tarfile.open(path) as tf:
            blobs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    t = time.process_time()
    for data in blobs:
        if cv2 is not None:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            s = RESOLUTION / max(img.shape[:2])
            img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
            cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        else:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            s = RESOLUTION / max(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
            img.save(io.BytesIO(), "JPEG", quality=95)
    return len(blobs), time.process_time() - t, "OpenCV" if cv2 is not None else "PIL"


def run_build(tok: str, out: str, und: list, gen: list, workers: int) -> tuple:
    """(CPU seconds, wall seconds) of one `python -m data_tools build` in a fresh process, workers included."""
    import resource

    cmd = [sys.executable, "-m", "data_tools", "build", "--tokenizer", tok, "--out", out, "--workers", str(workers),
           "--quiet", "--resolution", str(RESOLUTION), "--chunk-records", "50"]
    for u in und:
        cmd += ["--und-wds", u]
    for g in gen:
        cmd += ["--gen-wds", g]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=whole_number(1), default=400,
                    help="N (the larger build has 2N images), at least 2 x max(2, --workers) (default 400)")
    ap.add_argument("--workers", type=whole_number(1), default=2,
                    help="build workers of the second build, next to 1 worker (default 2)")
    args = ap.parse_args()
    # Every worker gets its own tar of each task with at least one image: fewer samples were a
    # traceback from makedirs or from the build (as were 0 or negative workers).
    least = 2 * max(2, args.workers)
    if args.samples < least:
        ap.error(f"argument --samples: {args.samples} must be at least 2 x max(2, --workers) = {least}")
    sys.stdout.reconfigure(line_buffering=True)  # each figure reaches a log file as it is printed
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        for size in (args.samples, 2 * args.samples):
            und, gen = [], []
            for i in range(max(2, args.workers)):  # several tars per task so that every worker has files
                d = os.path.join(tmp, f"n{size}", f"in{i}")
                os.makedirs(d)
                a, b = write_inputs(d, size // max(2, args.workers))
                und.append(a)
                gen.append(b)
            sets[size] = (und, gen)
        tok = tiny_tokenizer(os.path.join(tmp, "tok"))
        n = args.samples
        print(f"N = {n} photo-like JPEGs, 640-1600 px, -> {RESOLUTION} px (half understanding, half generation); "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        bases = []
        for workers in sorted({1, args.workers}):
            cpu, wall = {}, {}
            for size in (n, 2 * n):
                cpu[size], wall[size] = run_build(tok, os.path.join(tmp, f"out{workers}-{size}"), *sets[size], workers)
                count, dt, lib = baseline(sets[n][0] + sets[n][1])
                bases.append(count / dt)
            base = float(np.median(bases))
            per_core = n / max(1e-9, cpu[2 * n] - cpu[n])
            print(f"baseline ({lib} decode -> resize -> JPEG encode, 1 process): {base:7.1f} images/CPU-s "
                  f"(median of {len(bases)})")
            print(f"data_tools build, {workers} worker(s): {per_core:7.1f} images/CPU-s steady "
                  f"(CPU {cpu[n]:.1f} s for N, {cpu[2 * n]:.1f} s for 2N; wall {wall[n]:.1f} s, {wall[2 * n]:.1f} s); "
                  f"ratio to baseline {per_core / base:.2f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
