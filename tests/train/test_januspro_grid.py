"""Janus-Pro's periodic sample grid: a tiny run on shards of a k-means patch codec writes, at
``train.image_interval``, the grid that sampling its EMA weights directly gives
(``pretrain.sample.januspro``: codes with CFG on logits, the codec's decode); runs that cannot have
one (synthetic data, pipeline parallelism) say why in one line and train on."""

import dataclasses

import numpy as np
import pytest
import torch

from pretrain.families.januspro import JanusProStep, build_sample_grid
from pretrain.recipe import load_recipe
from pretrain.runtime.layout import ParallelLayout
from tests.data_fixtures import corpus, tokenizer_dir  # noqa: F401  (session fixtures)
from tests.launch_helpers import REPO
from tests.train.januspro_runs import RECIPE, train_run
from tests.train.test_januspro_data_parallel import jp_shards  # noqa: F401  (module fixture: k-means shards)

INTERVAL = 2


def recipe_with(*overrides: str):
    return load_recipe(REPO / RECIPE, list(overrides))


def grid_messages(recipe, layout=None) -> tuple[object, list[str]]:
    messages: list[str] = []
    layout = layout or ParallelLayout.single()
    grid = build_sample_grid(recipe, layout, JanusProStep(recipe, layout), messages.append)
    return grid, messages


def test_synthetic_data_has_no_grid_and_says_why():
    grid, messages = grid_messages(recipe_with(f"train.image_interval={INTERVAL}"))
    assert not grid.enabled and not grid.due(INTERVAL)
    assert len(messages) == 1 and "sample grid off" in messages[0] and "data.root: null" in messages[0]


def test_pipeline_parallel_has_no_grid_and_says_why(jp_shards):  # noqa: F811
    recipe = recipe_with(f"train.image_interval={INTERVAL}", f"data.root={jp_shards}")
    two_stages = dataclasses.replace(ParallelLayout.single(), pp_size=2, world_size=2)
    grid, messages = grid_messages(recipe, two_stages)
    assert not grid.enabled
    assert len(messages) == 1 and "parallel.pipeline_parallel=2" in messages[0]


def test_shards_with_a_codec_get_a_grid(jp_shards):  # noqa: F811
    grid, messages = grid_messages(recipe_with(f"train.image_interval={INTERVAL}", f"data.root={jp_shards}"))
    assert grid.enabled and grid.due(INTERVAL) and not grid.due(INTERVAL + 1)
    assert "kmeans_patches decode" in messages[0] and "4x4 codes" in messages[0], messages


@pytest.mark.slow
def test_run_writes_the_grid_of_its_ema_weights(jp_shards, tmp_path, runtime):  # noqa: F811
    from PIL import Image

    from datacontract.shards import read_manifest
    from datacontract.tokenizer import load_tokenizer
    from image_codecs import load_image_codec
    from pretrain.export import run_weights
    from pretrain.sample.decode import save_png
    from pretrain.sample.januspro import codes_to_uint8, generation_prompt, sample_codes
    from pretrain.sample.loading import build_inference_model
    from pretrain.train.image_grid import tile_images

    out = tmp_path / "run"
    proc = train_run(out, INTERVAL, 1, f"data.root={jp_shards}", "data.loader_workers=0",
                     f"train.image_interval={INTERVAL}", f"train.save_interval={INTERVAL}", "train.ema_decay=0.5")
    assert "sample grid of step 2" in proc.stdout + proc.stderr
    written = out / "samples" / f"step_{INTERVAL:07d}.png"
    assert sorted(p.name for p in (out / "samples").iterdir()) == [written.name]  # only at the interval

    # The reference: the run's EMA weights of step 2 sampled directly, prompts tokenized by the
    # sampler's own helper, the codec loaded from where the shards' build wrote it.
    recipe = load_recipe(out / "recipe.yaml")
    state, cfg, tag = run_weights(out, None, "ema")
    model = build_inference_model(cfg, state)
    manifest = read_manifest(str(jp_shards))
    tokenizer = load_tokenizer(manifest["config"]["tokenizer"])
    special = manifest["special_tokens"]
    prompts = [generation_prompt(tokenizer, text, special["bos_id"], special["begin_of_image_id"])
               for text in recipe.train.image_prompts]
    codec = load_image_codec("kmeans_patches", str(jp_shards.parent / "codec"))
    codes = sample_codes(model, prompts, 16, cfg_weight=recipe.train.image_cfg_weight, temperature=1.0,
                         pad_id=manifest["layout"]["pad_id"],
                         generator=[torch.Generator().manual_seed(recipe.train.seed + i) for i in range(len(prompts))])
    pictures = codes_to_uint8(codec, codes, (4, 4)).permute(0, 3, 1, 2).float() / 255
    reference = save_png(tile_images(pictures, captions=recipe.train.image_prompts)[None], [tmp_path / "ref.png"])[0]
    got, expected = np.asarray(Image.open(written)), np.asarray(Image.open(reference))
    assert got.shape == expected.shape and (got == expected).all()
    assert len(set(map(tuple, codes.tolist()))) > 1  # the prompts do not all draw one image
