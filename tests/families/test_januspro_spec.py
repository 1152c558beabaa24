"""Janus-Pro's spec reads the pad id of its CFG prompt drop from the shards it trains on."""

import json

import pytest

from datacontract.shards import MANIFEST_NAME
from pretrain.families.januspro import SYNTHETIC_PAD_ID, pad_id_for
from pretrain.recipe import load_recipe

RECIPE = "recipes/tiny_januspro_cpu.yaml"


def _shards(tmp_path, layout: dict):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"layout": layout}))
    return tmp_path


def test_the_pad_id_comes_from_the_shard_layout(tmp_path):
    assert pad_id_for(load_recipe(RECIPE)) == SYNTHETIC_PAD_ID  # synthetic batches: no tokenizer
    root = _shards(tmp_path, {"family": "januspro", "pad_id": 100015})
    assert pad_id_for(load_recipe(RECIPE, [f"data.root={root}"])) == 100015


def test_shards_without_a_pad_id_are_refused_when_prompts_drop(tmp_path):
    root = _shards(tmp_path, {"family": "januspro"})
    with pytest.raises(ValueError, match=r"layout\.pad_id.*data\.prompt_drop_prob=0"):
        pad_id_for(load_recipe(RECIPE, [f"data.root={root}"]))
    assert pad_id_for(load_recipe(RECIPE, [f"data.root={root}", "data.prompt_drop_prob=0"])) == SYNTHETIC_PAD_ID
