"""``python -m data_tools fit-codec`` fed hostile options and inputs: what cannot work is one ``error:``
line and exit status 2 (before any image is read where it can be known then), every image that cannot
be used is named and counted by reason, and nothing ends the fit with a traceback or hangs it."""

import os
import tarfile

import numpy as np
import pytest

from data_tools.cli import main
from data_tools.fit_codec import SeededSubsample, collect_patches
from data_tools.synthetic import encode, make_image, write_tar
from image_codecs import load_image_codec

FIT = {"--codebook-size": "2", "--patch": "4", "--resolution": "8"}  # 4 patches per image


def _png(seed, side=12):
    return encode(make_image(side, side - 2, seed), "PNG")


def _fit(images, out, **options):
    argv = ["fit-codec", "--images", str(images), "--out", str(out)]
    for option, value in {**FIT, **{"--" + k.replace("_", "-"): v for k, v in options.items()}}.items():
        argv += [option, value]
    return main(argv)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"im{i}.png").write_bytes(_png(i))
    return folder


NONSENSE = [("codebook_size", "0"), ("codebook_size", "-3"), ("patch", "0"), ("patch", "-4"),
            ("resolution", "0"), ("max_images", "0"), ("max_patches", "0"), ("max_patches", "-1"),
            ("iterations", "0")]


@pytest.mark.parametrize("option,value", NONSENSE, ids=[f"{o}={v}" for o, v in NONSENSE])
def test_a_number_that_makes_no_sense_is_refused_by_the_option_parser(images, tmp_path, capsys, option, value):
    """Before: --codebook-size 0 saved a one-code codec and --iterations 0 an unfitted one; -3, --patch 0,
    --resolution 0 and --max-patches -1 were tracebacks; --max-images 0 said no image could be read."""
    with pytest.raises(SystemExit) as stop:
        _fit(images, tmp_path / "codec", **{option: value})
    assert stop.value.code == 2
    assert f"argument --{option.replace('_', '-')}: {value} must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "codec").exists()


def _unusable_inputs(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no image here")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "junk" / "bad.tar").write_bytes(b"x" * 3000)


REFUSED = [
    ("more codes than patches", "imgs", {"codebook_size": "13"}, "12 patches (from 3 images) cannot make 13 codes"),
    ("more codes than --max-patches", "imgs", {"codebook_size": "8", "max_patches": "4"},
     "--codebook-size 8 needs at least as many patches, but --max-patches is 4"),
    ("a patch that does not divide the image", "imgs", {"patch": "3"}, "--patch 3 must divide --resolution 8"),
    ("a glob matching nothing", "nothing/*.png", {}, "--images '{tmp}/nothing/*.png' matches no image"),
    ("a folder without images", "notes", {}, "--images '{tmp}/notes': no image (jpg, "),
    ("no image readable", "junk", {}, "--images: no image could be read (corrupt_image 1, damaged_archive 1)"),
]


@pytest.mark.parametrize("inputs,options,message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_cannot_make_a_codec_is_one_error_line_and_exit_status_2(images, tmp_path, capsys, inputs, options,
                                                                     message):
    """Before: tracebacks (ValueError from the fit), or exit status 1 through SystemExit."""
    _unusable_inputs(tmp_path)
    assert _fit(tmp_path / inputs, tmp_path / "codec", **options) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message.format(tmp=tmp_path) in err
    assert "Traceback" not in err and not (tmp_path / "codec").exists()  # before: an empty --out was left


def test_a_negative_seed_is_refused_by_the_option_parser(images, tmp_path, capsys):
    """Before: a numpy traceback ("expected non-negative integer") from the subsample's generator,
    after --out had been made."""
    with pytest.raises(SystemExit) as stop:
        _fit(images, tmp_path / "codec", seed="-1")
    assert stop.value.code == 2
    assert "argument --seed: -1 must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "codec").exists()


def test_out_is_made_by_the_save_only_so_a_fit_that_stops_leaves_nothing(images, tmp_path, capsys, monkeypatch):
    """Before, --out (and the folders above it) were made before the fit: a refusal after reading (no
    readable image, too few patches) or a crash left them behind, empty."""
    out = tmp_path / "new" / "deeper" / "codec"
    before = sorted(os.listdir(tmp_path))
    assert _fit(images, out, codebook_size="13") == 2  # refused after every image was read
    assert "cannot make 13 codes" in capsys.readouterr().err

    def crash(*args, **kwargs):
        raise RuntimeError("a crash in the middle of the fit")

    monkeypatch.setattr("image_codecs.kmeans.fit_kmeans", crash)
    with pytest.raises(RuntimeError, match="a crash in the middle"):
        _fit(images, out)
    assert sorted(os.listdir(tmp_path)) == before  # no folder, no write-test file left
    monkeypatch.undo()
    assert _fit(images, out) == 0  # the save makes the folders
    assert sorted(os.listdir(out)) == ["codebook.safetensors", "codec.json"]


def test_an_out_below_a_folder_that_cannot_be_written_is_refused_before_any_image_is_read(images, tmp_path,
                                                                                          capsys, monkeypatch):
    """The nearest existing folder above a missing --out is checked (the tests run as root, which
    writes anywhere, so its refusal is simulated)."""
    import data_tools.fit_codec

    def no_reading(*args, **kwargs):
        raise AssertionError("images were read before --out was checked")

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(locked) and real_access(path, mode))
    monkeypatch.setattr(data_tools.fit_codec, "collect_patches", no_reading)
    out = locked / "sub" / "codec"
    assert _fit(images, out) == 2
    assert f"error: --out {out}: cannot write there (Permission denied: {locked})" in _one_error_line(capsys)
    assert os.listdir(locked) == []


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_out_that_cannot_hold_the_codec_is_refused_before_any_image_is_read(images, tmp_path, capsys,
                                                                                monkeypatch, where):
    """Before: a FileExistsError/NotADirectoryError traceback, after the whole fit."""
    import data_tools.fit_codec

    def no_reading(*args, **kwargs):
        raise AssertionError("images were read before --out was checked")

    monkeypatch.setattr(data_tools.fit_codec, "collect_patches", no_reading)
    blocker = tmp_path / "codec"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "sub"
    assert _fit(images, out) == 2
    assert f"error: --out {out}" in _one_error_line(capsys)
    assert blocker.read_text() == "not a folder"


@pytest.mark.timeout(60)  # a pipe among the images must be rejected, not opened and waited on
def test_images_that_cannot_be_used_are_named_and_counted_by_reason(images, tmp_path, capsys):
    """Before: a dangling link or a link loop ended the fit with a traceback (and so did a file name
    that is not UTF-8); a pipe hung it; a linked folder was left out without a word."""
    os.symlink("nowhere.png", images / "a_dangling.png")
    os.symlink("a_loop.png", images / "a_loop.png")
    os.mkfifo(images / "b_pipe.png")
    with open(os.fsencode(images) + b"/caf\xe9.png", "wb") as f:
        f.write(_png(7))
    (images / "cut.png").write_bytes(_png(8)[:40])
    os.symlink(str(tmp_path), images / "linked_folder")  # would loop if it were followed
    assert _fit(images, tmp_path / "codec") == 0
    fitted = load_image_codec("kmeans_patches", str(tmp_path / "codec")).fitted
    assert fitted["images"] == 3 and fitted["images_unreadable"] == 6
    assert fitted["images_unreadable_by_reason"] == {"unreadable_file": 2, "unsupported_member": 1,
                                                     "invalid_unicode": 1, "corrupt_image": 1, "link_member": 1}
    err = capsys.readouterr().err
    for name in ("a_dangling.png", "a_loop.png", "b_pipe.png", "cut.png", "linked_folder"):
        assert f"skipped {images / name}: " in err
    assert f"skipped {images}/caf\\udce9.png: invalid_unicode" in err and "6 unreadable: " in err


def test_a_folder_that_cannot_be_listed_is_counted_not_silently_left_out(images, tmp_path, capsys, monkeypatch):
    """os.walk skips a folder it cannot list without a word (root can read everything, so the
    permission error is simulated)."""
    locked = images / "locked"
    locked.mkdir()
    (locked / "a.png").write_bytes(_png(5))
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert _fit(images, tmp_path / "codec") == 0
    fitted = load_image_codec("kmeans_patches", str(tmp_path / "codec")).fitted
    assert fitted["images"] == 3 and fitted["images_unreadable_by_reason"] == {"unreadable_file": 1}
    assert f"skipped {locked}: unreadable_file: a folder that could not be listed" in capsys.readouterr().err


def test_a_cut_tar_is_counted_not_silently_short(tmp_path, capsys):
    """Before: the images lost in the cut were not mentioned anywhere (0 unreadable)."""
    tar = write_tar(str(tmp_path / "a.tar"), [(f"k{i}.png", _png(i, 40)) for i in range(4)])
    with tarfile.open(tar) as t:
        cut_at = t.getmember("k2.png").offset_data + 10
    with open(tar, "rb") as f:
        data = f.read()
    with open(tar, "wb") as f:
        f.write(data[:cut_at])
    assert _fit(tar, tmp_path / "codec") == 0
    fitted = load_image_codec("kmeans_patches", str(tmp_path / "codec")).fitted
    assert fitted["images"] == 2 and fitted["images_unreadable_by_reason"] == {"truncated_archive": 1}
    assert f"skipped {tar}: truncated_archive: " in capsys.readouterr().err


def test_a_file_whose_name_looks_like_a_glob_is_read_as_itself(tmp_path):
    """Before: 'shot[1].png' was taken as a glob, matched nothing, and the fit stopped."""
    (tmp_path / "shot[1].png").write_bytes(_png(0))
    assert _fit(tmp_path / "shot[1].png", tmp_path / "codec") == 0
    assert load_image_codec("kmeans_patches", str(tmp_path / "codec")).fitted["images"] == 1


def test_identical_patches_converge_at_once_and_say_the_codes_repeat(tmp_path, capsys):
    """Before: the fit refilled the empty clusters with copies of the one patch for all 50 iterations,
    then reported 'not converged', with no word that three of the four codes are duplicates."""
    from PIL import Image

    (tmp_path / "flat.png").write_bytes(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG"))
    assert _fit(tmp_path / "flat.png", tmp_path / "codec", codebook_size="4") == 0
    fitted = load_image_codec("kmeans_patches", str(tmp_path / "codec")).fitted
    assert fitted["converged"] and fitted["iterations"] == 2 and fitted["distinct_codes"] == 1
    assert "warning: only 1 distinct patches: 3 of the 4 codes repeat others" in capsys.readouterr().err


def test_the_patches_held_are_bounded_by_max_patches_not_by_the_number_of_images(tmp_path):
    """Before, every patch of every image was kept until the end and only then subsampled: at the
    build's resolutions, 20,000 images are tens of gigabytes. Measured with tracemalloc (numpy's
    allocations are traced): all the patches of these images take 2.4 MB as float32."""
    import tracemalloc

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(200):
        (folder / f"im{i:03d}.png").write_bytes(_png(i, 34))
    all_patch_bytes = 200 * 32 * 32 * 3 * 4
    # A first fit of one image makes every lazy import now, so that it is not measured.
    assert _fit(folder, tmp_path / "warm-up", resolution="32", patch="1", max_images="1", max_patches="64") == 0
    tracemalloc.start()
    try:
        assert _fit(folder, tmp_path / "codec", resolution="32", patch="1", max_patches="64", iterations="2") == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert load_image_codec("kmeans_patches", str(tmp_path / "codec")).fitted["patches"] == 64
    assert peak < all_patch_bytes / 3, peak


def test_a_codec_already_in_out_is_replaced_and_said_so(images, tmp_path, capsys):
    out = tmp_path / "codec"
    assert _fit(images, out, seed="1") == 0
    first = load_image_codec("kmeans_patches", str(out)).fitted
    capsys.readouterr()
    assert _fit(images, out, seed="2") == 0
    assert f"replacing the codec in {out}" in capsys.readouterr().err
    assert load_image_codec("kmeans_patches", str(out)).fitted["seed"] == 2 != first["seed"]
    assert sorted(os.listdir(out)) == ["codebook.safetensors", "codec.json"]  # no temporary file left


def test_a_full_disk_at_the_save_is_one_error_line(images, tmp_path, capsys, monkeypatch):
    """Before: an OSError traceback at the end of the fit."""
    from image_codecs.kmeans import KMeansPatchCodec

    def full(self, folder):
        raise OSError(28, "No space left on device", os.path.join(folder, "codebook.safetensors.tmp"))

    monkeypatch.setattr(KMeansPatchCodec, "save", full)
    assert _fit(images, tmp_path / "codec") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: --out {tmp_path / 'codec'}: cannot write ") and "No space left on device" in err


# ------------------------------------------------------------------ the seeded subsample, by reference


def _reference_subsample(rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Independent reference: one key per row from one draw of the generator, the ``size`` smallest
    keys kept, in stream order."""
    keys = np.random.default_rng([seed, 1]).random(len(rows))
    return rows[np.sort(np.argsort(keys, kind="stable")[:size])]


def _subsample(rows: np.ndarray, size: int, seed: int, block_sizes) -> np.ndarray:
    sample = SeededSubsample(size, np.random.default_rng([seed, 1]))
    start, i = 0, 0
    while start < len(rows):
        n = block_sizes[i % len(block_sizes)]
        sample.add(rows[start:start + n])
        start, i = start + n, i + 1
    assert sample.seen == len(rows)
    return sample.rows()


def test_drawing_keys_block_by_block_is_one_draw_of_them_all():
    """What the reference rests on: SeededSubsample draws rng.random(len(block)) per block."""
    whole = np.random.default_rng([3, 1]).random(100)
    rng = np.random.default_rng([3, 1])
    assert np.array_equal(np.concatenate([rng.random(n) for n in (1, 7, 0, 30, 62)]), whole)


@pytest.mark.parametrize("seed", [0, 1, 12345])
@pytest.mark.parametrize("blocks", [[1], [7], [16, 3, 41], [1000]], ids=lambda b: "blocks " + ",".join(map(str, b)))
def test_the_subsample_keeps_the_rows_of_the_smallest_keys_in_stream_order(seed, blocks):
    rows = np.arange(500 * 3, dtype=np.float32).reshape(500, 3)  # every row distinct: its index x 3
    got = _subsample(rows, 40, seed, blocks)
    assert np.array_equal(got, _reference_subsample(rows, 40, seed))
    assert got.shape == (40, 3) and np.all(np.diff(got[:, 0]) > 0)  # in stream order


def test_the_subsample_does_not_depend_on_how_the_stream_is_cut_but_on_the_seed():
    rows = np.arange(300 * 2, dtype=np.float32).reshape(300, 2)
    cuts = [_subsample(rows, 25, 7, blocks) for blocks in ([1], [4], [13, 2], [50], [300])]
    assert all(np.array_equal(c, cuts[0]) for c in cuts[1:])
    assert not np.array_equal(_subsample(rows, 25, 8, [4]), cuts[0])


@pytest.mark.parametrize("total", [1, 24, 25])
def test_a_stream_no_longer_than_the_size_is_kept_whole_in_order(total):
    rows = np.arange(total * 2, dtype=np.float32).reshape(total, 2)
    assert np.array_equal(_subsample(rows, 25, 0, [3]), rows)


def test_the_fit_subsamples_the_patches_by_the_reference_with_its_seed(images):
    """collect_patches draws its subsample with default_rng([seed, 1]) over the patches in reading order."""
    every = collect_patches([str(p) for p in sorted(images.iterdir())], 8, 2, 5, 100, 10**6, log=lambda m: None)
    assert every.total == len(every.patches) == 3 * 16
    some = collect_patches([str(p) for p in sorted(images.iterdir())], 8, 2, 5, 100, 10, log=lambda m: None)
    assert some.total == 48 and np.array_equal(some.patches, _reference_subsample(every.patches, 10, 5))
