"""``python -m data_tools fit-codec``: fit the k-means patch codec (``image_codecs.kmeans``) on images.

The images go through the same generation rule as ``build`` (short side to ``--resolution``, a square
crop seeded by (seed, file name, key)), so the codebook is fitted on exactly the pixels the build will
encode. Inputs: image files, webdataset tars (their image members) or folders (every image below
them), as globs. Patches are subsampled (seeded) to ``--max-patches`` so memory stays bounded.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from typing import Iterator, List, Tuple

import numpy as np

from datacontract.images import ImageRejected, crop_seed, open_image, prepare_gen_image

from .sources import IMAGE_EXTS, _split_key


def add_parser(sub, formatter) -> None:
    p = sub.add_parser(
        "fit-codec", help="fit a k-means patch codebook (a small image codec for CPU Janus-Pro runs)",
        description=__doc__, formatter_class=formatter)
    p.add_argument("--images", action="append", required=True, metavar="GLOB",
                   help="image files, tars or folders (repeatable)")
    p.add_argument("--out", required=True, help="folder for codebook.safetensors + codec.json")
    p.add_argument("--codebook-size", type=int, default=256, help="number of codes K")
    p.add_argument("--patch", type=int, default=8, help="patch side in pixels (the codec's downsampling)")
    p.add_argument("--resolution", type=int, default=64, help="image side, as the build's --resolution")
    p.add_argument("--seed", type=int, default=0, help="seeds the crops (as the build's --seed) and k-means (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=20000, help="images read at most (in input order)")
    p.add_argument("--max-patches", type=int, default=200000, help="patches the fit uses (seeded subsample)")
    p.add_argument("--iterations", type=int, default=50, help="Lloyd iterations at most")


def _image_files(patterns: List[str]) -> List[str]:
    files: List[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found = []
        for m in matches:
            if os.path.isdir(m):
                for root, dirs, names in os.walk(m):
                    dirs.sort()
                    found += [os.path.join(root, n) for n in sorted(names)
                              if n.rpartition(".")[2].lower() in IMAGE_EXTS + ("tar",)]
            elif os.path.isfile(m):
                found.append(m)
        if not found:
            raise SystemExit(f"error: --images {pattern!r} matches no image, tar or folder")
        files += found
    return files


def iter_images(files: List[str]) -> Iterator[Tuple[str, str, bytes]]:
    """(file name, key, encoded bytes) of every image, in order; tars give their image members."""
    from .archive import FILE, iter_tar

    for path in files:
        name = os.path.basename(path)
        if path.endswith(".tar"):
            with open(path, "rb") as f:
                for item in iter_tar(f):
                    if getattr(item, "kind", None) == FILE and not item.too_large:
                        key, ext = _split_key(item.name)
                        if ext in IMAGE_EXTS:
                            yield name, key, item.data
        else:
            with open(path, "rb") as f:
                yield name, _split_key(name)[0], f.read()


def collect_patches(files: List[str], resolution: int, patch: int, seed: int, max_images: int,
                    log=print) -> Tuple[np.ndarray, int, int]:
    """Patches [N, P*P*3] in [-1, 1] of the prepared images -> (patches, images used, images skipped)."""
    import torch

    from image_codecs.kmeans import image_patches

    chunks, used, skipped = [], 0, 0
    last = time.monotonic()
    for name, key, data in iter_images(files):
        if used >= max_images:
            break
        try:
            img = prepare_gen_image(open_image(data), resolution, crop_seed(seed, f"{name}:{key}"))
        except ImageRejected:
            skipped += 1
            continue
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
        chunks.append(image_patches(x, patch)[0].numpy())
        used += 1
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log(f"read {used} images")
    if not chunks:
        raise SystemExit("error: --images: no image could be read")
    return np.concatenate(chunks), used, skipped


def run(args) -> int:
    from image_codecs.kmeans import KMeansPatchCodec, fit_kmeans

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.resolution % args.patch:
        raise SystemExit(f"error: --patch {args.patch} must divide --resolution {args.resolution}")
    files = _image_files(args.images)
    patches, used, skipped = collect_patches(files, args.resolution, args.patch, args.seed, args.max_images, log)
    total = len(patches)
    if total > args.max_patches:
        keep = np.sort(np.random.default_rng([args.seed, 1]).choice(total, args.max_patches, replace=False))
        patches = patches[keep]
    log(f"fitting {args.codebook_size} codes of {args.patch}x{args.patch} patches on {len(patches)} of {total} "
        f"patches from {used} images ({skipped} unreadable)")
    result = fit_kmeans(patches, args.codebook_size, args.seed, args.iterations, log)
    import torch

    fitted = {"images": used, "images_unreadable": skipped, "patches": int(len(patches)), "seed": args.seed,
              "resolution": args.resolution, "iterations": result.iterations, "converged": result.converged,
              "mean_squared_distance": result.inertia, "inputs": [os.path.abspath(f) for f in args.images]}
    codec = KMeansPatchCodec(result.centroids.to(torch.float32), args.patch, fitted)
    codec.save(args.out)
    log(f"saved {args.out} (mean squared distance {result.inertia:.5f} after {result.iterations} iterations"
        f"{'' if result.converged else ', not converged'}); build with --family januspro --codec kmeans_patches "
        f"--codec-path {args.out} --resolution {args.resolution}")
    return 0

