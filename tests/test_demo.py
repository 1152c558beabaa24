"""The demo chain runs end to end at toy size: synth -> shards -> 2-process DeepSpeed -> samples -> eval,
with a clean console (no third-party warnings) and its captioned grids."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pretrain import demo
from pretrain.recipe import load_recipe
from pretrain.runtime.distributed import free_port
from tests.conftest import one_error
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


# A finished data set of the demo at toy size (no tokenizer: nothing here reads it) and the options
# that ask for it.
TINY = ["--train-samples", "1", "--heldout", "2"]


@functools.lru_cache(maxsize=None)
def _tokenizer_files() -> dict[str, bytes]:
    """synth's tokenizer, built once (it is the same for every data set)."""
    from data_tools.synth_shapes import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def _tiny_data_set(out):
    from data_tools.synth_shapes import synthesize

    synthesize(str(out / "raw"), 1, 2, tokenizer=False)
    (out / "raw" / "tokenizer").mkdir()
    for name, data in _tokenizer_files().items():
        (out / "raw" / "tokenizer" / name).write_bytes(data)


def _demo_error_on_manifest(tmp_path, capsys, manifest_text: str) -> str:
    """The one stderr line of a demo run whose OUT holds the data set and shards with this manifest;
    nothing is trained."""

    _tiny_data_set(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(manifest_text)
    assert demo.main(["--out", str(tmp_path), *TINY]) == 2
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


def _no_child(cmd, log, progress_total=None):
    raise AssertionError(f"a stage ran: {cmd}")


@pytest.mark.parametrize("argv, says", [
    # zero or less: found in a child after the earlier stages (data_tools' usage for --nproc 0),
    # or, --steps 0, the recipe's whole 1800-step run trained
    (["--nproc", "0"], "argument --nproc: 0 must be at least 1"),
    (["--steps", "0"], "argument --steps: 0 must be at least 1"),
    (["--steps", "-1"], "argument --steps: -1 must be at least 1"),
    (["--train-samples", "0"], "argument --train-samples: 0 must be at least 1"),
    (["--heldout", "-3"], "argument --heldout: -3 must be at least 1"),
    (["--euler-steps", "0"], "argument --euler-steps: 0 must be at least 1"),
    # NaN guidance sampled NaN (or unguided) images, and the demo reported their figures
    (["--cfg", "nan"], "argument --cfg: nan is not a finite number"),
    (["--cfg", "inf"], "argument --cfg: inf is not a finite number"),
    (["--guidance-until", "nan"], "argument --guidance-until: nan is not a number from 0 to 1"),
    (["--guidance-until", "1.5"], "argument --guidance-until: 1.5 is not a number from 0 to 1"),
    # the recipe's batch of 8 in micro-batches of 4: every training process refused 3, after stages 1 and 2
    (["--nproc", "3"], "argument --nproc: the demo recipe's batch (parallel.global_batch_size 8, "
                       "micro_batch_size 4) trains on 1 or 2 processes, not 3"),
])
def test_bad_options_stop_the_demo_with_one_error_line_before_any_work(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.setattr(demo, "_run", _no_child)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out", str(out), *argv])
    assert stop.value.code == 2
    assert one_error(capsys) == f"pretrain.demo: error: {says}"
    assert not out.exists()


@pytest.mark.parametrize("where, says", [
    # were tracebacks from the first mkdir
    ("file", "is a file, not a folder; give a folder (it is made if missing)"),
    ("file/sub", "cannot write there (Not a directory); give a writable folder"),
    # build found no input ("[x]" is a character class in its patterns); past that, DeepSpeed's
    # loading globs the checkpoint folder too: a rerun failed to resume ("could not load it")
    ("run [x]", "holds one of the characters [ * ?, which DeepSpeed's checkpoint loading reads as a pattern; "
                "give a folder without them"),
    ("run*", "holds one of the characters [ * ?, which DeepSpeed's checkpoint loading reads as a pattern; "
             "give a folder without them"),
])
def test_an_out_that_cannot_take_the_demo_stops_it_with_one_line(tmp_path, capsys, monkeypatch, where, says):
    monkeypatch.setattr(demo, "_run", _no_child)
    (tmp_path / "file").write_text("")
    out = tmp_path / where
    assert demo.main(["--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"[demo] --out {out}: {says}"]


def test_a_relative_out_is_the_callers_folder(tmp_path, monkeypatch):
    # The stages' children run in the repository: a relative OUT was REPO/OUT for them (the data set)
    # and ./OUT for the demo (the logs), and stage 4 found no data set.
    seen = []

    def stop(out, *args):
        seen.append(out)
        raise demo.StaleOutput("stop here")

    monkeypatch.setattr(demo, "make_data", stop)
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--out", "run"]) == 2
    assert seen == [tmp_path / "run"]


def test_an_out_with_yaml_characters_reaches_the_training_whole(tmp_path, monkeypatch):
    # " #" started a YAML comment in --set data.root=OUT/shards (the run read "/.../my"), ": " made it a mapping
    out = tmp_path / "my #1: run"
    commands = []
    monkeypatch.setattr(demo, "_run", lambda cmd, log, progress_total=None: commands.append(cmd) or 0.0)
    recipe = load_recipe(demo.RECIPE)
    demo.train(out, 1, 2, recipe.optim)
    training, = commands
    overrides = [training[i + 1] for i, arg in enumerate(training) if arg == "--set"]
    ran = load_recipe(demo.RECIPE, overrides)
    assert ran.data.root == str(out / "shards") and ran.train.output_dir == str(out / "train")


def test_a_data_set_stopped_part_way_is_synthesised_again(tmp_path, monkeypatch, capsys):
    # synth writes the held-out eval.json before the tokenizer and synth.json: a demo stopped there
    # skipped stage 1 on every later run, and the build failed on the missing tokenizer each time.
    _tiny_data_set(tmp_path)
    (tmp_path / "raw" / "synth.json").unlink()
    commands = []
    monkeypatch.setattr(demo, "_run", lambda cmd, log, progress_total=None: commands.append(cmd) or 0.0)
    demo.make_data(tmp_path, 1, 2, 1, demo.build_layout(load_recipe(demo.RECIPE)))
    assert [cmd[3] for cmd in commands] == ["synth", "build"]
    assert "--overwrite" in commands[0]


@pytest.mark.parametrize("damage, says", [
    # another demo's data set (other counts) was reused without a word, its figures printed as this run's
    (None, "{raw} was synthesised with --train-samples 1 --heldout 2, not --train-samples 1 --heldout 5: give "
           "those options to continue that demo, or remove it (rm -rf {out}) and run the demo again"),
    (("synth.json", ""), "{raw}/synth.json cannot be read (JSONDecodeError: Expecting value: line 1 column 1 "
                         "(char 0)); {out} is damaged: remove it (rm -rf {out}) and run the demo again"),
    (("synth.json", "{}"), "{raw}/synth.json cannot be read (KeyError: 'train'); {out} is damaged: remove it "
                           "(rm -rf {out}) and run the demo again"),
    # a damaged held-out file stopped the demo with a traceback at stage 4, after the training
    (("heldout/eval.json", '{"palette": '), "{raw}/heldout/eval.json: not valid JSON (Expecting value: line 1 "
                                            "column 13 (char 12)); {out} is damaged: remove it (rm -rf {out}) "
                                            "and run the demo again"),
    (("heldout/eval.json", '{"palette": {"red": [255, 0, 0]}}'),
     "{raw}/heldout/eval.json: generation: missing or not a list of items; {out} is damaged: remove it "
     "(rm -rf {out}) and run the demo again"),
    # a damaged or removed tokenizer: a traceback at stage 4, after the training
    (("tokenizer/tokenizer.json", "{"), "{raw}/tokenizer/tokenizer.json: not valid JSON (Expecting property name "
                                        "enclosed in double quotes: line 1 column 2 (char 1)); {out} is damaged: "
                                        "remove it (rm -rf {out}) and run the demo again"),
    (("tokenizer", None), "{raw}/tokenizer is missing; {out} is damaged: remove it (rm -rf {out}) and run the demo "
                          "again"),
    (("tokenizer/tokenizer.json", None), "{raw}/tokenizer: no tokenizer (tokenizer.json); {out} is damaged: remove "
                                         "it (rm -rf {out}) and run the demo again"),
])
def test_a_data_set_of_other_options_or_damaged_stops_the_demo_with_one_line(tmp_path, capsys, monkeypatch,
                                                                                damage, says):
    monkeypatch.setattr(demo, "_run", _no_child)
    _tiny_data_set(tmp_path)
    argv = ["--out", str(tmp_path), "--train-samples", "1", "--heldout", "5" if damage is None else "2"]
    if damage and damage[1] is None:  # removed by hand
        target = tmp_path / "raw" / damage[0]
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif damage:
        (tmp_path / "raw" / damage[0]).write_text(damage[1])
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[demo] " + says.format(raw=tmp_path / "raw", out=tmp_path)]


def test_the_command_to_start_afresh_can_be_pasted_when_out_holds_spaces(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_run", _no_child)
    out = tmp_path / "my demo #2"
    _tiny_data_set(out)
    assert demo.main(["--out", str(out), "--train-samples", "1", "--heldout", "3"]) == 2
    assert f"(rm -rf '{out}')" in capsys.readouterr().err


def _checkpoint(out, step: int, world: int, suffix: str = "") -> None:
    """A finished checkpoint of OUT/train, as a trainer of ``world`` processes leaves it (the
    trainer files, all that deciding on a resume reads)."""
    folder = out / "train" / "checkpoints" / f"step_{step:08d}{suffix}"
    folder.mkdir(parents=True)
    for rank in range(world):
        (folder / f"trainer_rank{rank}.json").write_text(json.dumps({"step": step, "dp_size": world}))
    (folder / "COMPLETE").write_text("ok")


@pytest.mark.parametrize("argv, says", [
    # failed under torchrun after stages 1 and 2: its launcher's traceback, advice for other launchers
    (["--nproc", "1"], "{ckpt} was trained on 2 processes: give --nproc 2 to continue it, or remove it "
                       "(rm -rf {train}) to train afresh on 1"),
    # trained nothing, and the figures of the 1800-step run were printed as those of 2 steps
    (["--steps", "2"], "{ckpt} is a run trained to step 1800, past the 2 steps asked for: give --steps 1800 "
                       "(or more) to continue it, or remove it (rm -rf {train}) to train afresh"),
])
def test_a_run_the_options_cannot_continue_stops_the_demo_with_one_line(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.setattr(demo, "_run", _no_child)
    _checkpoint(tmp_path, 1800, 2)
    assert demo.main(["--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = tmp_path / "train" / "checkpoints" / "step_00001800"
    assert err == ["[demo] " + says.format(ckpt=ckpt, train=tmp_path / "train")]


def test_a_run_that_fits_is_continued_and_a_damaged_one_stops_the_demo_with_one_line(tmp_path, capsys, monkeypatch):
    _checkpoint(tmp_path, 2, 2)
    demo.check_resume(tmp_path, 2, 2)  # the same options: resumed
    demo.check_resume(tmp_path, 2, 1800)  # a longer run: continued
    _checkpoint(tmp_path, 3, 2, "_universal")
    demo.check_resume(tmp_path, 1, 1800)  # converted to a universal checkpoint: any number of processes
    shutil.rmtree(tmp_path / "train" / "checkpoints" / "step_00000003_universal")
    (tmp_path / "train" / "checkpoints" / "step_00000002" / "trainer_rank1.json").unlink()
    monkeypatch.setattr(demo, "_run", _no_child)
    assert demo.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"[demo] {tmp_path / 'train' / 'checkpoints'}: no usable checkpoint"), err
    assert "move the checkpoints folder away" in err[0]


def test_a_child_that_refuses_its_input_ends_the_demo_with_its_own_line(tmp_path, capsys):
    # torchrun puts its launcher's traceback after the child's "error: ..." line: the demo printed the
    # last 40 lines of the log, the traceback, and the line that said what to do was not among them
    noise = "import sys; print('starting'); print('error: a checkpoint is damaged; move it away'); " \
            "print('Traceback (most recent call last):\\n' * 60); sys.exit(1)"
    log = tmp_path / "logs" / "child.log"
    with pytest.raises(SystemExit) as stop:
        demo._run([sys.executable, "-c", noise], log)
    assert str(stop.value) == f"[demo] error: a checkpoint is damaged; move it away (whole output: {log})"
    assert capsys.readouterr().err == ""
    # a crash without such a line still shows the end of its output
    with pytest.raises(SystemExit, match=r"\[demo\] failed \(exit 3\)"):
        demo._run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log)
    assert "boom" in capsys.readouterr().err


def _sampled_without_a_model(out):
    """A stand-in for ``demo.share_out``: the sampling workers' results for OUT's held-out set."""
    spec = json.loads((out / "raw" / "heldout" / "eval.json").read_text())

    def sampled(work, tasks, processes):
        for kind, start in tasks:
            if kind == "gen":
                batch = spec["generation"][start:start + demo.GEN_BATCH]
                yield kind, start, torch.rand(len(batch), 3, 32, 32), "step_1"
            else:
                yield kind, start, ["red"] * len(spec["qa"][start:start + demo.QA_CHUNK]), "step_1"

    return sampled


def test_generated_images_of_an_earlier_run_are_removed_before_sampling(tmp_path, monkeypatch):
    # evaluate scores every <index>.png in OUT/eval/generated: a stale 007.png beside this run's 7.png
    # stopped the evaluation (a traceback, after the whole run)
    _tiny_data_set(tmp_path)
    generated = tmp_path / "eval" / "generated"
    generated.mkdir(parents=True)
    for name in ("007.png", "0.png", "99.png", "notes.txt"):
        (generated / name).write_bytes(b"stale")
    monkeypatch.setattr(demo, "share_out", _sampled_without_a_model(tmp_path))
    demo.sample_and_answer(tmp_path, {"cfg_weight": 4.0, "guidance_until": 0.5, "steps": 1,
                                      "schedule": "uniform"}, processes=1)
    assert sorted(p.name for p in generated.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("until, words", [(1.0, "CFG w=5 to the data,"), (0.5, "CFG w=5 until t=0.5,")])
def test_the_sampling_line_names_the_guidance_window(tmp_path, capsys, monkeypatch, until, words):
    # guidance_until 1 (the demo's default) reads "to the data", not "until t=1"
    _tiny_data_set(tmp_path)
    monkeypatch.setattr(demo, "share_out", _sampled_without_a_model(tmp_path))
    demo.sample_and_answer(tmp_path, {"cfg_weight": 5.0, "guidance_until": until, "steps": 1,
                                      "schedule": "uniform"}, processes=1)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[demo 4/5]")]
    assert len(line) == 1 and words in line[0], line


def test_an_interrupted_demo_says_how_to_continue_in_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_data", interrupted)
    assert demo.main(["--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "[demo] interrupted: run the same command again to continue where it stopped"]


def test_shards_packed_from_a_data_set_made_again_stop_the_demo_with_one_line(tmp_path, capsys):
    """Real synth and build: shards are reused only over the files they were packed from. Before, raw/
    removed by hand was synthesised again (here with other counts) and the older shards were trained
    on, their figures reported as this data set's."""
    layout = demo.build_layout(load_recipe(demo.RECIPE))
    first = tmp_path / "first"
    demo.make_data(first, 1, 2, 1, layout)
    out = tmp_path / "moved"
    first.rename(out)  # a moved OUT keeps its files: its shards still fit
    capsys.readouterr()
    demo.make_data(out, 1, 2, 1, layout)
    assert f"[demo 2/5] training shards: already in {out / 'shards'}" in capsys.readouterr().out
    shutil.rmtree(out / "raw")
    with pytest.raises(demo.StaleOutput) as stale:
        demo.make_data(out, 2, 2, 1, layout)
    assert str(stale.value) == (
        f"{out / 'shards'} was packed from other files than those now in {out / 'raw' / 'train'} (gen-000.tar "
        f"changed; und-000.tar changed; qa.json changed; ...): remove the shards (rm -rf {out / 'shards'}) to pack "
        f"this data set, or remove it (rm -rf {out}) and run the demo again")
    shutil.rmtree(out / "shards")  # as it says
    capsys.readouterr()
    demo.make_data(out, 2, 2, 1, layout)
    assert "packed the training shards in" in capsys.readouterr().out
    assert json.loads((out / "shards" / "manifest.json").read_text())["totals"]["records_in"] == 4 * 2
