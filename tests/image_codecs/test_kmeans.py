"""The k-means patch codec against a few-line re-derivation: nearest centroid by brute force, exact
decode of images made of centroids, a fit that finds planted clusters, deterministic and saved whole."""

import numpy as np
import pytest
import torch

from image_codecs import load_image_codec
from image_codecs.kmeans import KMeansPatchCodec, fit_kmeans


def _brute_force_codes(pixels: np.ndarray, centroids: np.ndarray, p: int) -> np.ndarray:
    """Independent reference: loop over the grid, cut each patch as (row, column, RGB), compare with
    every centroid."""
    n, _, h, w = pixels.shape
    out = np.zeros((n, (h // p) * (w // p)), dtype=np.int64)
    for i in range(n):
        for gy in range(h // p):
            for gx in range(w // p):
                patch = pixels[i, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].transpose(1, 2, 0).reshape(-1)
                d = ((centroids.astype(np.float64) - patch.astype(np.float64)) ** 2).sum(1)
                out[i, gy * (w // p) + gx] = int(np.argmin(d))
    return out


def test_encode_is_the_nearest_centroid_row_major():
    rng = np.random.default_rng(0)
    p, k = 4, 37
    centroids = rng.uniform(-1, 1, (k, p * p * 3)).astype(np.float32)
    pixels = rng.uniform(-1, 1, (3, 3, 16, 24)).astype(np.float32)
    codec = KMeansPatchCodec(torch.from_numpy(centroids), p)
    codes = codec.encode(torch.from_numpy(pixels))
    assert codes.dtype == torch.int64 and codes.shape == (3, 4 * 6)
    assert np.array_equal(codes.numpy(), _brute_force_codes(pixels, centroids, p))


def test_decode_of_an_image_made_of_centroids_is_exact():
    rng = np.random.default_rng(1)
    p, k, grid = 2, 10, (3, 5)
    centroids = rng.uniform(-1, 1, (k, p * p * 3)).astype(np.float32)
    codes = rng.integers(0, k, (2, grid[0] * grid[1]))
    # Paste the centroids by hand: patch (gy, gx) of image i is centroid codes[i, gy*w+gx], (row, col, RGB).
    image = np.zeros((2, 3, grid[0] * p, grid[1] * p), np.float32)
    for i in range(2):
        for gy in range(grid[0]):
            for gx in range(grid[1]):
                patch = centroids[codes[i, gy * grid[1] + gx]].reshape(p, p, 3).transpose(2, 0, 1)
                image[i, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p] = patch
    codec = KMeansPatchCodec(torch.from_numpy(centroids), p)
    decoded = codec.decode(torch.from_numpy(codes), grid)
    assert torch.equal(decoded, torch.from_numpy(image))
    assert torch.equal(codec.encode(decoded), torch.from_numpy(codes))
    assert torch.equal(codec.decode(codec.encode(decoded), grid), decoded)


def test_fit_finds_planted_clusters_and_is_deterministic():
    rng = np.random.default_rng(2)
    centres = rng.uniform(-0.8, 0.8, (5, 12))
    labels = rng.integers(0, 5, 2000)
    x = centres[labels] + rng.normal(0, 0.01, (2000, 12))
    a = fit_kmeans(x, 5, seed=3)
    b = fit_kmeans(x, 5, seed=3)
    assert torch.equal(a.centroids, b.centroids) and a.converged
    # Every planted centre is matched by one fitted centroid, at the sample mean of its points.
    for c in range(5):
        nearest = torch.cdist(torch.from_numpy(centres[c:c + 1]), a.centroids).argmin()
        mean = x[labels == c].mean(0)
        assert np.allclose(a.centroids[nearest].numpy(), mean, atol=1e-12)


def test_fit_refuses_fewer_patches_than_codes():
    with pytest.raises(ValueError, match="cannot make 8 clusters"):
        fit_kmeans(np.zeros((4, 3)), 8)


def test_save_load_describe(tmp_path):
    rng = np.random.default_rng(4)
    codec = KMeansPatchCodec(torch.from_numpy(rng.uniform(-1, 1, (6, 12)).astype(np.float32)), 2, {"seed": 0})
    codec.save(str(tmp_path / "c"))
    loaded = load_image_codec("kmeans_patches", str(tmp_path / "c"))
    assert torch.equal(loaded.centroids, codec.centroids)
    assert loaded.describe() == codec.describe() == {
        "kind": "kmeans_patches", "codebook_size": 6, "downsample": 2, "fingerprint": codec.fingerprint()}
    other = KMeansPatchCodec(codec.centroids + 1e-3, 2)
    assert other.describe()["fingerprint"] != codec.describe()["fingerprint"]
    with pytest.raises(FileNotFoundError, match="fit-codec"):
        load_image_codec("kmeans_patches", str(tmp_path / "missing"))


def test_fit_codec_command_on_images_and_tars(tmp_path, capsys):
    from PIL import Image

    from data_tools.cli import main
    from data_tools.synthetic import encode, write_tar

    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, c in enumerate(colours):
        Image.new("RGB", (20, 12), c).save(folder / f"im{i}.png")
    write_tar(str(tmp_path / "a.tar"), [("k0.png", encode(Image.new("RGB", (8, 8), (0, 0, 0)), "PNG")),
                                        ("k0.txt", b"black"), ("bad.png", b"not an image")])
    out = tmp_path / "codec"
    assert main(["fit-codec", "--images", str(folder), "--images", str(tmp_path / "a.tar"), "--out", str(out),
                 "--codebook-size", "4", "--patch", "4", "--resolution", "8"]) == 0
    assert "k-means iteration 1:" in capsys.readouterr().err
    codec = load_image_codec("kmeans_patches", str(out))
    assert codec.fitted["images"] == 4 and codec.fitted["images_unreadable"] == 1
    # Four flat colours, four codes: each colour is reproduced exactly.
    for c in colours + [(0, 0, 0)]:
        x = torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 8, 8) / 127.5 - 1
        assert torch.allclose(codec.decode(codec.encode(x), (2, 2)), x, atol=1e-6)


def _damage_codec(folder, how):
    import json
    import os

    from safetensors.torch import save_file

    config, weights = os.path.join(folder, "codec.json"), os.path.join(folder, "codebook.safetensors")

    def edit_config(**changes):
        with open(config) as f:
            c = json.load(f)
        c.update(changes)
        c = {k: v for k, v in c.items() if v is not None}
        with open(config, "w") as f:
            json.dump(c, f)

    if how == "zero-byte weights":
        open(weights, "wb").close()
    elif how == "truncated weights":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    elif how == "config not JSON":
        open(config, "w").write("{not json")
    elif how == "config a list":
        open(config, "w").write("[1, 2]")
    elif how == "no downsample":
        edit_config(downsample=None)
    elif how == "fractional downsample":
        edit_config(downsample=2.7)
    elif how == "other codebook_size":
        edit_config(codebook_size=99)
    elif how == "no centroids":
        save_file({"other": torch.zeros(6, 12)}, weights)
    elif how == "extra tensor":
        save_file({"centroids": torch.zeros(6, 12), "x": torch.zeros(1)}, weights)
    elif how == "integer centroids":
        save_file({"centroids": torch.zeros(6, 12, dtype=torch.int32)}, weights)
    elif how == "no centroid":
        save_file({"centroids": torch.zeros(0, 12)}, weights)


DAMAGE = [("zero-byte weights", r"codebook.safetensors: unreadable \(truncated or damaged"),
          ("truncated weights", r"codebook.safetensors: unreadable \(truncated or damaged"),
          ("config not JSON", "codec.json: not valid JSON"),
          ("config a list", "codec.json: expected a JSON object"),
          ("no downsample", "downsample must be an integer >= 1, got None"),
          ("fractional downsample", "downsample must be an integer >= 1, got 2.7"),
          ("other codebook_size", "codebook_size 99 but codebook.safetensors holds 6"),
          ("no centroids", r"exactly one tensor 'centroids', found \['other'\]"),
          ("extra tensor", r"exactly one tensor 'centroids', found \['centroids', 'x'\]"),
          ("integer centroids", "must be floating point, got torch.int32"),
          ("no centroid", r"shape \[0, 12\], expected \[K >= 1, 12\]")]


@pytest.mark.parametrize("how,message", DAMAGE, ids=[d for d, _ in DAMAGE])
def test_a_damaged_codec_folder_is_one_value_error_naming_the_file(tmp_path, how, message):
    """The build turns ValueError/OSError into one line; anything else was a traceback (SafetensorError,
    AttributeError, KeyError 'centroids'), and a truncated downsample or a codec.json of another fit
    loaded silently."""
    KMeansPatchCodec(torch.rand(6, 12) * 2 - 1, 2).save(str(tmp_path / "c"))
    _damage_codec(str(tmp_path / "c"), how)
    with pytest.raises(ValueError, match=message):
        load_image_codec("kmeans_patches", str(tmp_path / "c"))


def test_the_weights_file_instead_of_its_folder_says_to_pass_the_folder(tmp_path):
    KMeansPatchCodec(torch.rand(6, 12) * 2 - 1, 2).save(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="pass that folder"):
        load_image_codec("kmeans_patches", str(tmp_path / "c" / "codebook.safetensors"))


def test_half_precision_centroids_are_accepted_and_cast(tmp_path):
    from safetensors.torch import save_file

    KMeansPatchCodec(torch.rand(6, 12) * 2 - 1, 2).save(str(tmp_path / "c"))
    save_file({"centroids": (torch.rand(6, 12) * 2 - 1).half()}, str(tmp_path / "c" / "codebook.safetensors"))
    assert load_image_codec("kmeans_patches", str(tmp_path / "c")).centroids.dtype == torch.float32


def test_the_build_refuses_nan_centroids_before_encoding(tmp_path):
    """NaN centroids still load (the sampler refuses the pixels they decode to), but the build only
    encodes, where they gave every patch the same code without a word."""
    from data_tools.codes import CodeEncoder

    centroids = torch.rand(6, 12) * 2 - 1
    centroids[2, 5] = float("nan")
    KMeansPatchCodec(centroids, 2).save(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="centroids hold NaN or inf values"):
        CodeEncoder("kmeans_patches", str(tmp_path / "c"), "cpu")


def test_identical_patches_converge_at_once():
    """Before: with fewer distinct patches than codes the empty clusters were refilled with copies of
    a patch every iteration, so the fit ran all its iterations and said it had not converged."""
    result = fit_kmeans(np.full((10, 12), 0.25), 4, max_iterations=50)
    assert result.converged and result.iterations == 2 and result.inertia == 0.0
    assert torch.equal(result.centroids, torch.full((4, 12), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("k,iterations", [(0, 5), (-2, 5), (3, 0)])
def test_fit_refuses_a_nonsense_codebook_size_or_iteration_count(k, iterations):
    """Before: k=0 returned one centroid, k<0 was a RuntimeError from bincount, 0 iterations the seeds."""
    with pytest.raises(ValueError, match="k-means needs k >= 1 and max_iterations >= 1"):
        fit_kmeans(np.random.default_rng(0).uniform(-1, 1, (20, 12)), k, max_iterations=iterations)


def test_the_distance_matrix_stays_bounded_for_a_large_codebook(monkeypatch):
    """Before, 8192 patches were compared with every centroid at once: with 65,536 codes that is a 4 GiB
    matrix (and as much again for the temporaries)."""
    from image_codecs import kmeans

    rng = np.random.default_rng(5)
    centroids = torch.from_numpy(rng.uniform(-1, 1, (4096, 3)))
    vectors = torch.from_numpy(rng.uniform(-1, 1, (8192, 3)))
    largest = []
    real_argmin = torch.argmin

    def measured_argmin(distances, dim):
        largest.append(distances.numel())
        return real_argmin(distances, dim=dim)

    monkeypatch.setattr(torch, "argmin", measured_argmin)
    codes = kmeans.nearest_centroid(vectors, centroids)
    monkeypatch.undo()
    assert max(largest) <= 1 << 24
    assert torch.equal(codes, torch.cdist(vectors, centroids).argmin(1))


@pytest.mark.parametrize("stopped", ["inside the codebook write", "between the two renames"])
def test_an_interrupted_save_never_leaves_a_damaged_or_mixed_codec(tmp_path, monkeypatch, stopped):
    """Before, the codebook was written in place: a stop inside it left a truncated file where the old
    codec was, and a stop before codec.json was replaced left the new codebook described by the old
    fit's codec.json, which loaded without a word."""
    import os

    import safetensors.torch

    folder = str(tmp_path / "c")
    old = KMeansPatchCodec(torch.rand(6, 12) * 2 - 1, 2, {"seed": 0})
    old.save(folder)
    new = KMeansPatchCodec(torch.rand(6, 12) * 2 - 1, 2, {"seed": 1})
    if stopped == "inside the codebook write":
        real_save = safetensors.torch.save_file

        def cut_short(tensors, path):
            real_save(tensors, path)
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    else:
        real_replace = os.replace

        def stop_before_the_config(src, dst):
            if str(dst).endswith("codec.json"):
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", stop_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.undo()
    if stopped == "inside the codebook write":  # the old codec, whole
        loaded = load_image_codec("kmeans_patches", folder)
        assert torch.equal(loaded.centroids, old.centroids) and loaded.fitted == {"seed": 0}
    else:  # an unfinished codec, refused as one, naming the file and saying what to do
        with pytest.raises(FileNotFoundError) as refused:
            load_image_codec("kmeans_patches", folder)
        message = str(refused.value)
        assert message.startswith(f"{os.path.join(folder, 'codec.json')} not found: ")
        assert "its save was interrupted; fit the codec again with `python -m data_tools fit-codec`" in message
    new.save(folder)  # saving again over what the stop left works
    loaded = load_image_codec("kmeans_patches", folder)
    assert torch.equal(loaded.centroids, new.centroids) and loaded.fitted == {"seed": 1}


def test_the_save_syncs_the_folder_after_removing_the_old_config_and_after_the_renames(tmp_path, monkeypatch):
    """Before, only the files were synced: after a power cut the renames (or the removal of the old
    codec.json, leaving it beside the new codebook) could be lost."""
    import os
    import stat

    folder = str(tmp_path / "c")
    KMeansPatchCodec(torch.rand(6, 12) * 2 - 1, 2).save(folder)
    events = []
    real_fsync, real_remove, real_replace = os.fsync, os.remove, os.replace

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            assert os.path.samestat(os.fstat(fd), os.stat(folder))
            events.append("sync folder")
        real_fsync(fd)

    def remove(path):
        events.append("remove " + os.path.basename(path))
        real_remove(path)

    def replace(src, dst):
        events.append("rename to " + os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "remove", remove)
    monkeypatch.setattr(os, "replace", replace)
    KMeansPatchCodec(torch.rand(6, 12) * 2 - 1, 2).save(folder)
    assert events == ["remove codec.json", "sync folder", "rename to codebook.safetensors", "rename to codec.json",
                      "sync folder"]
