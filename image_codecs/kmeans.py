"""A k-means codebook over pixel patches: a small image codec for CPU runs of Janus-Pro.

The real VQ-16 tokenizer cannot be trained on a CPU, but the AR image path only needs *some* frozen
map from pixels to a grid of discrete codes and back. This one cuts an image into non-overlapping
``patch x patch`` squares (``downsample`` = ``patch``), writes each as a vector of ``patch * patch * 3``
values in [-1, 1] in (row, column, RGB) order, and replaces it by the nearest of ``codebook_size``
centroids (squared Euclidean distance; ties go to the lowest index). Decoding pastes the centroids
back. The codebook is fitted offline on the training images (``fit_kmeans``, run by
``python -m data_tools fit-codec``) with seeded k-means++ and Lloyd iterations, so the same patches
and seed give the same codebook.

Saved as a folder: ``codebook.safetensors`` (tensor ``centroids`` float32 [K, P*P*3]) and
``codec.json`` (kind, sizes, patch order, how it was fitted).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

KIND = "kmeans_patches"
WEIGHTS_NAME = "codebook.safetensors"
CONFIG_NAME = "codec.json"
_ENCODE_CHUNK = 8192  # patches per distance matrix at most
_DISTANCES_PER_CHUNK = 1 << 24  # and at most this many chunk x K doubles (128 MiB), whatever K
_PROGRESS_SECONDS = 10.0


def image_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, (H/P) * (W/P), P*P*3]: patches row-major, each in (row, column, RGB) order."""
    n, c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image of {h}x{w} pixels is not a whole number of {patch}-pixel patches")
    x = pixels.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def patches_to_image(patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """The inverse of ``image_patches``: [N, h*w, P*P*3] -> [N, 3, h*P, w*P]."""
    n = patches.shape[0]
    h, w = grid
    x = patches.reshape(n, h, w, patch, patch, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, 3, h * patch, w * patch)


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """int64 index of the nearest centroid (squared Euclidean, ties to the lowest index) per row.

    Computed as ``|c|^2 - 2 x.c`` in float64 (``|x|^2`` is the same for every centroid), in chunks."""
    c = centroids.double()
    c_sq = (c * c).sum(1)
    out = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
    # A fixed number of rows would make a large codebook's distance matrix gigabytes big.
    rows = max(1, min(_ENCODE_CHUNK, _DISTANCES_PER_CHUNK // max(1, c.shape[0])))
    for start in range(0, vectors.shape[0], rows):
        x = vectors[start:start + rows].double()
        out[start:start + x.shape[0]] = torch.argmin(c_sq[None, :] - 2.0 * (x @ c.T), dim=1)
    return out


class KMeansPatchCodec:
    """``ImageCodec`` over a fitted patch codebook (see the module docstring)."""

    def __init__(self, centroids: torch.Tensor, patch: int, fitted: Optional[dict] = None) -> None:
        if centroids.ndim != 2 or centroids.shape[1] != patch * patch * 3:
            raise ValueError(f"centroids of shape {tuple(centroids.shape)} do not hold {patch}x{patch} RGB patches")
        self.centroids = centroids.float()
        self.codebook_size = int(centroids.shape[0])
        self.downsample = int(patch)
        self.fitted = dict(fitted or {})

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in [-1, 1] -> int64 codes [N, (H/P) * (W/P)], row-major."""
        patches = image_patches(pixels.to(self.centroids.device), self.downsample)
        n, per_image, dim = patches.shape
        return nearest_centroid(patches.reshape(n * per_image, dim), self.centroids).reshape(n, per_image)

    def decode(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """int64 [N, h*w] -> float [N, 3, h*P, w*P]: every code's centroid pasted in place."""
        h, w = grid
        if codes.shape[-1] != h * w:
            raise ValueError(f"{codes.shape[-1]} codes per image do not fill a {h}x{w} grid")
        patches = self.centroids[codes.to(self.centroids.device).long()]
        return patches_to_image(patches, grid, self.downsample)

    def fingerprint(self) -> str:
        data = self.centroids.detach().cpu().contiguous().numpy().astype("<f4").tobytes()
        return hashlib.sha256(data + str(self.downsample).encode()).hexdigest()

    def describe(self) -> dict:
        return {"kind": KIND, "codebook_size": self.codebook_size, "downsample": self.downsample,
                "fingerprint": self.fingerprint()}

    def save(self, folder: str) -> None:
        """Writes the two files so that an interruption at any point leaves the codec that was there
        whole, or the new one whole, or no ``codec.json`` (which ``load_kmeans_codec`` refuses): never a
        truncated codebook nor one codebook beside another fit's ``codec.json``."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        weights, config_path = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, CONFIG_NAME)
        weights_tmp, config_tmp = weights + ".tmp", config_path + ".tmp"
        save_file({"centroids": self.centroids.detach().cpu().contiguous()}, weights_tmp)
        _fsync(weights_tmp)
        config = {**self.describe(), "patch_order": "row, column, RGB; values in [-1, 1]", "fitted": self.fitted}
        with open(config_tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        # Both new files are complete: the old codec.json goes first, so that between the two renames
        # the folder is an unfinished codec, not the new codebook described by the old fit's codec.json.
        # The folder is synced after the removal (so that a power cut cannot keep the old codec.json
        # beside the new codebook) and after the renames (so that the saved codec is on the disk).
        try:
            os.remove(config_path)
        except FileNotFoundError:
            pass
        _fsync_folder(folder)
        os.replace(weights_tmp, weights)
        os.replace(config_tmp, config_path)
        _fsync_folder(folder)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: str) -> None:
    """Makes the removals and renames in ``folder`` durable (the files' own fsync does not)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_kmeans_codec(path: str, device: str | torch.device = "cpu") -> KMeansPatchCodec:
    """The codec saved in folder ``path`` (``codebook.safetensors`` + ``codec.json``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(path):
        raise ValueError(f"{path}: a file; the k-means codec is the folder holding {CONFIG_NAME} and {WEIGHTS_NAME} "
                         "(written by `python -m data_tools fit-codec`): pass that folder")
    # Every way the two files can be missing, damaged or mismatched is one error naming the file: the
    # build reports ValueError/OSError as one line, and a codebook loaded wrong (another patch size, a
    # codec.json of another fit) would silently give every image wrong codes.
    refit = "fit the codec again with `python -m data_tools fit-codec`"
    for p in (config_path, weights_path):
        if not os.path.isfile(p):  # also what a save stopped between its renames leaves: no codec.json
            raise FileNotFoundError(f"{p} not found: {path!r} is not a folder written by `python -m data_tools "
                                    f"fit-codec`, or its save was interrupted; {refit}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        raise ValueError(f"{config_path}: not valid JSON ({err}); {refit}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}; {refit}")
    if config.get("kind") != KIND:
        raise ValueError(f"{config_path}: kind {config.get('kind')!r}, expected {KIND!r}")
    patch = config.get("downsample")
    if type(patch) is not int or patch < 1:  # not bool, not 4.7 (int() would truncate it)
        raise ValueError(f"{config_path}: downsample must be an integer >= 1, got {patch!r}; {refit}")
    if not isinstance(config.get("fitted", {}), (dict, type(None))):
        raise ValueError(f"{config_path}: fitted must be a JSON object, got {config['fitted']!r}; {refit}")
    try:
        tensors = load_file(weights_path)
    except SafetensorError as err:
        raise ValueError(f"{weights_path}: unreadable (truncated or damaged: {str(err).strip()}); {refit}") from None
    if set(tensors) != {"centroids"}:
        raise ValueError(f"{weights_path}: expected exactly one tensor 'centroids', found {sorted(tensors)}; {refit}")
    centroids = tensors["centroids"]
    # NaN/inf centroids load: the sampler refuses the pixels they decode to, and the build (which only
    # encodes) refuses them in ``data_tools.codes``.
    if not centroids.is_floating_point():
        raise ValueError(f"{weights_path}: centroids must be floating point, got {centroids.dtype}; {refit}")
    if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] != patch * patch * 3:
        raise ValueError(f"{weights_path}: centroids of shape {list(centroids.shape)}, expected [K >= 1, "
                         f"{patch * patch * 3}] for the {patch}x{patch} patches of {CONFIG_NAME}; {refit}")
    if "codebook_size" in config and config["codebook_size"] != centroids.shape[0]:
        raise ValueError(f"{path}: {CONFIG_NAME} says codebook_size {config['codebook_size']!r} but {WEIGHTS_NAME} "
                         f"holds {centroids.shape[0]} centroids: the two files are of different fits; {refit}")
    return KMeansPatchCodec(centroids.to(device), patch, config.get("fitted"))


# ------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class FitResult:
    centroids: torch.Tensor  # float64 [K, D]
    iterations: int
    inertia: float  # mean squared distance of a patch to its centroid
    converged: bool


def _kmeans_pp(x: torch.Tensor, k: int, rng: np.random.Generator,
               log: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """k-means++ seeding (each next centre drawn with probability proportional to D^2)."""
    centres = [int(rng.integers(x.shape[0]))]
    d2 = ((x - x[centres[0]]) ** 2).sum(1)
    last = time.monotonic()
    for i in range(1, k):
        if log is not None and time.monotonic() - last > _PROGRESS_SECONDS:  # a large codebook takes minutes
            last = time.monotonic()
            log(f"k-means++ seeding: {i} of {k} centres")
        total = float(d2.sum())
        if total <= 0:  # fewer distinct patches than centres: repeat points (they stay empty-safe)
            nxt = int(rng.integers(x.shape[0]))
        else:
            nxt = int(np.searchsorted(np.cumsum(d2.numpy()), rng.uniform(0, total), side="right"))
            nxt = min(nxt, x.shape[0] - 1)
        centres.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[centres].clone()


def fit_kmeans(patches: np.ndarray, k: int, seed: int = 0, max_iterations: int = 50,
               log: Optional[Callable[[str], None]] = None) -> FitResult:
    """Lloyd's k-means on ``patches`` [N, D] (float, [-1, 1]) from seeded k-means++ centres.

    Stops when no assignment changes and no empty cluster can be refilled, or after
    ``max_iterations``. A cluster that empties takes the patch farthest from its centroid
    (deterministic), so every code stays in use while it can; with fewer distinct patches than ``k``
    the clusters left over stay empty (their centroids repeat patches that other codes already hold)."""
    if k < 1 or max_iterations < 1:
        raise ValueError(f"k-means needs k >= 1 and max_iterations >= 1, got k={k}, max_iterations={max_iterations}")
    x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float64))
    if x.shape[0] < k:
        raise ValueError(f"{x.shape[0]} patches cannot make {k} clusters: give more images or a smaller codebook")
    rng = np.random.default_rng(seed)
    centroids = _kmeans_pp(x, k, rng, log)
    assign = None
    converged = False
    it = 0
    for it in range(1, max_iterations + 1):
        new = nearest_centroid(x, centroids)
        changed = x.shape[0] if assign is None else int((new != assign).sum())
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].double()
        d2 = ((x - centroids[assign]) ** 2).sum(1)
        refilled = 0
        for empty in torch.nonzero(~nonempty).flatten().tolist():
            far = int(torch.argmax(d2))
            if d2[far] <= 0:  # every patch sits on its centroid: refilling would only repeat a centroid
                break
            centroids[empty] = x[far]
            d2[far] = 0.0
            refilled += 1
        inertia = float(d2.mean())
        if log is not None:
            log(f"k-means iteration {it}: mean squared distance {inertia:.5f}, {changed} assignments changed, "
                f"{refilled} empty clusters refilled")
        # Unchanged assignments with nothing refilled is a fixed point, also when clusters stay empty
        # for want of distinct patches (waiting for them to fill ran every iteration for nothing).
        if changed == 0 and refilled == 0:
            converged = True
            break
    d2 = ((x - centroids[nearest_centroid(x, centroids)]) ** 2).sum(1)
    return FitResult(centroids, it, float(d2.mean()), converged)
