"""scripts/januspro_cpu_demo.sh: bad settings, stale or half-made outputs and failing steps.

A stand-in for PYTHON records each call. It runs the script's own checks, ``data_tools synth`` (with
40 training samples per file instead of 5,000), ``fit-codec`` and ``build`` for real (a few seconds),
and stands in for the training, the sampling and the scoring, so no model is trained here; FAIL_ON
makes one of the steps fail with an ``error: ...`` line. The one real run (slow) checks the
training run's own refusals: another NPROC, fewer STEPS, and a finished run.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# JANUSPRO_DEMO_SCRIPT: run these tests against another copy of the script (e.g. an older one)
SCRIPT = Path(os.environ.get("JANUSPRO_DEMO_SCRIPT", REPO / "scripts" / "januspro_cpu_demo.sh"))

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for PYTHON: records each call (quoted) in $CALLS, runs the script's checks and the data
# steps with the real python, and fakes training, sampling and scoring (FAIL_ON=<step> fails one).
for a in "$@"; do printf '%q ' "$a"; done >> "$CALLS"; echo >> "$CALLS"
fail() { if [ "${FAIL_ON:-}" = "$1" ]; then echo "some noise"; echo "error: $1 refused its input" >&2; exit 2; fi; }
if [ "$1" = - ]; then
  case "$2" in settings | codec | stamp | shards) exec "$REAL_PYTHON" "$@" ;; esac
  cat > /dev/null  # the sampling program
  fail sample
  mkdir -p "$2/eval/generated" && : > "$2/eval/answers.jsonl"
  exit 0
fi
if [ "$1" = -m ]; then
  case "$2" in
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


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def _run(tmp_path, fake_python, script=SCRIPT, cwd=None, **env):
    """The script with ``env`` added (OUT: tmp_path/out unless given, PYTHON: the stand-in)."""
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(fake_python), "CALLS": str(tmp_path / "calls"),
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
        elif call[0] == "-" and call[1] not in ("settings", "codec", "stamp", "shards"):
            names.append("sample")
    return names


def _refusal(done):
    """The script's one error line (asserting there is exactly one and the exit status is 2)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[januspro demo] error: "), done.stderr
    return lines[0]


ALL_STEPS = ["synth", "fit-codec", "build", "train", "sample", "evaluate"]


@pytest.fixture
def finished(tmp_path, fake_python):
    """OUT after a whole run (real data set, codec and shards; stand-in training)."""
    done = _run(tmp_path, fake_python)
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == ALL_STEPS
    (tmp_path / "calls").unlink()
    return tmp_path / "out"


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("setting, says", [
    ("NPROC=0", "NPROC=0: must be at least 1"),
    ("NPROC=-1", "NPROC=-1: must be at least 1"),
    ("NPROC=abc", "NPROC=abc: not a whole number"),
    ("NPROC=3", "NPROC=3: the recipe's batch"),
    ("STEPS=0", "STEPS=0: must be at least 1"),
    ("STEPS=abc", "STEPS=abc: not a whole number"),
    ("STEPS=2001", "STEPS=2001: past the recipe's optim.steps=2000"),
    ("WORKERS=abc", "WORKERS=abc: not a whole number"),
    ("WORKERS=0", "WORKERS=0: must be at least 1"),
    ("CFG_WEIGHT=nan", "CFG_WEIGHT=nan: must be a finite number"),
    ("CFG_WEIGHT=abc", "CFG_WEIGHT=abc: not a number"),
    ("TEMPERATURE=-1", "TEMPERATURE=-1: must be at least 0"),
    ("TEMPERATURE=inf", "TEMPERATURE=inf: must be a finite number"),
])
def test_a_bad_setting_is_one_line_before_any_work(tmp_path, fake_python, setting, says):
    key, value = setting.split("=", 1)
    line = _refusal(_run(tmp_path, fake_python, **{key: value}))
    assert says in line
    assert _steps(tmp_path) == [] and not (tmp_path / "out").exists()


def test_temperature_zero_is_greedy_and_accepted(tmp_path, fake_python):
    done = _run(tmp_path, fake_python, TEMPERATURE="0", FAIL_ON="synth")
    assert done.returncode == 1 and _steps(tmp_path) == ["synth"]  # got past the checks


@pytest.mark.parametrize("python", ["nowhere/python", "/bin/true", "no-such-python-command"])
def test_a_python_that_is_not_the_environments_is_refused(tmp_path, fake_python, python):
    line = _refusal(_run(tmp_path, fake_python, PYTHON=python))
    assert "PYTHON=" in line and "python" in line
    assert not (tmp_path / "out").exists()


def test_a_python_without_the_projects_packages_is_refused_before_out_is_made(tmp_path, fake_python):
    bare = tmp_path / "bare"
    bare.write_text('#!/usr/bin/env bash\nexec "$REAL_PYTHON" -I -S "$@"\n')  # no site-packages: no torch
    bare.chmod(0o755)
    line = _refusal(_run(tmp_path, fake_python, PYTHON=str(bare), PYTHONPATH=""))
    assert "cannot import this project's packages" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a*b", "a?b", "run[1]"])
def test_an_out_with_glob_characters_is_refused(tmp_path, fake_python, name):
    line = _refusal(_run(tmp_path, fake_python, OUT=str(tmp_path / name)))
    assert "[ * ?" in line and "DeepSpeed" in line
    assert _steps(tmp_path) == [] and not (tmp_path / name).exists()


def test_an_out_that_is_a_file_or_under_one_is_refused(tmp_path, fake_python):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _refusal(_run(tmp_path, fake_python, OUT=str(tmp_path / "file")))
    assert "cannot write there" in _refusal(_run(tmp_path, fake_python, OUT=str(tmp_path / "file" / "sub")))
    assert _steps(tmp_path) == []


def test_a_relative_out_is_the_callers_and_spaces_reach_the_training_quoted(tmp_path, fake_python):
    done = _run(tmp_path, fake_python, cwd=tmp_path, OUT="my run: #1")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "my run: #1"
    assert (out / "raw" / "synth.json").exists() and (out / "shards" / "manifest.json").exists()
    assert not (REPO / "my run: #1").exists()
    train = next(call for call in _calls(tmp_path) if call[:2] == ["-m", "torch.distributed.run"])
    # a JSON string is a YAML one: bare, ": " and " #" broke the value
    assert f'data.root="{out}/shards"' in train and f'train.output_dir="{out}/train"' in train


# ------------------------------------------------------------------------------------ failing steps


@pytest.mark.parametrize("step, name, log", [
    ("synth", "step 1 (data_tools synth)", "synth.log"),
    ("fit-codec", "step 2 (data_tools fit-codec)", "fit-codec.log"),
    ("build", "step 3 (data_tools build)", "build.log"),
    ("train", "step 4 (training)", "train.log"),
    ("sample", "step 5 (sampling)", "sample.log"),
    ("evaluate", "step 6 (pretrain.evaluate)", "evaluate.log"),
])
def test_a_failing_step_stops_the_script_with_one_line_naming_it_and_its_log(tmp_path, fake_python, step, name, log):
    done = _run(tmp_path, fake_python, FAIL_ON=step)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"[januspro demo] error: {name} failed (exit 2): {step} refused its input; whole output: "
        f"{tmp_path / 'out' / 'logs' / log}")
    assert _steps(tmp_path) == ALL_STEPS[:ALL_STEPS.index(step) + 1]
    assert f"error: {step} refused its input" in (tmp_path / "out" / "logs" / log).read_text()


# ------------------------------------------------------------------------------- stale, half-made


def test_a_finished_run_is_resumed_without_redoing_the_data_steps(tmp_path, fake_python, finished):
    done = _run(tmp_path, fake_python)
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == ["train", "sample", "evaluate"]


def test_a_data_set_stopped_part_way_is_made_again(tmp_path, fake_python):
    # synth writes synth.json last (after the held-out split and the tokenizer): a run stopped while
    # it wrote the tokenizer left eval.json but no tokenizer, and was taken for finished
    assert _run(tmp_path, fake_python, FAIL_ON="fit-codec").returncode == 1
    raw = tmp_path / "out" / "raw"
    (raw / "synth.json").unlink()
    for f in (raw / "tokenizer").iterdir():
        f.unlink()
    done = _run(tmp_path, fake_python)
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == ["synth", "fit-codec", "synth", *ALL_STEPS[1:]]


def test_a_codec_fit_stopped_part_way_is_fitted_again(tmp_path, fake_python, finished):
    # a re-fit stopped after the codebook was written, before codec.json: the two files disagree
    codec = finished / "codec"
    (codec / "codebook.safetensors").write_bytes(b"half")
    (codec / "fitted_on.json").unlink(missing_ok=True)
    done = _run(tmp_path, fake_python)
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == ["fit-codec", "train", "sample", "evaluate"]  # same data, same seed: same codec


def test_a_data_set_made_again_is_refused_before_it_replaces_the_old_one(tmp_path, fake_python, finished):
    # raw/ removed (or its synth stopped part way) while codec, shards and a run made from it remain
    (finished / "raw" / "synth.json").unlink()
    line = _refusal(_run(tmp_path, fake_python))
    assert "holds no finished data set" in line and str(finished / "shards") in line
    assert _steps(tmp_path) == []


def test_shards_of_other_training_files_are_refused(tmp_path, fake_python, finished):
    und = finished / "raw" / "train" / "und-000.tar"
    os.utime(und, ns=(und.stat().st_atime_ns, und.stat().st_mtime_ns + 10**9))  # e.g. synthesised again
    line = _refusal(_run(tmp_path, fake_python))
    assert f"{finished / 'shards'} was packed from other files" in line and "und-000.tar changed" in line
    assert _steps(tmp_path) == []


def test_a_codec_of_other_training_images_is_refused(tmp_path, fake_python, finished):
    gen = finished / "raw" / "train" / "gen-000.tar"
    os.utime(gen, ns=(gen.stat().st_atime_ns, gen.stat().st_mtime_ns + 10**9))
    line = _refusal(_run(tmp_path, fake_python))
    assert f"{finished / 'codec'} was fitted on other files" in line and "gen-000.tar changed" in line
    assert _steps(tmp_path) == []


def test_shards_encoded_with_another_codec_are_refused(tmp_path, fake_python, finished):
    # the codec fitted again (another seed) after the shards were built: their codes would be
    # decoded with the new codebook, silent garbage
    refit = subprocess.run([sys.executable, "-m", "data_tools", "fit-codec", "--images",
                            str(finished / "raw" / "train" / "gen-*.tar"), "--out", str(finished / "codec"),
                            "--codebook-size", "64", "--patch", "4", "--resolution", "32", "--seed", "1"],
                           cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert refit.returncode == 0, refit.stderr
    line = _refusal(_run(tmp_path, fake_python))
    assert f"{finished / 'shards'} was encoded with another codec" in line
    assert _steps(tmp_path) == []


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
