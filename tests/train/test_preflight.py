"""Checks before anything is built: each bad launch fails in ``pretrain.main`` with one line that
names the key, before a process group or a model exists."""

from __future__ import annotations

import json
import time

import pytest

from datacontract.shards import MANIFEST_FORMAT, ShardLayout
from pretrain.main import main
from pretrain.model.config import ConfigError
from pretrain.recipe import dump_recipe, load_recipe
from pretrain.train.preflight import preflight

RECIPE = "recipes/tiny_cpu.yaml"


def _recipe(tmp_path, *overrides):
    return load_recipe(RECIPE, [f"train.output_dir={tmp_path / 'run'}", *overrides])


def _fail(recipe, steps=None, world=1) -> str:
    with pytest.raises(ConfigError) as err:
        preflight(recipe, steps, world)
    return str(err.value)


def _data_root(tmp_path, rows=None, **layout):
    """A data root as `data_tools build` leaves it, as far as preflight reads it (manifest.json)."""
    fields = dict(seq_length=256, resolution=32, und_tokens_per_image=16, gen_tokens_per_image=16,
                  latent_shape=None, latent_dtype=None)
    fields.update(layout)
    rows = rows or {"und": 4, "gen": 4, "text": 4}
    root = tmp_path / "data"
    root.mkdir()
    tasks = {name: {"shards": [{"path": f"{name}/00000.arrow", "rows": n, "bytes": 1000}]} for name, n in rows.items()}
    (root / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "layout": ShardLayout(**fields).to_json(),
                                                    "tasks": tasks}))
    return str(root)


def test_a_good_launch_passes(tmp_path):
    world = preflight(_recipe(tmp_path, f"data.root={_data_root(tmp_path)}"), 3, 2)
    assert world.data_parallel == 2 and (tmp_path / "run" / "checkpoints").is_dir()
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # the write probe is gone


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(tmp_path, steps):
    assert _fail(_recipe(tmp_path), steps).startswith(f"--steps: must be at least 1, got {steps}")


def test_steps_past_the_stage_end_are_refused(tmp_path):
    recipe = _recipe(tmp_path)
    past = recipe.optim.steps + 1
    assert _fail(recipe, past) == (f"--steps: {past} is past optim.steps={recipe.optim.steps}, where this stage "
                                   f"ends; to train longer raise it (--set optim.steps={past})")


@pytest.mark.parametrize("stage", [0, 3])
def test_zero_stages_the_trainer_cannot_run(tmp_path, stage):
    assert _fail(_recipe(tmp_path, f"parallel.zero_stage={stage}")).startswith("parallel.zero_stage: ")


def test_world_size_that_does_not_fit_the_batch(tmp_path):
    assert _fail(_recipe(tmp_path), world=3).startswith("parallel.global_batch_size: 4 must be a multiple")


def test_missing_data_root(tmp_path):
    message = _fail(_recipe(tmp_path, f"data.root={tmp_path / 'nowhere'}"))
    assert message.startswith("data.root: ") and "nowhere" in message


def test_data_root_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _fail(_recipe(tmp_path, f"data.root={tmp_path / 'empty'}"))
    assert message.startswith("data.root: ") and "manifest.json" in message


# Before: KeyError / AttributeError / TypeError tracebacks from shard_paths, outside preflight's try.
@pytest.mark.parametrize("damage, says", [
    (lambda m: m.pop("tasks"), "'tasks' must map und, gen, text to their shards, got NoneType"),
    (lambda m: m.update(tasks=[]), "'tasks' must map und, gen, text to their shards, got list"),
    (lambda m: m["tasks"]["und"].update(shards=3), "tasks.und.shards must be a list"),
    (lambda m: m["tasks"]["gen"]["shards"][0].pop("path"), "tasks.gen.shards[0].path must be a file name, got None"),
    (lambda m: m["tasks"]["gen"]["shards"][0].update(path=7), "tasks.gen.shards[0].path must be a file name, got 7"),
    (lambda m: m["tasks"]["text"]["shards"][0].update(rows=None),
     "tasks.text.shards[0].rows must be a whole number >= 0, got None"),
])
def test_a_damaged_manifest_is_one_line(tmp_path, damage, says):
    root = _data_root(tmp_path)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    damage(manifest)
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert _fail(_recipe(tmp_path, f"data.root={root}")) == f"data.root: {root}/manifest.json: {says}; rebuild the shards"


@pytest.mark.parametrize("layout, words", [
    ({"resolution": 64, "und_tokens_per_image": 64}, "resolution: shards 64, recipe 32"),
    ({"seq_length": 512}, "seq_length: shards 512 > recipe data.seq_length 256"),
    ({"latent_shape": (4, 8, 8), "latent_dtype": "float16"}, "latent shape: shards (4, 8, 8)"),
])
def test_shards_built_for_another_recipe(tmp_path, layout, words):
    message = _fail(_recipe(tmp_path, f"data.root={_data_root(tmp_path, **layout)}"))
    assert message.startswith("data.root: ") and words in message


def test_shards_without_a_task_the_mix_needs(tmp_path):
    root = _data_root(tmp_path, rows={"und": 4, "gen": 0, "text": 4})
    message = _fail(_recipe(tmp_path, f"data.root={root}"))
    assert message.startswith("data.root: ") and "no gen sequences" in message


def test_unwritable_checkpoints_folder(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")  # root ignores permission bits; a file never takes children
    recipe = load_recipe(RECIPE, [f"train.output_dir={tmp_path / 'a_file' / 'run'}"])
    message = _fail(recipe)
    assert message.startswith("train.output_dir: cannot write checkpoints to ")


@pytest.mark.parametrize("name", ["run[1]", "run*", "run?"])
def test_checkpoints_folder_that_deepspeed_would_read_as_a_pattern(tmp_path, name):
    # Before: the run saved, and every resume failed (DeepSpeed globbed the folder's path and found no
    # model files), with advice about another model or train.trainable.
    recipe = load_recipe(RECIPE, [f"train.output_dir={tmp_path / name}"])
    assert _fail(recipe) == (f"train.output_dir: {tmp_path / name} holds one of the characters [ * ?, which "
                             "DeepSpeed's checkpoint loading reads as a pattern, so the run could never resume; "
                             "choose a folder without them")
    assert not (tmp_path / name).exists()


def _legacy_checkpoint(run, dp_size):
    """A complete checkpoint as saved before manifests, by ``dp_size`` data-parallel ranks."""
    folder = run / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    for rank in range(dp_size):
        state = {"step": 4, "dp_size": dp_size, "tp_size": 1, "pp_size": 1}
        (folder / f"trainer_rank{rank}.json").write_text(json.dumps(state))
    (folder / "COMPLETE").write_text("ok\n")
    (run / "checkpoints" / "latest").write_text(folder.name)
    return folder


def test_resume_in_another_data_parallel_size_points_to_universal(tmp_path):
    recipe = _recipe(tmp_path)
    _legacy_checkpoint(tmp_path / "run", dp_size=2)
    message = _fail(recipe, world=1)
    assert message.startswith("parallel: ") and "python -m pretrain.train.universal" in message
    assert "dp 2 x tp 1 x pp 1" in message and "dp 1 x tp 1 x pp 1" in message
    preflight(recipe, None, 2)  # the saved layout resumes


def test_resume_with_another_model_names_the_key(tmp_path):
    recipe = _recipe(tmp_path)
    _legacy_checkpoint(tmp_path / "run", dp_size=1)
    dump_recipe(_recipe(tmp_path, "model.llm.num_layers=2"), tmp_path / "run" / "recipe.yaml")
    message = _fail(recipe)
    assert message.startswith("model.llm.num_layers: ") and "checkpoint 2, recipe 4" in message
    assert "train.init_from" in message


def test_main_reports_one_line_before_building_anything(tmp_path, capsys):
    started = time.perf_counter()
    code = main(["--recipe", RECIPE, "--steps", "0", "--set", f"train.output_dir={tmp_path / 'run'}"])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --steps: must be at least 1, got 0") and err.count("\n") == 1
    print(f"main() rejected --steps 0 in {elapsed * 1e3:.0f} ms")


@pytest.mark.parametrize("name, make, kind", [
    ("metrics.jsonl", lambda p: p.mkdir(), "a file"),
    ("tensorboard", lambda p: p.write_text("x"), "a folder"),
    ("metrics.jsonl", lambda p: p.symlink_to(p.parent / "gone"), "a file"),
])
def test_log_outputs_taken_by_something_else_are_refused_on_every_rank(tmp_path, name, make, kind):
    # Before: only rank 0 found them, when it opened its logs: the other ranks waited in their first
    # collective until the timeout.
    (tmp_path / "run").mkdir()
    make(tmp_path / "run" / name)
    assert _fail(_recipe(tmp_path)) == (f"train.output_dir: {tmp_path / 'run' / name} is there but not {kind}, which "
                                        "the run writes its logs to; move it away, or choose another folder")
