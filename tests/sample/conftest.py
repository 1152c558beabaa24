"""A tiny fp32 JanusFlow shared by the sampler tests (CPU, random weights, eval mode), and the
files the CLI tests run it from."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import _tiny_model_config
from tests.data_fixtures import tokenizer_dir  # noqa: F401  (the 400-token test tokenizer)

TINY_VOCAB = 512  # room for the 400-token test tokenizer of data_tools.synthetic


def tiny_sampling_config():
    from pretrain.model.config import LLMConfig

    llm = LLMConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_hidden_size=128, num_layers=2,
                    num_attention_heads=4, num_query_groups=2)
    return _tiny_model_config(llm=llm)


@pytest.fixture(scope="session")
def tiny_model(runtime):
    from pretrain.model.janusflow import JanusFlowModel

    torch.manual_seed(0)
    return JanusFlowModel(tiny_sampling_config()).eval()


SIGLIP = {"siglip_tiny": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2}}


@pytest.fixture(scope="session")
def cli_files(tiny_model, tokenizer_dir, tmp_path_factory):
    """(root, tokenizer folder): under root, our state with its config in the metadata
    (ours/model.safetensors), the same without metadata (bare.safetensors), the same weights in the
    released layout (release/: model.safetensors + config.json), siglip.json, a tiny VAE (vae/) and an
    image (image.png). Tests that damage a file copy it first."""
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
