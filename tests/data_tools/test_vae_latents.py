"""Offline VAE latents: stored once per generation image, in the layout's shape and dtype."""

import os

import numpy as np
import pytest

from data_tools.cli import main
from data_tools.synthetic import tiny_build_args
from datacontract.format import COL_GEN_LATENT_DTYPE, COL_GEN_LATENTS
from datacontract.shards import ShardReader, decode_image, decode_latent, read_manifest
from data_tools.verify import verify


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    )
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path, vae


def test_latents_are_stored_and_match_the_vae(corpus, tokenizer_dir, vae_dir, tmp_path):
    import torch

    path, vae = vae_dir
    out = str(tmp_path / "out")
    args = tiny_build_args({k: corpus[k] for k in ("gen_wds", "text_jsonl")}, tokenizer_dir, out,
                           "--vae", path, "--vae-device", "cpu", "--image-format", "png", "--latent-dtype", "bfloat16")
    assert main(args) == 0
    m = read_manifest(out)
    assert m["layout"]["latent_shape"] == [4, 4, 4] and m["layout"]["latent_dtype"] == "bfloat16"
    assert "torch" in m["versions"]
    assert verify(out) == []
    row = ShardReader(os.path.join(out, m["tasks"]["gen"]["shards"][0]["path"])).read_row(0)
    assert row[COL_GEN_LATENT_DTYPE] == "bfloat16" and len(row[COL_GEN_LATENTS]) == len(row["gen_images"]) > 0
    pixels = np.stack([decode_image(b) for b in row["gen_images"]])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mode().numpy()
    got = np.stack([decode_latent(z, "bfloat16", (4, 4, 4)) for z in row[COL_GEN_LATENTS]])
    assert np.allclose(got, expected, rtol=1e-2, atol=1e-2)


def test_resume_refuses_other_vae_weights_naming_the_file(corpus, tokenizer_dir, vae_dir, tmp_path, capsys):
    """Before, only the VAE's path was compared: a resume after the weights were replaced stored the
    latents of two VAEs in one data set."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    path = shutil.copytree(vae_dir[0], str(tmp_path / "vae"))
    out = str(tmp_path / "out")
    args = tiny_build_args({k: corpus[k] for k in ("gen_wds", "text_jsonl")}, tokenizer_dir, out,
                           "--vae", path, "--vae-device", "cpu", "--image-format", "png")
    # Every unit done, the manifest not yet written: what an interruption at the very end leaves.
    assert main(args + ["--keep-work"]) == 0
    os.remove(os.path.join(out, "manifest.json"))
    torch.manual_seed(1)  # the same architecture, other weights
    other = str(tmp_path / "other")
    AutoencoderKL.from_config(AutoencoderKL.load_config(path)).save_pretrained(other)
    shutil.copy(os.path.join(other, "diffusion_pytorch_model.safetensors"), path)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "--overwrite" in err
    assert f"changed VAE {path} (diffusion_pytorch_model.safetensors content changed)" in err
