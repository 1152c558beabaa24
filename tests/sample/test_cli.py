"""``python -m pretrain.sample`` and ``python -m pretrain.chat`` end to end on tiny checkpoints.

The CLIs run in this process (``main(argv)``): a child process would spend most of the test budget
importing megatron-core and DeepSpeed. Only ``--help`` runs as ``python -m`` in a child.
"""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.launch_helpers import REPO, child_env


@pytest.fixture(scope="module")
def files(cli_files):
    """Our state, the same weights released, a tiny VAE, an image (``conftest.cli_files``)."""
    return cli_files


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
