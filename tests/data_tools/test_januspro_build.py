"""``build --family januspro``: Janus-Pro's document layouts (format.py) with the image codes of a codec
in the shards, checked against the stored pixels encoded by a brute-force nearest-centroid search;
the codec is an input like the files (a changed codec is refused on resume and on a re-run)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_tools.cli import main
from data_tools.documents import DocumentBuilder, LayoutOptions
from data_tools.sources import RawRecord
from data_tools.synthetic import encode, make_image, tiny_build_args
from data_tools.verify import verify
from datacontract.format import COL_DOC_LENGTHS, COL_DOC_TASKS, COL_GEN_IMAGES, Task, TokenKind
from datacontract.shards import ShardLayout, ShardReader, decode_image, read_manifest
from datacontract.tokenizer import resolve_token_spec
from image_codecs.kmeans import KMeansPatchCodec
from tests.launch_helpers import REPO, child_env

PATCH, CODES = 8, 16  # resolution 32 -> a 4 x 4 grid of codes


def _codec(folder, seed=0):
    rng = np.random.default_rng(seed)
    codec = KMeansPatchCodec(torch.from_numpy(rng.uniform(-1, 1, (CODES, PATCH * PATCH * 3)).astype(np.float32)), PATCH)
    codec.save(str(folder))
    return codec


def _args(corpus, tok, out, codec_dir, *extra):
    return tiny_build_args({k: corpus[k] for k in ("und_wds", "gen_wds", "llava", "llava_image_root", "text_jsonl")},
                           tok, out, "--family", "januspro", "--codec", "kmeans_patches", "--codec-path",
                           str(codec_dir), "--image-format", "png", *extra)


def _brute_force_codes(image: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """uint8 [R, R, 3] -> codes, row-major, each patch as (row, column, RGB) in [-1, 1]."""
    x = image.astype(np.float64) / 127.5 - 1
    side = image.shape[0] // PATCH
    out = []
    for gy in range(side):
        for gx in range(side):
            patch = x[gy * PATCH:(gy + 1) * PATCH, gx * PATCH:(gx + 1) * PATCH].reshape(-1)
            out.append(int(np.argmin(((centroids - patch) ** 2).sum(1))))
    return np.array(out)


def test_januspro_document_layouts(tokenizer):
    sp = resolve_token_spec(tokenizer)
    b = DocumentBuilder(tokenizer, sp, LayoutOptions(seq_length=256, resolution=32, gen_downsample=8, gen_patch=1,
                                                     family="januspro"))
    img = encode(make_image(50, 40, 0))
    und = b.build(RawRecord("s.tar", "k", Task.UNDERSTANDING, images=[img], caption="a red cat"))
    assert not (und.token_kind == TokenKind.UND_IMAGE_BEGIN).any()
    first = int(np.flatnonzero(und.token_kind == TokenKind.UND_IMAGE)[0])
    assert und.input_ids[first - 1] == sp.begin_of_image_id and und.token_kind[first - 1] == TokenKind.TEXT
    assert (und.token_kind[first:first + 4] == TokenKind.UND_IMAGE).all()  # (32 / 16)^2 positions
    assert und.input_ids[first + 4] == sp.end_of_image_id
    gen = b.build(RawRecord("s.tar", "k", Task.GENERATION, images=[img], caption="a red cat"))
    kinds, ids, tgt = gen.token_kind, gen.input_ids, gen.target_mask
    assert ids[0] == sp.bos_id
    assert ids[-18] == sp.begin_of_image_id and kinds[-18] == TokenKind.TEXT and tgt[-18] == 0
    assert (kinds[-17:-1] == TokenKind.GEN_CODE).all() and (tgt[-17:-1] == 1).all()
    assert ids[-1] == sp.end_of_image_id and kinds[-1] == TokenKind.TEXT and tgt[-1] == 0
    assert tgt.sum() == 16 and not ((kinds == TokenKind.GEN_TIME) | (kinds == TokenKind.GEN_LATENT)).any()
    assert tokenizer.decode(ids[1:-18].tolist()) == "User: a red cat\n\nAssistant:"


@pytest.fixture(scope="module")
def jp_build(corpus, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("jp")
    codec = _codec(root / "codec")
    out = str(root / "out")
    assert main(_args(corpus, tokenizer_dir, out, root / "codec")) == 0
    return out, codec, root


def test_shards_hold_the_codec_codes_of_the_stored_images(jp_build, tokenizer):
    out, codec, _ = jp_build
    m = read_manifest(out)
    layout = ShardLayout.from_json(m["layout"])
    assert layout.family == "januspro" and layout.gen_tokens_per_image == 16 and layout.code_grid == (4, 4)
    assert layout.image_codec == codec.describe() and layout.pad_id == resolve_token_spec(tokenizer).pad_id
    assert verify(out) == []
    centroids = codec.centroids.double().numpy()
    checked = 0
    for task in ("gen", "und"):
        for shard in m["tasks"][task]["shards"]:
            reader = ShardReader(os.path.join(out, shard["path"]))
            assert reader.layout == layout
            for i in range(reader.num_rows):
                row = reader.read_row(i)
                ids, kinds = np.asarray(row["input_ids"]), np.asarray(row["token_kind"])
                codes = ids[kinds == TokenKind.GEN_CODE].reshape(-1, 16)
                assert len(codes) == len(row[COL_GEN_IMAGES]) == sum(t == Task.GENERATION for t in row[COL_DOC_TASKS])
                for image, got in zip(row[COL_GEN_IMAGES], codes):
                    assert np.array_equal(got, _brute_force_codes(decode_image(image), centroids))
                    checked += 1
                assert sum(row[COL_DOC_LENGTHS]) == len(ids)
    assert checked == m["tasks"]["gen"]["documents"]["gen"] > 0


def test_a_changed_codec_is_refused_like_a_changed_input(jp_build, corpus, tokenizer_dir, capsys):
    out, codec, root = jp_build
    assert main(_args(corpus, tokenizer_dir, out, root / "codec")) == 0  # unchanged: already complete
    other = root / "codec2"
    _codec(other, seed=1)
    os.replace(other / "codebook.safetensors", root / "codec" / "codebook.safetensors")
    try:
        capsys.readouterr()
        assert main(_args(corpus, tokenizer_dir, out, root / "codec")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "changed image codec" in err and "--overwrite" in err
    finally:
        codec.save(str(root / "codec"))


def test_codec_options_are_checked_before_out_is_touched(corpus, tokenizer_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = tiny_build_args({"gen_wds": corpus["gen_wds"]}, tokenizer_dir, out, "--family", "januspro")
    assert main(args) == 2
    assert "--family januspro needs --codec" in capsys.readouterr().err
    assert main(args + ["--codec", "kmeans_patches", "--codec-path", str(tmp_path / "nope")]) == 2
    assert "--codec-path" in capsys.readouterr().err
    _codec(tmp_path / "c")
    assert main(tiny_build_args({"gen_wds": corpus["gen_wds"]}, tokenizer_dir, out, "--codec", "kmeans_patches",
                                "--codec-path", str(tmp_path / "c"))) == 2
    assert "add --family januspro" in capsys.readouterr().err
    assert main(args + ["--codec", "kmeans_patches", "--codec-path", str(tmp_path / "c"), "--resolution", "36",
                        "--und-patch", "4"]) == 2
    assert "multiple of the codec's downsampling 8" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_a_killed_januspro_build_resumes_to_the_same_bytes_and_refuses_another_codec(jp_build, corpus, tokenizer_dir,
                                                                                    tmp_path, capsys):
    ref, _, root = jp_build
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "data_tools", *_args(corpus, tokenizer_dir, out, root / "codec", "--debug-kill-after", "2")]
    assert subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, timeout=300).returncode == -9
    assert main(_args(corpus, tokenizer_dir, out, root / "codec")) == 0
    assert _shard_bytes(out) == _shard_bytes(ref)
    # Interrupted again, then resumed with other codec weights at the same path: refused, one line.
    out2 = str(tmp_path / "out2")
    _codec(tmp_path / "codec", seed=0)
    cmd = [sys.executable, "-m", "data_tools", *_args(corpus, tokenizer_dir, out2, tmp_path / "codec",
                                                      "--debug-kill-after", "2")]
    assert subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, timeout=300).returncode == -9
    _codec(tmp_path / "codec", seed=5)
    capsys.readouterr()
    assert main(_args(corpus, tokenizer_dir, out2, tmp_path / "codec")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "changed image codec" in err


def _shard_bytes(folder):
    m = read_manifest(folder)
    return [open(os.path.join(folder, s["path"]), "rb").read() for t in m["tasks"].values() for s in t["shards"]]


@pytest.mark.slow
def test_spawned_codec_workers_give_the_same_shards(jp_build, corpus, tokenizer_dir, tmp_path):
    """Two spawned workers (one torch thread each) write the bytes of the one-process build."""
    ref, _, root = jp_build
    out = str(tmp_path / "out")
    args = _args(corpus, tokenizer_dir, out, root / "codec")
    args[args.index("--workers") + 1] = "2"
    assert main(args) == 0
    assert _shard_bytes(out) == _shard_bytes(ref)


@pytest.mark.gpu
def test_codes_on_the_gpu_equal_the_cpu_build(jp_build, corpus, tokenizer_dir, tmp_path):
    ref, _, root = jp_build
    out = str(tmp_path / "out")
    assert main(_args(corpus, tokenizer_dir, out, root / "codec", "--codec-device", "cuda")) == 0
    assert _shard_bytes(out) == _shard_bytes(ref)
