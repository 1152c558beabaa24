"""scripts/januspro_cpu_demo.sh and its checks (pretrain.januspro_demo): bad settings, stale or
half-made outputs and failing steps.

A stand-in for PYTHON records each call. It runs the script's own checks, ``data_tools synth`` (with
40 training samples per file instead of 5,000), ``fit-codec`` and ``build`` for real (a few seconds),
and stands in for the training, the sampling and the scoring, so no model is trained here; FAIL_ON
makes one of the steps fail with an ``error: ...`` line. One such run makes the OUT every test that
needs a finished one gets a copy of (copytree keeps the files' modification times, which the checks
compare). Most refusals are checked by calling pretrain.januspro_demo's checks in-process; a few of
each kind through the script show that it stops with the checks' one line before any step. The one
real run (slow) checks the training run's own refusals: another NPROC, fewer STEPS, and a finished
run.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import januspro_demo as jp
from pretrain.demo_outputs import StaleOutput
from tests.launch_helpers import child_env

REPO = Path(__file__).resolve().parents[2]
# JANUSPRO_DEMO_SCRIPT: run these tests against another copy of the script (e.g. an older one)
SCRIPT = Path(os.environ.get("JANUSPRO_DEMO_SCRIPT", REPO / "scripts" / "januspro_cpu_demo.sh"))
RECIPE = "recipes/januspro_demo_cpu.yaml"
# The script's defaults, as check_settings gets them from the environment.
SETTINGS = {"nproc": "2", "steps": "", "workers": "2", "cfg_weight": "3", "temperature": "1"}

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for PYTHON: records each call (quoted) in $CALLS, runs the script's checks and the data
# steps with the real python, and fakes training, sampling and scoring (FAIL_ON=<step> fails one).
for a in "$@"; do printf '%q ' "$a"; done >> "$CALLS"; echo >> "$CALLS"
fail() { if [ "${FAIL_ON:-}" = "$1" ]; then echo "some noise"; echo "error: $1 refused its input" >&2; exit 2; fi; }
if [ "$1" = -m ]; then
  case "$2" in
    pretrain.januspro_demo)
      if [ "$3" = sample ]; then fail sample; mkdir -p "$4/eval/generated" && : > "$4/eval/answers.jsonl"; exit 0; fi
      exec "$REAL_PYTHON" "$@" ;;
    data_tools)
      fail "$3"
      if [ "$3" = synth ]; then exec "$REAL_PYTHON" "$@" --train 40 --heldout 10; fi
      exec "$REAL_PYTHON" "$@" ;;
    torch.distributed.run) fail train; echo "[train] step 1/2"; exit 0 ;;
    pretrain.evaluate) fail evaluate; echo '{"qa": {"accuracy": 1.0}}'; exit 0 ;;
  esac
fi
exec "$REAL_PYTHON" "$@"
"""
CHECKS = ("settings", "codec", "stamp", "shards")


def _write_fake_python(folder: Path) -> Path:
    path = folder / "bin" / "python"
    path.parent.mkdir(parents=True)
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_python(tmp_path):
    return _write_fake_python(tmp_path)


def _run(tmp_path, fake_python, script=SCRIPT, cwd=None, **env):
    """The script with ``env`` added (OUT: tmp_path/out unless given, PYTHON: the stand-in)."""
    # child_env: without the rendezvous variables this test process may hold (its in-process runtime's),
    # which the script's children would take for a launch of their own and wait on a port in use.
    full = {**child_env(), "OUT": str(tmp_path / "out"), "PYTHON": str(fake_python), "CALLS": str(tmp_path / "calls"),
            "REAL_PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full, cwd=cwd or REPO,
                          timeout=300)


def _calls(tmp_path):
    """The stand-in's calls so far, each a list of its arguments."""
    calls = tmp_path / "calls"
    return [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def _steps(tmp_path):
    """The steps run so far: synth, fit-codec, build, train, sample, evaluate (not the checks)."""
    names = []
    for call in _calls(tmp_path):
        if call[:2] == ["-m", "data_tools"]:
            names.append(call[2])
        elif call[:2] == ["-m", "torch.distributed.run"]:
            names.append("train")
        elif call[:2] == ["-m", "pretrain.evaluate"]:
            names.append("evaluate")
        elif call[:2] == ["-m", "pretrain.januspro_demo"] and call[2] not in CHECKS:
            names.append(call[2])
    return names


def _refusal(done):
    """The script's one error line (asserting there is exactly one and the exit status is 2)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[januspro demo] error: "), done.stderr
    return lines[0]


def _refused(check, *args, **kwargs) -> str:
    """The message of the StaleOutput (or BadSetting) that ``check(*args, **kwargs)`` raises."""
    with pytest.raises((StaleOutput, jp.BadSetting)) as refused:
        check(*args, **kwargs)
    return str(refused.value)


def _check_settings(out, **settings):
    """check_settings as the script calls it, with the script's defaults unless given."""
    given = {**SETTINGS, **settings}
    return jp.check_settings(out, RECIPE, given["nproc"], given["steps"], given["workers"], given["cfg_weight"],
                             given["temperature"])


def _later(path: Path) -> None:
    """``path`` modified a second later (as a file made again), the same size."""
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


ALL_STEPS = ["synth", "fit-codec", "build", "train", "sample", "evaluate"]


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    """OUT after one whole run of the script (real data set, codec and shards; stand-in training),
    made once for the module: tests get copies (``finished``)."""
    folder = tmp_path_factory.mktemp("finished")
    done = _run(folder, _write_fake_python(folder))
    assert done.returncode == 0, done.stderr
    assert _steps(folder) == ALL_STEPS
    sample = next(call for call in _calls(folder) if call[:3] == ["-m", "pretrain.januspro_demo", "sample"])
    assert sample[3:] == [str(folder / "out"), "3", "1"]  # OUT, CFG_WEIGHT and TEMPERATURE by default
    return folder / "out"


@pytest.fixture
def finished(tmp_path, finished_once):
    """A copy of a finished OUT at tmp_path/out."""
    return Path(shutil.copytree(finished_once, tmp_path / "out", symlinks=True))


def _checkpoint(out, step: int, world: int) -> Path:
    """A finished checkpoint of OUT/train as a trainer of ``world`` processes leaves it (the trainer
    files and COMPLETE, all that deciding on a resume reads)."""
    folder = out / "train" / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for rank in range(world):
        (folder / f"trainer_rank{rank}.json").write_text(json.dumps({"step": step, "dp_size": world}))
    (folder / "COMPLETE").write_text("ok")
    return folder


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("setting, says", [
    ("nproc=0", "NPROC=0: must be at least 1"),
    ("nproc=-1", "NPROC=-1: must be at least 1"),
    ("nproc=abc", "NPROC=abc: not a whole number; give one of at least 1"),
    # recipes/januspro_demo_cpu.yaml: a batch of 8 in micro-batches of 2
    ("nproc=3", "NPROC=3: the recipe's batch (parallel.global_batch_size 8, micro_batch_size 2) trains on 1 or 2 "
                "or 4 processes"),
    ("steps=0", "STEPS=0: must be at least 1"),
    ("steps=abc", "STEPS=abc: not a whole number; give one of at least 1"),
    ("steps=2001", "STEPS=2001: past the recipe's optim.steps=2000, where its schedule ends; give at most 2000"),
    ("workers=abc", "WORKERS=abc: not a whole number; give one of at least 1"),
    ("workers=0", "WORKERS=0: must be at least 1"),
    ("cfg_weight=nan", "CFG_WEIGHT=nan: must be a finite number"),
    ("cfg_weight=abc", "CFG_WEIGHT=abc: not a number"),
    ("temperature=-1", "TEMPERATURE=-1: must be at least 0"),
    ("temperature=inf", "TEMPERATURE=inf: must be a finite number"),
])
def test_a_bad_setting_is_refused_before_out_is_made(tmp_path, setting, says):
    key, value = setting.split("=", 1)
    with pytest.raises(jp.BadSetting) as refused:
        _check_settings(tmp_path / "out", **{key: value})
    assert str(refused.value) == says
    assert not (tmp_path / "out").exists()


def test_good_settings_pass_and_make_out(tmp_path):
    # TEMPERATURE=0: the most likely code; STEPS up to the recipe's optim.steps; any process count the batch fits
    for settings in ({"temperature": "0"}, {"steps": "2000", "nproc": "4"}, {"nproc": "1", "cfg_weight": "-1.5"}):
        assert _check_settings(tmp_path / "out", **settings) is None
    assert sorted(os.listdir(tmp_path / "out")) == []  # made, with no probe left behind


def test_a_bad_setting_stops_the_script_with_the_checks_line_before_any_work(tmp_path, fake_python):
    line = _refusal(_run(tmp_path, fake_python, NPROC="3"))
    assert line.startswith("[januspro demo] error: NPROC=3: the recipe's batch")
    assert _steps(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("python", ["nowhere/python", "/bin/true", "no-such-python-command"])
def test_a_python_that_is_not_the_environments_is_refused(tmp_path, fake_python, python):
    line = _refusal(_run(tmp_path, fake_python, PYTHON=python))
    assert "PYTHON=" in line and "python" in line
    assert not (tmp_path / "out").exists()


def test_a_python_without_the_projects_packages_is_refused_before_out_is_made(tmp_path, fake_python):
    bare = tmp_path / "bare"
    # no site-packages (-S): this checkout's packages import, torch and the rest do not
    bare.write_text('#!/usr/bin/env bash\nexec "$REAL_PYTHON" -S "$@"\n')
    bare.chmod(0o755)
    line = _refusal(_run(tmp_path, fake_python, PYTHON=str(bare), PYTHONPATH=""))
    assert "cannot import this project's packages (ModuleNotFoundError: No module named" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a*b", "a?b", "run[1]"])
def test_an_out_with_glob_characters_is_refused(tmp_path, fake_python, name):
    line = _refusal(_run(tmp_path, fake_python, OUT=str(tmp_path / name)))
    assert "[ * ?" in line and "DeepSpeed" in line
    assert _steps(tmp_path) == [] and not (tmp_path / name).exists()


def test_an_out_that_is_a_file_or_under_one_is_refused(tmp_path, fake_python):
    (tmp_path / "file").write_text("x")
    file, under = tmp_path / "file", tmp_path / "file" / "sub"
    assert _refused(_check_settings, file) == (
        f"OUT={file}: is a file, not a folder; give a folder (it is made if missing)")
    assert _refused(_check_settings, under) == (
        f"OUT={under}: cannot write there (Not a directory); give a writable folder")
    assert "is a file, not a folder" in _refusal(_run(tmp_path, fake_python, OUT=str(file)))
    assert _steps(tmp_path) == []


def test_a_copied_finished_out_passes_every_check(finished):
    # the fixture's copies keep the files' modification times (in ns), which the checks compare
    assert _check_settings(finished) is None  # the stand-in trains nothing: no run to skip
    assert jp.codec_state(finished) == "done" and jp.shards_state(finished) == "done"


def test_a_finished_run_under_a_relative_out_with_spaces_is_resumed_without_the_data_steps(tmp_path, fake_python,
                                                                                            finished_once):
    out = tmp_path / "my run: #1"  # a relative OUT is the caller's; ": " and " #" reach the training quoted
    shutil.copytree(finished_once, out, symlinks=True)
    done = _run(tmp_path, fake_python, cwd=tmp_path, OUT="my run: #1")
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == ["train", "sample", "evaluate"]  # made again were it another OUT
    assert not (REPO / "my run: #1").exists()
    train = next(call for call in _calls(tmp_path) if call[:2] == ["-m", "torch.distributed.run"])
    # a JSON string is a YAML one: bare, ": " and " #" broke the value
    assert f'data.root="{out}/shards"' in train and f'train.output_dir="{out}/train"' in train
    assert done.stdout.splitlines()[-1] == '{"qa": {"accuracy": 1.0}}'  # the report, printed last


# ------------------------------------------------------------------------------------ failing steps


# Steps 1-3 and 5 fail through the same run_step (step 5 is left out: its run costs 7 s); the training
# (a pipe through tee) and the scoring (its report on stdout) fail apart.
@pytest.mark.parametrize("step, name, log, remove, ran", [
    ("synth", "step 1 (data_tools synth)", "synth.log", None, []),  # from an empty OUT
    ("fit-codec", "step 2 (data_tools fit-codec)", "fit-codec.log", ["codec", "shards"], []),
    ("build", "step 3 (data_tools build)", "build.log", ["shards"], []),
    ("train", "step 4 (training)", "train.log", [], []),  # the stand-in's training leaves no run: trained again
    ("evaluate", "step 6 (pretrain.evaluate)", "evaluate.log", [], ["train", "sample"]),
])
def test_a_failing_step_stops_the_script_with_one_line_naming_it_and_its_log(tmp_path, fake_python, finished_once,
                                                                              step, name, log, remove, ran):
    if remove is not None:  # a finished OUT less the outputs of this step on: it is the first data step to run
        shutil.copytree(finished_once, tmp_path / "out", symlinks=True)
        for folder in remove:
            shutil.rmtree(tmp_path / "out" / folder)
    done = _run(tmp_path, fake_python, FAIL_ON=step)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"[januspro demo] error: {name} failed (exit 2): {step} refused its input; whole output: "
        f"{tmp_path / 'out' / 'logs' / log}")
    assert _steps(tmp_path) == [*ran, step]  # the data steps before it were skipped (their outputs are there)
    assert f"error: {step} refused its input" in (tmp_path / "out" / "logs" / log).read_text()


# ------------------------------------------------------------------------------- stale, half-made


def test_a_data_set_stopped_part_way_is_made_again(tmp_path, fake_python, finished_once):
    # synth writes synth.json last (after the held-out split and the tokenizer): a run stopped while
    # it wrote the tokenizer left eval.json but no tokenizer, and was taken for finished
    shutil.copytree(finished_once / "raw", tmp_path / "out" / "raw")
    raw = tmp_path / "out" / "raw"
    (raw / "synth.json").unlink()
    for f in (raw / "tokenizer").iterdir():
        f.unlink()
    done = _run(tmp_path, fake_python, FAIL_ON="fit-codec")  # stopped once the data set is made again
    assert done.returncode == 1
    assert _steps(tmp_path) == ["synth", "fit-codec"]
    assert (raw / "synth.json").exists() and (raw / "tokenizer" / "tokenizer.json").exists()


def test_a_codec_fit_stopped_part_way_is_fitted_again(tmp_path, fake_python, finished):
    # a re-fit stopped after the codebook was written, before codec.json: the two files disagree
    codec = finished / "codec"
    (codec / "codebook.safetensors").write_bytes(b"half")
    (codec / "fitted_on.json").unlink()
    assert jp.codec_state(finished) == "fit"
    done = _run(tmp_path, fake_python)
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == ["fit-codec", "train", "sample", "evaluate"]  # same data, same seed: same codec
    assert jp.codec_state(finished) == "done"  # stamped


def test_a_damaged_data_set_is_refused_naming_the_file(finished):
    raw = finished / "raw"
    shutil.rmtree(raw / "tokenizer")
    assert _refused(_check_settings, finished) == (
        f"{raw} is damaged ({raw / 'tokenizer'} is missing): remove it (rm -rf {finished}) and run the script again")
    (raw / "heldout" / "eval.json").write_text('{"palette": {"red": [255, 0, 0]}}')
    assert _refused(_check_settings, finished) == (
        f"{raw} is damaged ({raw / 'heldout' / 'eval.json'}: generation: missing or not a list of items): remove it "
        f"(rm -rf {finished}) and run the script again")


def test_a_data_set_made_again_is_refused_before_it_replaces_the_old_one(tmp_path, fake_python, finished):
    # raw/ removed (or its synth stopped part way) while codec, shards and a run made from it remain
    (finished / "raw" / "synth.json").unlink()
    codec, shards, train = finished / "codec", finished / "shards", finished / "train"
    assert _refused(_check_settings, finished) == (
        f"{finished / 'raw'} holds no finished data set (synth.json is missing), but {codec}, {shards} were made "
        f"from an earlier one: remove them (rm -rf {codec} {shards}) to make everything from a new data set, or "
        f"remove it (rm -rf {finished}) and run the script again")
    _checkpoint(finished, 2, 2)
    assert f"{codec}, {shards}, {train} were made from an earlier one: remove them (rm -rf {codec} {shards} {train})" \
        in _refused(_check_settings, finished)
    line = _refusal(_run(tmp_path, fake_python))
    assert "holds no finished data set" in line and str(shards) in line
    assert _steps(tmp_path) == []


def test_a_run_the_settings_cannot_continue_is_refused_and_a_finished_one_skips_the_training(finished):
    ckpt = _checkpoint(finished, 1800, 2)
    train = finished / "train"
    assert _refused(_check_settings, finished, nproc="1") == (
        f"{ckpt} was trained on 2 processes: give NPROC=2 to continue it, or remove it (rm -rf {train}) to train "
        "afresh on 1")
    assert _refused(_check_settings, finished, steps="2") == (
        f"{ckpt} is a run trained to step 1800, past the 2 steps asked for: give STEPS=1800 (or more, up to 2000) "
        f"to continue it, or remove it (rm -rf {train}) to train afresh")
    assert _check_settings(finished, steps="1800") == 1800  # finished: the script skips step 4
    assert _check_settings(finished) is None  # 1800 of the recipe's 2000 steps: continued


def test_a_damaged_checkpoint_is_refused_with_what_to_do(finished):
    ckpt = _checkpoint(finished, 2, 2)
    (ckpt / "trainer_rank0.json").write_text("{")
    said = _refused(_check_settings, finished)
    assert said.startswith(f"{finished / 'train' / 'checkpoints'}") and "move the checkpoints folder away" in said


def test_shards_of_other_training_files_are_refused(finished):
    _later(finished / "raw" / "train" / "und-000.tar")  # e.g. synthesised again
    shards, train = finished / "shards", finished / "train"
    assert jp.codec_state(finished) == "done"  # fitted on the generation images only
    assert _refused(jp.shards_state, finished) == (
        f"{shards} was packed from other files than those now in {finished / 'raw' / 'train'} (und-000.tar changed): "
        f"remove them and the training run made from them (rm -rf {shards} {train}) to build them again")


def test_a_codec_of_other_training_images_is_refused(tmp_path, fake_python, finished):
    train_files = finished / "raw" / "train"
    _later(train_files / "gen-000.tar")
    (train_files / "gen-001.tar").write_bytes(b"")
    codec = finished / "codec"
    assert _refused(jp.codec_state, finished) == (
        f"{codec} was fitted on other files than those now in {train_files} (gen-001.tar is new; gen-000.tar "
        f"changed): remove it and what was made with it (rm -rf {codec} {finished / 'shards'} {finished / 'train'}) "
        "to make them from this data set")
    # the script stops with that line, before its step 2 or 3 runs
    line = _refusal(_run(tmp_path, fake_python))
    assert f"{codec} was fitted on other files" in line and "gen-000.tar changed" in line
    assert _steps(tmp_path) == []


def test_a_damaged_shards_manifest_is_refused(finished):
    (finished / "shards" / "manifest.json").write_text("[1, 2]")
    said = _refused(jp.shards_state, finished)
    assert said.startswith(f"{finished / 'shards'}/manifest.json cannot be read (") and "to build them again" in said


def test_shards_encoded_with_another_codec_are_refused(finished):
    # the codec fitted again (another seed) after the shards were built: their codes would be
    # decoded with the new codebook, silent garbage
    refit = subprocess.run([sys.executable, "-m", "data_tools", "fit-codec", "--images",
                            str(finished / "raw" / "train" / "gen-*.tar"), "--out", str(finished / "codec"),
                            "--codebook-size", "64", "--patch", "4", "--resolution", "32", "--seed", "1"],
                           cwd=REPO, capture_output=True, text=True, env=child_env())
    assert refit.returncode == 0, refit.stderr
    assert jp.codec_state(finished) == "done"  # the same training images
    assert _refused(jp.shards_state, finished).startswith(
        f"{finished / 'shards'} was encoded with another codec than the one now in {finished / 'codec'}")


# ---------------------------------------------------------------------------------------- real run


@pytest.mark.slow
def test_a_real_run_then_another_nproc_fewer_steps_and_a_finished_run(tmp_path):
    """The stand-in's data steps, real training (2 steps on 1 process), sampling and scoring."""
    python = tmp_path / "data-only-python"
    python.write_text('#!/usr/bin/env bash\n'
                      'if [ "$1 $2 $3" = "-m data_tools synth" ]; then exec "$REAL_PYTHON" "$@" --train 40 --heldout 10; fi\n'
                      'exec "$REAL_PYTHON" "$@"\n')
    python.chmod(0o755)
    done = _run(tmp_path, python, NPROC="1", STEPS="2")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert (out / "eval" / "report.json").exists() and "[train] step 2/" in (out / "logs" / "train.log").read_text()
    line = _refusal(_run(tmp_path, python, NPROC="2", STEPS="2"))
    assert "was trained on 1 process: give NPROC=1 to continue it" in line
    line = _refusal(_run(tmp_path, python, NPROC="1", STEPS="1"))
    assert "is a run trained to step 2, past the 1 steps asked for" in line
    again = _run(tmp_path, python, NPROC="1", STEPS="2")
    assert again.returncode == 0, again.stderr
    assert "4/6 training: already finished at step 2" in again.stdout
