"""The demo chain runs end to end at toy size: synth -> shards -> 2-process DeepSpeed -> samples -> eval,
with a clean console (no third-party warnings) and its captioned grids."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from pretrain import demo
from pretrain.recipe import load_recipe
from pretrain.runtime.distributed import free_port
from tests.launch_helpers import REPO, child_env

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").


@pytest.mark.slow
def test_demo_chain_at_toy_size(tmp_path, monkeypatch):
    # 34 held-out prompts and questions: three image batches and two answer chunks for the two
    # sampling processes to share out
    options = ["--train-samples", "40", "--heldout", "34", "--steps", "2", "--euler-steps", "2"]
    cmd = [sys.executable, "-m", "pretrain.demo", "--out", str(tmp_path), *options]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["generation"]["total"] == 34 and report["generation"]["missing"] == 0
    assert report["qa"]["total"] == 34 and report["qa"]["missing"] == 0
    assert {"shape", "position", "cleanliness"} <= set(report)
    assert (tmp_path / "samples_grid.png").exists() and (tmp_path / "qa_grid.png").exists()
    lines = proc.stdout.splitlines()
    assert [line[:10] for line in lines if line.startswith("[demo ")] == [f"[demo {i}/5]" for i in range(1, 6)]
    assert any(line.startswith("generation colour accuracy") for line in lines)
    # the console carries no warning of any library (they are filtered where the runtime starts)
    assert "Warning" not in proc.stdout + proc.stderr, proc.stderr[-3000:]

    # The same images and answers from one sampling process as from the demo's two.
    shared_out = {p.name: p.read_bytes() for p in (tmp_path / "eval" / "generated").iterdir()}
    answers = (tmp_path / "eval" / "answers.jsonl").read_text()
    sampler = demo.sampler_settings(demo.build_parser().parse_args(options), load_recipe(demo.RECIPE).loss)
    demo.sample_and_answer(tmp_path, sampler, processes=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "eval" / "generated").iterdir()} == shared_out
    assert (tmp_path / "eval" / "answers.jsonl").read_text() == answers
    # ... and from two processes started where a runtime's rendezvous variables are set (a launcher,
    # or a process that started a world of one): each worker still makes its own world of one,
    # instead of both binding the inherited port.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    demo.sample_and_answer(tmp_path, sampler, processes=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "eval" / "generated").iterdir()} == shared_out



@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sampling_stops_with_the_error_when_the_weights_are_missing(tmp_path):
    # A worker that cannot load the weights ends the stage with that error (a pool that restarts
    # failing workers would wait forever instead).
    (tmp_path / "raw" / "heldout").mkdir(parents=True)
    (tmp_path / "raw" / "heldout" / "eval.json").write_text(json.dumps(
        {"generation": [{"index": 0, "prompt": "a small red circle"}], "qa": []}))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="recipe.yaml"):
        demo.sample_and_answer(tmp_path, {}, processes=2)


def _dies_on_the_third(task):
    if task == 2:
        os._exit(9)  # as a worker killed by the OOM killer
    return task


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_shared_out_work_returns_every_result_or_stops_when_a_worker_dies():
    from concurrent.futures.process import BrokenProcessPool

    assert sorted(demo.share_out(abs, [-3, 1, -2, 4, 0], 2)) == [0, 1, 2, 3, 4]
    with pytest.raises(BrokenProcessPool):
        list(demo.share_out(_dies_on_the_third, range(6), 2))

def test_captions_go_under_or_beside_each_image():
    from pretrain.train.image_grid import tile_images

    images = torch.zeros(3, 3, 32, 32)
    plain = tile_images(images, columns=3, border=2)
    under = tile_images(images, columns=3, border=2, captions=["a red circle"] * 3, caption_lines=2)
    beside = tile_images(images, columns=3, border=2, captions=["q? red"] * 3, caption_width=100)
    assert under.shape[2] == plain.shape[2] and under.shape[1] > plain.shape[1]
    assert beside.shape[1] == plain.shape[1] and beside.shape[2] == plain.shape[2] + 3 * 100
    # the caption block below the first (black) image holds dark text pixels on white
    block = under[:, 2 + 128:2 + 128 + 24, 2:2 + 128]
    assert (block < 0.5).any() and (block > 0.99).float().mean() > 0.5
    with pytest.raises(ValueError):
        tile_images(images, captions=["one"])


def test_a_recipe_that_does_not_hold_together_stops_the_demo_with_one_line_before_any_work(
        tmp_path, monkeypatch, capsys):

    broken = tmp_path / "demo_cpu.yaml"
    text = (REPO / "recipes" / "demo_cpu.yaml").read_text()
    # the generation patch doubled: a quarter of SigLIP's tokens, REPA's grids differ (the model config
    # refuses it)
    gen_patch = re.compile(r"(latent_codec: space_to_depth, latent_scale: 1.0,\s+patch_size: )(\d+)")
    assert len(gen_patch.findall(text)) == 1
    broken.write_text(gen_patch.sub(lambda m: m.group(1) + str(2 * int(m.group(2))), text))
    monkeypatch.setattr(demo, "RECIPE", broken)
    out = tmp_path / "out"
    assert demo.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"[demo] {broken}: model.gen_vision.latent_size:"), err
    assert not out.exists()


def test_the_shards_are_built_with_the_recipes_grids_and_row_length():
    # Re-derived from the data contract: SigLIP sees (resolution / und_patch)^2 tokens, the generation
    # side (resolution / downsample / gen_patch)^2, and the recipe's model must agree with both.
    from pretrain.demo import RECIPE, build_layout
    recipe = load_recipe(RECIPE)
    layout = build_layout(recipe)
    assert layout["resolution"] == recipe.data.resolution and layout["seq_length"] == recipe.data.seq_length
    assert (layout["resolution"] // layout["und_patch"]) ** 2 == recipe.model.und_encoder.num_image_tokens
    gen_side = layout["resolution"] // layout["gen_downsample"] // layout["gen_patch"]
    assert gen_side ** 2 == recipe.model.gen_vision.num_latent_tokens
    assert layout["resolution"] // layout["gen_downsample"] == recipe.model.gen_vision.latent_size


def _demo_error_on_manifest(tmp_path, capsys, manifest_text: str) -> str:
    """The one stderr line of a demo run whose OUT holds the data set and shards with this manifest;
    nothing is trained."""

    (tmp_path / "raw" / "heldout").mkdir(parents=True)
    (tmp_path / "raw" / "heldout" / "eval.json").write_text("{}")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(manifest_text)
    assert demo.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"rm -rf {tmp_path}" in err[0]
    assert not (tmp_path / "train").exists() and not (tmp_path / "logs").exists()
    return err[0]


def test_shards_of_another_recipe_stop_the_demo_with_one_line(tmp_path, capsys):
    # runs/demo of an older demo (other grids): training would only fail later on the shards or on
    # the old checkpoints, so the demo says what to do before any work.
    layout = demo.build_layout(load_recipe(demo.RECIPE))
    older = dict(layout, gen_patch=layout["gen_patch"] + 1, seq_length=256)
    err = _demo_error_on_manifest(tmp_path, capsys, json.dumps({"config": {"layout": older}}))
    assert f"{tmp_path / 'shards'} was built for another recipe" in err
    assert f"gen_patch {older['gen_patch']} (recipe: {layout['gen_patch']})" in err
    assert f"seq_length 256 (recipe: {layout['seq_length']})" in err


@pytest.mark.parametrize("damaged", ["{not json", "[1, 2]", '{"config": 3}', '{"format": "janusflow-packed/1"}', ""])
def test_a_damaged_shards_manifest_stops_the_demo_with_one_line(tmp_path, capsys, damaged):
    err = _demo_error_on_manifest(tmp_path, capsys, damaged)
    assert f"{tmp_path / 'shards' / 'manifest.json'} cannot be read" in err
