"""``python -m pretrain.sample`` and ``python -m pretrain.chat`` end to end on tiny checkpoints.

The CLIs run in this process (``main(argv)``): a child process would spend most of the test budget
importing megatron-core and DeepSpeed. Only ``--help`` runs as ``python -m`` in a child.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.launch_helpers import REPO, child_env

SIGLIP = {"siglip_tiny": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2}}


@pytest.fixture(scope="module")
def files(tiny_model, tokenizer_dir, tmp_path_factory):
    """Our state (config in its metadata), the same weights in the released layout, a tiny VAE, an image."""
    from diffusers import AutoencoderKL

    from pretrain.convert.release import ours_to_release, release_config_json
    from pretrain.convert.state import full_model_state, save_state

    root = tmp_path_factory.mktemp("cli")
    cfg = tiny_model.cfg
    state = full_model_state(tiny_model)
    save_state(state, root / "ours" / "model.safetensors", {"model_config": json.dumps(dataclasses.asdict(cfg))})
    save_state(state, root / "bare.safetensors")  # no metadata: needs --config
    save_state(ours_to_release(state, cfg), root / "release" / "model.safetensors")
    (root / "release" / "config.json").write_text(json.dumps(release_config_json(cfg, "siglip_tiny")))
    (root / "siglip.json").write_text(json.dumps(SIGLIP))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    vae.save_pretrained(root / "vae")
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "image.png")
    return root, tokenizer_dir


def test_sample_cli(files, tiny_model, capsys):
    from pretrain.sample.__main__ import main
    from pretrain.sample.text_to_image import generation_prompt_ids, initial_noise, sample_latents
    from datacontract.tokenizer import load_tokenizer

    root, tok = files
    prompts = ["a red cat", "a blue cup on a table"]
    common = ["--tokenizer", tok, "--steps", "2", "--cfg", "2.5", "--seed", "3", "--vae", str(root / "vae"),
              "--save-latents", "--batch-size", "1"] + [a for p in prompts for a in ("--prompt", p)]
    assert main(["--checkpoint", str(root / "ours" / "model.safetensors"), "--out", str(root / "a")] + common) == 0
    assert "a red cat" in capsys.readouterr().out
    assert main(["--checkpoint", str(root / "release"), "--siglip", str(root / "siglip.json"),
                 "--latent-size", "8", "--out", str(root / "b")] + common) == 0
    for out in ("a", "b"):
        for i in range(2):
            assert Image.open(root / out / f"{i:03d}.png").size == (16, 16)

    from safetensors.torch import load_file

    ours, released = (load_file(str(root / out / "latents.safetensors"))["latents"] for out in ("a", "b"))
    tokenizer = load_tokenizer(tok)
    ids = [generation_prompt_ids(tokenizer, p, tokenizer.bos_token_id) for p in prompts]
    z0 = initial_noise(tiny_model, 2, torch.Generator().manual_seed(3))
    expected = sample_latents(tiny_model, ids, steps=2, cfg_weight=2.5, z0=z0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(released, expected, atol=1e-5, rtol=0)


def test_chat_cli(files, capsys):
    from pretrain.chat import main

    root, tok = files
    base = ["--checkpoint", str(root / "ours"), "--tokenizer", tok, "--image", str(root / "image.png"),
            "--question", "What is in the picture?", "--max-new-tokens", "4"]
    answers = []
    for extra in ([], ["--no-cache"], ["--top-p", "0.9", "--seed", "1"], ["--top-p", "0.9", "--seed", "1"]):
        assert main(base + extra) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[2] == answers[3]


def test_cli_errors(files, capsys):
    from pretrain.sample.__main__ import main

    root, tok = files
    args = ["--tokenizer", tok, "--prompt", "x", "--out", str(root / "never")]
    assert main(["--checkpoint", str(root / "bare.safetensors")] + args) == 1
    assert "pass --config" in capsys.readouterr().err
    assert main(["--checkpoint", str(root / "ours")] + args) == 1  # latents need a VAE
    assert "--vae" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["pretrain.sample", "pretrain.chat"])
def test_help(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--checkpoint" in run.stdout and "Example" in run.stdout
