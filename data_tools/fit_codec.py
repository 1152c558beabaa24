"""``python -m data_tools fit-codec``: fit the k-means patch codec (``image_codecs.kmeans``) on images.

The images go through the same generation rule as ``build`` (short side to ``--resolution``, a square
crop seeded by (seed, file name, key)), so the codebook is fitted on exactly the pixels the build will
encode. Inputs: image files, webdataset tars (their image members) or folders (every image below
them), as globs. Patches are subsampled (seeded) to ``--max-patches`` while they are read, so memory
stays bounded whatever the number of images.

Every image that cannot be used (damaged, not a regular file, a damaged stretch of a tar) is named in
the log (the first few) and counted by reason in ``codec.json``. Bad options or inputs are one
``error:`` line and exit status 2, before any image is read where possible. A codec already in
``--out`` is replaced only once the new one is complete.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Tuple, Union

import numpy as np

from datacontract.images import ImageRejected, crop_seed, open_image, prepare_gen_image

from .arg_types import whole_number
from .sources import IMAGE_EXTS, _split_key
from .state import nearest_existing

_LISTED_UNREADABLE = 20  # unreadable images named one by one in the log; the rest are only counted
_PROGRESS_SECONDS = 10.0


class FitCodecError(Exception):
    """Bad options or inputs: one ``error:`` line, exit status 2 (as ``build`` reports its errors)."""


def add_parser(sub, formatter) -> None:
    positive = whole_number(1)
    p = sub.add_parser(
        "fit-codec", help="fit a k-means patch codebook (a small image codec for CPU Janus-Pro runs)",
        description=__doc__, formatter_class=formatter)
    p.add_argument("--images", action="append", required=True, metavar="GLOB",
                   help="image files, tars or folders (repeatable)")
    p.add_argument("--out", required=True,
                   help="folder for codebook.safetensors + codec.json (a codec already there is replaced)")
    p.add_argument("--codebook-size", type=positive, default=256, help="number of codes K")
    p.add_argument("--patch", type=positive, default=8, help="patch side in pixels (the codec's downsampling)")
    p.add_argument("--resolution", type=positive, default=64, help="image side, as the build's --resolution")
    p.add_argument("--seed", type=whole_number(0), default=0,
                   help="seeds the crops (as the build's --seed) and k-means (default: %(default)s)")
    p.add_argument("--max-images", type=positive, default=20000, help="images read at most (in input order)")
    p.add_argument("--max-patches", type=positive, default=200000, help="patches the fit uses (seeded subsample)")
    p.add_argument("--iterations", type=positive, default=50, help="Lloyd iterations at most")


def _image_files(patterns: List[str]) -> List[str]:
    files: List[str] = []
    for pattern in patterns:
        if os.path.lexists(pattern):  # a name holding [ ] * or ? is itself, not a glob matching nothing
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else []
        found = []
        for m in matches:
            if os.path.isdir(m):
                # os.walk skips a folder it cannot list without a word: listed, iter_images reports it.
                for root, dirs, names in os.walk(m, onerror=lambda error: found.append(error.filename)):
                    dirs.sort()
                    found += [os.path.join(root, n) for n in sorted(names)
                              if n.rpartition(".")[2].lower() in IMAGE_EXTS + ("tar",)]
                    # os.walk does not enter a linked folder (it could loop): listed, so that
                    # iter_images reports it instead of its images going missing without a word.
                    found += [os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d))]
            else:  # a file, or a link or pipe that iter_images rejects with its reason
                found.append(m)
        if not found:
            folders = [m for m in matches if os.path.isdir(m)]
            if folders:
                raise FitCodecError(f"--images {pattern!r}: no image ({', '.join(IMAGE_EXTS)}) or .tar file "
                                    f"below {folders[0]}")
            raise FitCodecError(f"--images {pattern!r} matches no image, tar or folder")
        files += found
    return files


@dataclass(frozen=True)
class Unreadable:
    """An image (or a stretch of a tar) the fit could not use."""

    where: str  # the file, or "TAR:MEMBER"
    reason: str  # a reject reason of ``build`` (data_tools/README.md)
    detail: str


def iter_images(files: List[str]) -> Iterator[Union[Tuple[str, str, str, bytes], Unreadable]]:
    """(where, file name, key, encoded bytes) of every image in order (tars give their image
    members), or ``Unreadable`` for each one that cannot be read."""
    for path in files:
        try:
            st = os.stat(path)  # follows a link: a link to an image is read
        except OSError as e:  # a dangling link, a link loop, a file gone since it was listed
            yield Unreadable(path, "unreadable_file", f"{type(e).__name__}: {e.strerror or e}")
            continue
        if stat.S_ISDIR(st.st_mode):
            if os.path.islink(path):
                yield Unreadable(path, "link_member", "a linked folder, not followed (give it as an --images of its own)")
            else:
                yield Unreadable(path, "unreadable_file", "a folder that could not be listed; its images are not read")
            continue
        if not stat.S_ISREG(st.st_mode):  # reading a pipe or a device would wait forever
            yield Unreadable(path, "unsupported_member", "not a regular file (a pipe, socket or device)")
            continue
        if path.lower().endswith(".tar"):
            yield from _tar_images(path)
            continue
        name = os.path.basename(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            yield Unreadable(path, "unreadable_file", f"{type(e).__name__}: {e.strerror or e}")
            continue
        yield path, name, _split_key(name)[0], data


def _tar_images(path: str) -> Iterator[Union[Tuple[str, str, str, bytes], Unreadable]]:
    from .archive import FILE, TarDamage, iter_tar

    name = os.path.basename(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Unreadable(path, "unreadable_archive", f"{type(e).__name__}: {e.strerror or e}")
        return
    with f:
        items = iter_tar(f)
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except Exception as e:  # the read itself failed (an I/O error): the rest of this tar is lost
                yield Unreadable(path, "unreadable_archive", f"{type(e).__name__}: {e}")
                return
            if isinstance(item, TarDamage):  # its images are lost: said, not skipped silently
                yield Unreadable(path, item.reason, f"{item.length} bytes at offset {item.offset}: {item.detail}")
                continue
            key, ext = _split_key(item.name)
            if ext not in IMAGE_EXTS:
                continue  # captions, class labels, folders: not images
            where = f"{path}:{item.name}"
            if item.kind != FILE:
                yield Unreadable(where, "unsupported_member", f"a {item.kind} member, not a regular file")
            elif item.too_large:
                yield Unreadable(where, "member_too_large", f"{item.size} bytes")
            else:
                yield where, name, key, item.data


class SeededSubsample:
    """At most ``size`` rows drawn uniformly (seeded) from a stream of row blocks, without holding the
    stream: every row gets a random key and the rows with the ``size`` smallest keys are kept, in
    stream order. At most about twice ``size`` rows are held at any time. A stream of ``size`` rows or
    fewer is kept whole, in order."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.blocks: List[np.ndarray] = []
        self.keys: List[np.ndarray] = []
        self.held = 0
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        self.blocks.append(rows)
        self.keys.append(self.rng.random(len(rows)))
        self.held += len(rows)
        self.seen += len(rows)
        if self.held > 2 * self.size:
            self._shrink()

    def _shrink(self) -> None:
        rows, keys = np.concatenate(self.blocks), np.concatenate(self.keys)
        if len(rows) > self.size:
            keep = np.sort(np.argpartition(keys, self.size - 1)[:self.size])
            rows, keys = rows[keep], keys[keep]
        self.blocks, self.keys, self.held = [rows], [keys], len(rows)

    def rows(self) -> np.ndarray:
        if not self.blocks:
            return np.zeros((0, 0), np.float32)
        self._shrink()
        return self.blocks[0]


@dataclass
class Patches:
    patches: np.ndarray  # [N, P*P*3] in [-1, 1], N <= max_patches
    total: int  # patches of every image read, before subsampling
    images: int
    unreadable: Counter  # reason -> count


def collect_patches(files: List[str], resolution: int, patch: int, seed: int, max_images: int,
                    max_patches: int, log=print) -> Patches:
    """Patches of the prepared images, subsampled to ``max_patches`` as they are read."""
    import torch

    from image_codecs.kmeans import image_patches

    sample = SeededSubsample(max_patches, np.random.default_rng([seed, 1]))
    used, unreadable = 0, Counter()
    last = time.monotonic()

    def reject(item: Unreadable) -> None:
        unreadable[item.reason] += 1
        listed = sum(unreadable.values())
        if listed <= _LISTED_UNREADABLE:
            log(f"skipped {item.where}: {item.reason}: {item.detail}")
        elif listed == _LISTED_UNREADABLE + 1:
            log("(more unreadable images: counted by reason, not listed)")

    for item in iter_images(files):
        if used >= max_images:
            break
        if time.monotonic() - last > _PROGRESS_SECONDS:  # also while only unreadable images come
            last = time.monotonic()
            log(f"read {used} images ({sum(unreadable.values())} unreadable)")
        if isinstance(item, Unreadable):
            reject(item)
            continue
        where, name, key, data = item
        try:
            img = prepare_gen_image(open_image(data), resolution, crop_seed(seed, f"{name}:{key}"))
        except ImageRejected as e:
            reject(Unreadable(where, e.reason, e.detail))
            continue
        except UnicodeEncodeError:  # a file name that is not UTF-8: the build rejects it too
            reject(Unreadable(where, "invalid_unicode", "the name is not valid UTF-8"))
            continue
        except Exception as e:  # one odd image must not end a fit of thousands
            reject(Unreadable(where, "internal_error", f"{type(e).__name__}: {e}"))
            continue
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
        sample.add(image_patches(x, patch)[0].numpy())
        used += 1
    return Patches(sample.rows(), sample.seen, used, unreadable)


def _by_reason(counts: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())


def _writable_out(out: str) -> None:
    """Refuses an --out that cannot take the codec now, not after the fit (which may take hours),
    and leaves nothing new behind: a missing --out is made only by the save, so a fit refused or
    stopped before it leaves no empty folder. Without --out, the nearest folder that exists above it
    must be writable (the save makes the folders in between)."""
    from image_codecs.kmeans import CONFIG_NAME, WEIGHTS_NAME

    if os.path.exists(out) and not os.path.isdir(out):
        raise FitCodecError(f"--out {out} is a file: give a folder (fit-codec writes {WEIGHTS_NAME} and "
                            f"{CONFIG_NAME} into it)")
    probe = nearest_existing(out)
    try:
        if not os.path.isdir(probe):  # a file (or a link to nothing) on the way: makedirs would fail
            raise NotADirectoryError(20, "Not a directory", probe)
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", probe)
        # os.access trusts the mode bits; a read-only mount (or root's bypass) shows only by writing.
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".fit-codec-write-test-"):
            pass
    except OSError as e:
        at = "" if probe == os.path.abspath(out) else f": {probe}"
        raise FitCodecError(f"--out {out}: cannot write there ({e.strerror or e}{at}): check the path and its "
                            "permissions") from None


def run(args) -> int:
    def log(message: str) -> None:
        # A file name that is not UTF-8 (surrogate escapes) must not end the fit when it is logged.
        print(message.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr, flush=True)

    try:
        return _fit(args, log)
    except FitCodecError as e:
        log(f"error: {e}")
        return 2


def _fit(args, log) -> int:
    import torch

    from image_codecs.kmeans import CONFIG_NAME, KMeansPatchCodec, fit_kmeans

    if args.resolution % args.patch:
        raise FitCodecError(f"--patch {args.patch} must divide --resolution {args.resolution}")
    if args.codebook_size > args.max_patches:
        raise FitCodecError(f"--codebook-size {args.codebook_size} needs at least as many patches, but "
                            f"--max-patches is {args.max_patches}: raise --max-patches or lower --codebook-size")
    files = _image_files(args.images)
    _writable_out(args.out)
    read = collect_patches(files, args.resolution, args.patch, args.seed, args.max_images, args.max_patches, log)
    skipped = sum(read.unreadable.values())
    if not read.images:
        raise FitCodecError(f"--images: no image could be read ({_by_reason(read.unreadable) or 'none found'})")
    patches = read.patches
    log(f"fitting {args.codebook_size} codes of {args.patch}x{args.patch} patches on {len(patches)} of "
        f"{read.total} patches from {read.images} images ({skipped} unreadable"
        f"{': ' + _by_reason(read.unreadable) if skipped else ''})")
    if len(patches) < args.codebook_size:
        raise FitCodecError(f"{len(patches)} patches (from {read.images} images) cannot make {args.codebook_size} "
                            "codes: give more images, or a smaller --codebook-size")
    result = fit_kmeans(patches, args.codebook_size, args.seed, args.iterations, log)
    distinct = int(torch.unique(result.centroids, dim=0).shape[0])
    if distinct < args.codebook_size:
        log(f"warning: only {distinct} distinct patches: {args.codebook_size - distinct} of the "
            f"{args.codebook_size} codes repeat others and are never produced; give more varied images or "
            "a smaller --codebook-size")
    fitted = {"images": read.images, "images_unreadable": skipped,
              "images_unreadable_by_reason": dict(read.unreadable), "patches": int(len(patches)),
              "seed": args.seed, "resolution": args.resolution, "iterations": result.iterations,
              "converged": result.converged, "distinct_codes": distinct, "mean_squared_distance": result.inertia,
              "inputs": [os.path.abspath(f) for f in args.images]}
    codec = KMeansPatchCodec(result.centroids.to(torch.float32), args.patch, fitted)
    if os.path.exists(os.path.join(args.out, CONFIG_NAME)):
        log(f"replacing the codec in {args.out} (shards built with it must be built again)")
    try:
        codec.save(args.out)
    except OSError as e:
        raise FitCodecError(f"--out {args.out}: cannot write {e.filename or 'the codec'} ({e.strerror or e}): "
                            "check the free space and permissions, and run again") from None
    log(f"saved {args.out} (mean squared distance {result.inertia:.5f} after {result.iterations} iterations"
        f"{'' if result.converged else ', not converged'}); build with --family januspro --codec kmeans_patches "
        f"--codec-path {args.out} --resolution {args.resolution}")
    return 0
