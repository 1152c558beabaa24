"""Janus-Pro shards (``data_tools build --family januspro``) through the loader and the launch checks:
the codes reach the batches as the image head's targets, and shards built for another family, codec,
codebook or grid are refused with one line naming the recipe key."""

import os

import numpy as np
import pytest
import torch

from datacontract.format import Task, TokenKind
from datacontract.shards import ShardLayout, ShardReader, read_manifest
from datacontract.tokenizer import resolve_token_spec
from pretrain.data.loader import PackedLoader
from pretrain.data.step_mix import MixSchedule
from pretrain.model.config import ConfigError
from pretrain.recipe import load_recipe
from pretrain.train.preflight import check_data

RECIPE = "recipes/tiny_januspro_cpu.yaml"  # 32 px, SigLIP patch 8, 4x4 codes of a 64-entry codebook


@pytest.fixture(scope="module")
def jp_root(corpus, tokenizer_dir, tmp_path_factory):
    from data_tools.cli import main
    from data_tools.synthetic import tiny_build_args
    from image_codecs.kmeans import KMeansPatchCodec

    root = tmp_path_factory.mktemp("jp")
    gen = torch.Generator().manual_seed(0)
    codec = KMeansPatchCodec(torch.rand(64, 8 * 8 * 3, generator=gen) * 2 - 1, 8)
    codec.save(str(root / "codec"))
    out = str(root / "shards")
    args = tiny_build_args(corpus, tokenizer_dir, out, "--und-patch", "8", "--family", "januspro", "--codec",
                           "kmeans_patches", "--codec-path", str(root / "codec"))
    assert main(args) == 0
    return out


def _shard_codes(root):
    """Every generation document's codes, read straight from the shards, as a set of tuples."""
    m = read_manifest(root)
    found = set()
    for entry in m["tasks"].values():
        for shard in entry["shards"]:
            reader = ShardReader(os.path.join(root, shard["path"]))
            for i in range(reader.num_rows):
                row = reader.read_row(i)
                ids, kinds = np.asarray(row["input_ids"]), np.asarray(row["token_kind"])
                found |= {tuple(c) for c in ids[kinds == TokenKind.GEN_CODE].reshape(-1, 16).tolist()}
    return found


def test_loader_batches_carry_the_codes_as_image_targets(jp_root, tokenizer):
    spec = resolve_token_spec(tokenizer)
    loader = PackedLoader(jp_root, MixSchedule.constant(und=1, gen=3), micro_batch_size=4, seed=0)
    assert loader.layout.family == "januspro" and loader.layout.pad_id == spec.pad_id
    stored = _shard_codes(jp_root)
    seen = 0
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
        meta = batch.metadata
        kinds, ids, targets = batch.token_kind.numpy(), batch.input_ids.numpy(), batch.target_mask.numpy()
        code_pos = np.flatnonzero(kinds == TokenKind.GEN_CODE)
        assert np.array_equal(meta.gen_code_positions.numpy(), code_pos)
        assert targets[code_pos].all()  # every code is a target of the image head
        assert not np.isin(meta.ar_target_positions.numpy(), code_pos).any()  # and never an L_AR target
        starts = meta.gen_start_positions.numpy()
        assert len(starts) == len(code_pos) // 16 == int((batch.doc_tasks == Task.GENERATION).sum())
        assert (ids[starts] == spec.begin_of_image_id).all() and (kinds[starts] == TokenKind.TEXT).all()
        assert (ids[code_pos.reshape(-1, 16)[:, -1] + 1] == spec.end_of_image_id).all()
        for codes in ids[code_pos].reshape(-1, 16):
            assert tuple(codes.tolist()) in stored and codes.min() >= 0 and codes.max() < 64
            seen += 1
        # Understanding images: <begin_of_image> is a plain token before the 16 SigLIP slots.
        assert not (kinds == TokenKind.UND_IMAGE_BEGIN).any()
        und = np.flatnonzero(kinds == TokenKind.UND_IMAGE).reshape(-1, 16)
        assert (ids[und[:, 0] - 1] == spec.begin_of_image_id).all()
        assert batch.und_pixels.shape[0] == len(und)
    assert seen > 0


def _recipe(root, *overrides):
    return load_recipe(RECIPE, [f"data.root={root}", *overrides])


def test_preflight_accepts_matching_shards(jp_root):
    check_data(_recipe(jp_root))


@pytest.mark.parametrize("overrides, key", [
    (["model.image_tokens.codebook_size=16384"], "model.image_tokens.codebook_size: shards 64, recipe 16384"),
    (["model.image_tokens.codec=vq16"], "model.image_tokens.codec: shards 'kmeans_patches', recipe 'vq16'"),
    (["model.image_tokens.downsample=4"], "model.image_tokens.downsample: shards 8 (16 codes per image), recipe 4"),
])
def test_preflight_names_the_key_that_does_not_fit(jp_root, overrides, key):
    with pytest.raises(ConfigError) as err:
        check_data(_recipe(jp_root, *overrides))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.root: ") and key in message


def test_shards_of_the_other_family_are_refused(jp_root, built):
    janusflow_root, _ = built
    with pytest.raises(ConfigError, match="model.family: shards were built for janusflow, the recipe trains januspro"):
        check_data(_recipe(janusflow_root))
    with pytest.raises(ConfigError, match="model.family: shards were built for januspro, the recipe trains janusflow"):
        check_data(load_recipe("recipes/tiny_cpu.yaml", [f"data.root={jp_root}"]))


def test_layouts_written_before_the_family_fields_read_as_janusflow():
    old = {"seq_length": 256, "resolution": 32, "und_tokens_per_image": 4, "gen_tokens_per_image": 4,
           "latent_shape": None, "latent_dtype": None}
    layout = ShardLayout.from_json(old)
    assert (layout.family, layout.pad_id, layout.image_codec, layout.code_grid) == ("janusflow", None, None, None)
    assert ShardLayout.from_json(layout.to_json()) == layout
    with pytest.raises(ValueError, match="unknown family"):
        ShardLayout.from_json({**old, "family": "dalle"})
