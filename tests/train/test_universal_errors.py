"""``python -m pretrain.train.universal`` on bad input: one ``error:`` line naming the option or file
and the fix, never a traceback, never a universal checkpoint a resume would trust by mistake, never
a write outside the run's checkpoints folder. Fake checkpoints (as saved before manifests): no run
is trained, DeepSpeed is reached only where it must refuse."""

import json

import pytest

from pretrain.train import universal
from pretrain.train.universal import main
from tests.conftest import one_error

TAG = "step_00000004"


def _checkpoint(run, tag=TAG, latest=True):
    """A complete checkpoint of one rank as saved before manifests (no weight files)."""
    folder = run / "checkpoints" / tag
    folder.mkdir(parents=True)
    (folder / "trainer_rank0.json").write_text(json.dumps({"step": 4, "dp_size": 1, "tp_size": 1, "pp_size": 1}))
    (folder / "COMPLETE").write_text("ok\n")
    if latest:
        (run / "checkpoints" / "latest").write_text(tag)
    return folder


def _convert(capsys, run, *tag):
    assert main(["--run", str(run), *(("--tag", *tag) if tag else ())]) == 2
    return one_error(capsys)


@pytest.mark.parametrize("kind", ["absolute", "escape", "slash", "empty"])
def test_tag_that_is_not_a_folder_name_of_the_run_is_refused(tmp_path, capsys, kind):
    run, other = tmp_path / "run", tmp_path / "other"
    _checkpoint(run)
    source = _checkpoint(other)
    tag = {"absolute": str(source), "escape": f"../../other/checkpoints/{TAG}", "slash": f"{TAG}/", "empty": ""}[kind]
    assert _convert(capsys, run, tag) == (f"error: --tag {tag!r}: not a checkpoint name; give a folder name of "
                                          f"{run / 'checkpoints'} (step_XXXXXXXX), or no --tag for the latest")
    # Nothing written next to the other run's checkpoint or inside this one's.
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["latest", TAG]
    assert sorted(p.name for p in (run / "checkpoints" / TAG).iterdir()) == ["COMPLETE", "trainer_rank0.json"]


def test_universal_tag_that_does_not_exist_is_an_error_not_a_success(tmp_path, capsys):
    run = tmp_path / "run"
    _checkpoint(run)
    tag = TAG + "_universal"
    assert _convert(capsys, run, tag) == (f"error: {run / 'checkpoints' / tag}: not a complete checkpoint "
                                          f"(no COMPLETE file); convert its source again (--tag {TAG})")
    assert (run / "checkpoints" / "latest").read_text() == TAG


def test_existing_universal_tag_becomes_the_one_the_next_run_resumes_from(tmp_path, capsys):
    run = tmp_path / "run"
    _checkpoint(run)
    _checkpoint(run, TAG + "_universal", latest=False)
    assert main(["--run", str(run), "--tag", TAG + "_universal"]) == 0
    assert (run / "checkpoints" / "latest").read_text() == TAG + "_universal"
    assert "the next run resumes from it" in capsys.readouterr().out


def test_what_deepspeed_cannot_convert_is_one_line_naming_the_checkpoint(tmp_path, capsys):
    folder = _checkpoint(tmp_path / "run")  # no optimizer or model files: only DeepSpeed notices
    assert _convert(capsys, tmp_path / "run") == (
        f"error: {folder}: DeepSpeed cannot convert it (FileNotFoundError: can't find *_optim_states.pt files "
        f"in directory '{folder}'); convert an earlier checkpoint with --tag")
    assert not (folder.parent / (TAG + "_universal") / "COMPLETE").exists()


def test_file_in_place_of_the_output_folder_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    _checkpoint(run)
    blocker = run / "checkpoints" / (TAG + "_universal")
    blocker.write_text("x")
    assert _convert(capsys, run) == (f"error: {blocker}: in the way of the conversion (not a checkpoint folder); "
                                     "move it away")
    assert blocker.read_text() == "x"


def test_latest_that_is_a_folder_is_named_not_a_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    _checkpoint(run, latest=False)
    (run / "checkpoints" / "latest").mkdir()
    assert _convert(capsys, run) == (f"error: {run / 'checkpoints' / 'latest'}: Is a directory; "
                                     "fix or move it and convert again")


def test_missing_recipe_is_found_before_an_earlier_conversion_is_removed(tmp_path, capsys):
    run = tmp_path / "run"
    source = _checkpoint(run)
    (source / "ema_mp0_0_dp0.safetensors").write_bytes(b"")  # the EMA's conversion needs the recipe
    earlier = _checkpoint(run, TAG + "_universal", latest=False)
    assert _convert(capsys, run, TAG) == (f"error: {run / 'recipe.yaml'}: missing; the EMA's conversion needs "
                                          "the run's model: restore it")
    assert sorted(p.name for p in earlier.iterdir()) == ["COMPLETE", "trainer_rank0.json"]


def test_interrupted_removal_of_an_earlier_conversion_never_leaves_it_looking_complete(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _checkpoint(run)
    earlier = _checkpoint(run, TAG + "_universal", latest=False)

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) part way through the removal

    monkeypatch.setattr(universal.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        universal.convert(run, TAG)
    assert not (earlier / "COMPLETE").exists()
    assert (run / "checkpoints" / "latest").read_text() == TAG
