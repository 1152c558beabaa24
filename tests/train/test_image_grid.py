"""The trainer's periodic sample grid: shape and determinism, EMA weights swapped in and the raw
weights restored bit for bit, TensorBoard + PNG output, prompts from the shards' tokenizer (or random
tokens on synthetic data), the one-time messages that turn it off, and recipe validation."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from pretrain.model.config import ConfigError
from pretrain.recipe import build_recipe, load_recipe
from pretrain.runtime.layout import ParallelLayout
from pretrain.train.ema import EMA
from pretrain.train.image_grid import (
    TAG_RANDOM_TOKEN_PROMPTS,
    TAG_TEXT_PROMPTS,
    SampleGrid,
    tile_images,
)
from pretrain.train.monitor import NullMonitor, TensorBoardMonitor
from tests.launch_helpers import REPO

RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
FEW = ["train.image_interval=2", "train.image_euler_steps=3", "train.image_prompts=[a red apple, a blue sky, a cat]"]


def tiny_recipe(tmp_path, *overrides: str):
    return load_recipe(RECIPE, [f"train.output_dir={tmp_path}", *FEW, *overrides])


def make_grid(recipe, messages=None):
    from pretrain.model.latent_codec import build_latent_codec

    log = (lambda _m: None) if messages is None else messages.append
    return SampleGrid(recipe, build_latent_codec(recipe.model), log=log)


@pytest.fixture
def model_and_ema(runtime, tmp_path):
    """The tiny_cpu model in train mode (SigLIP in eval, as a frozen part may be) and an EMA whose
    averages differ from the raw weights."""
    from pretrain.model.janusflow import JanusFlowModel

    torch.manual_seed(0)
    model = JanusFlowModel(tiny_recipe(tmp_path).model).train()
    model.und_encoder.eval()
    ema = EMA(model, decay=0.9)
    g = torch.Generator().manual_seed(1)
    for average in ema.shadow.values():
        average.add_(0.05 * torch.randn(average.shape, generator=g))
    return model, ema


def test_grid_shape_and_determinism(model_and_ema, tmp_path):
    model, ema = model_and_ema
    grid = make_grid(tiny_recipe(tmp_path))
    first, second = grid.sample(model, ema), grid.sample(model, ema)
    # 3 tiles of 32 px enlarged 4x to 128, in one row, 2 px borders around each
    assert first.shape == (3, 128 + 4, 3 * 130 + 2) and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, second)
    assert torch.equal(first[:, :2], torch.ones_like(first[:, :2]))  # the top border
    assert grid.prompts.tag == TAG_RANDOM_TOKEN_PROMPTS  # tiny_cpu trains on synthetic batches


def test_grid_uses_the_ema_weights_and_restores_the_raw_ones(model_and_ema, tmp_path):
    model, ema = model_and_ema
    grid = make_grid(tiny_recipe(tmp_path))
    raw = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()

    from_ema = grid.sample(model, ema)

    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name]) and p.dtype == raw[name].dtype, name
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    # The same grid from a model that holds the EMA averages as its own weights...
    from pretrain.model.janusflow import JanusFlowModel

    holder = JanusFlowModel(model.cfg)
    holder.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(ema.shadow[name].reshape(p.shape))
    assert torch.equal(grid.sample(holder, EMA(holder)), from_ema)
    # ...and not the grid of the raw weights.
    assert not torch.equal(grid.sample(model, EMA(model)), from_ema)


def test_tensorboard_and_png_at_the_interval(model_and_ema, tmp_path):
    from PIL import Image

    model, ema = model_and_ema
    recipe = tiny_recipe(tmp_path)
    grid = make_grid(recipe)
    monitor = TensorBoardMonitor(tmp_path)
    logged = {step: grid.maybe_log(step, model, ema, monitor) for step in range(1, 5)}
    monitor.close()
    assert [s for s, g in logged.items() if g is not None] == [2, 4]

    for step in (2, 4):
        png = np.asarray(Image.open(tmp_path / "samples" / f"step_{step:07d}.png"))
        expected = (logged[step] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(png, expected)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]

    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == [TAG_RANDOM_TOKEN_PROMPTS]
    images = events.Images(TAG_RANDOM_TOKEN_PROMPTS)
    assert [(e.step, e.height, e.width) for e in images] == [(2, 132, 392), (4, 132, 392)]


def test_non_finite_ema_weights_skip_the_grid_and_the_run_goes_on(model_and_ema, tmp_path):
    # Before: NaN averages gave NaN latents, and the grid's PNG writer refused them with an exception
    # that stopped the training run (Janus-Pro's sampler stopped it in torch.multinomial).
    model, ema = model_and_ema
    raw = {name: p.detach().clone() for name, p in model.named_parameters()}
    for average in ema.shadow.values():
        average.fill_(float("nan"))
    messages: list[str] = []
    monitor = TensorBoardMonitor(tmp_path)
    assert make_grid(tiny_recipe(tmp_path), messages).maybe_log(2, model, ema, monitor) is None
    monitor.close()
    assert messages[-1] == ("sample grid of step 2 skipped: the sampled grid's latents or codes hold NaN or inf "
                            "values; nothing was written for them: the EMA weights may hold NaN or inf")
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())
    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name]), name


def test_only_replica_zero_samples_and_only_a_recording_monitor_decodes(model_and_ema, tmp_path):
    model, ema = model_and_ema
    recipe = tiny_recipe(tmp_path)
    from pretrain.model.latent_codec import build_latent_codec

    second_replica = ParallelLayout(rank=1, world_size=2, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=1,
                                    dp_size=2, device=torch.device("cpu"))
    other_replica = SampleGrid(recipe, build_latent_codec(recipe.model), second_replica, log=lambda _m: None)
    assert other_replica.maybe_log(2, model, ema, TensorBoardMonitor(tmp_path)) is None
    assert not (tmp_path / "samples").exists()
    # A tensor-parallel peer of rank 0 (NullMonitor) samples but neither decodes nor logs.
    assert make_grid(recipe).maybe_log(2, model, ema, NullMonitor()) is None


def test_missing_decoder_turns_the_grid_off_once(tmp_path):
    messages = []
    no_codec = SampleGrid(tiny_recipe(tmp_path), None, log=messages.append)
    assert not no_codec.enabled and "init.vae" in messages[0]
    assert not make_grid(tiny_recipe(tmp_path, "train.image_interval=0"), messages).due(2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A small real build (generation and text documents) of the test tokenizer: (root, tokenizer)."""
    from data_tools.cli import main
    from data_tools.synthetic import make_corpus, tiny_build_args, tiny_tokenizer

    base = tmp_path_factory.mktemp("grid_shards")
    paths = make_corpus(str(base / "raw"), n_und=0, n_gen=4, n_llava=0, n_text=4)
    paths = {k: v for k, v in paths.items() if k in ("gen_wds", "text_jsonl")}
    tokenizer = tiny_tokenizer(str(base / "tokenizer"))
    assert main(tiny_build_args(paths, tokenizer, str(base / "out"))) == 0
    return base / "out", tokenizer


def test_prompts_are_tokenized_with_the_tokenizer_of_the_shards(shards, model_and_ema, tmp_path):
    from datacontract.tokenizer import load_tokenizer
    from pretrain.sample.text_to_image import generation_prompt_ids

    root, tokenizer_dir = shards
    grid = make_grid(tiny_recipe(tmp_path, f"data.root={root}"))
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = ("a red apple", "a blue sky", "a cat")
    expected = [generation_prompt_ids(tokenizer, p, tokenizer.bos_token_id) for p in prompts]
    assert grid.prompts.token_ids == expected and grid.prompts.tag == TAG_TEXT_PROMPTS
    model, ema = model_and_ema
    assert grid.sample(model, ema).shape == (3, 132, 392)


def test_shards_without_a_recorded_tokenizer_turn_the_grid_off(shards, tmp_path):
    root, _ = shards
    copied = tmp_path / "shards"
    shutil.copytree(root, copied)
    manifest = json.loads((copied / "manifest.json").read_text())
    del manifest["config"]["tokenizer"]
    (copied / "manifest.json").write_text(json.dumps(manifest))
    messages = []
    grid = make_grid(tiny_recipe(tmp_path, f"data.root={copied}"), messages)
    assert not grid.enabled and not grid.due(2)
    assert messages == [f"sample grid off (train.image_interval=2): the manifest of data.root={copied} "
                        "records no tokenizer (config.tokenizer)"]


def test_tile_images_places_each_image_in_reading_order():
    images = torch.stack([torch.full((3, 2, 3), v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)])
    grid = tile_images(images, columns=2, border=1, min_tile_side=1)
    assert grid.shape == (3, 3 * 3 + 1, 2 * 4 + 1)
    assert grid[0, 1, 1] == 0.0 and grid[0, 1, 5] == 0.25 and grid[0, 4, 1] == 0.5 and grid[0, 7, 1] == 1.0
    assert torch.equal(grid[:, 7:9, 5:8], torch.ones(3, 2, 3))  # the empty last cell stays border


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.image_interval=-1", "train.image_interval: must be 0"),
        ("train.image_prompts=[]", "train.image_prompts: needs at least one prompt"),
        ("train.image_prompts=[a cat, '  ']", "train.image_prompts[1]: must be a non-empty prompt"),
        ("train.image_prompts=[a cat, 3]", "train.image_prompts[1]: expected a string, got 3"),
        ("train.image_prompts=a cat", "train.image_prompts: expected a list"),
        ("train.image_cfg_weight=-1", "train.image_cfg_weight: must be a finite number >= 0"),
        ("train.image_cfg_weight=.nan", "train.image_cfg_weight: must be a finite number >= 0"),
        ("train.image_euler_steps=0", "train.image_euler_steps: must be at least 1"),
    ],
)
def test_recipe_rejects_bad_grid_settings(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build_recipe(load_recipe(RECIPE).to_dict(), [override])
