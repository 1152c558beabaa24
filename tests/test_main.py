"""The main entry point trains the tiny recipe end to end and reports bad recipes clearly."""

import subprocess
import sys

import pytest
import torch

from tests.launch_helpers import REPO, child_env, main_in_process


def _main(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.main", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tiny_recipe_trains_and_loss_falls(tmp_path):
    proc = _main("--recipe", "recipes/tiny_cpu.yaml", "--steps", "12", "--set", f"train.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "] step " in line]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert (tmp_path / "checkpoints" / "latest").exists()
    # The trainer logged the recipe's sample grid (train.image_interval=10) at step 10 only.
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000010.png"]
    assert "sample grid of step 10" in proc.stdout


def test_bad_override_names_the_key():
    proc = _main("--recipe", "recipes/tiny_cpu.yaml", "--set", "optim.lrr=1")
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "did you mean lr" in proc.stderr


def _written(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, says", [
    # Said the path twice: "error: P: P: a folder, not a recipe file".
    (lambda d: d, "{p}: a folder, not a recipe file"),
    (lambda d: d / "missing.yaml", "--recipe: cannot read {p} (No such file or directory); give a recipe YAML such "
                                   "as recipes/tiny_cpu.yaml"),
    # A path through a file (or one without permission) was a NotADirectoryError traceback.
    (lambda d: _written(d / "f", "x") / "recipe.yaml", "--recipe: cannot read {p} (Not a directory); give a recipe "
                                                       "YAML such as recipes/tiny_cpu.yaml"),
    # Each was a traceback (ValueError, RecursionError) from inside PyYAML.
    (lambda d: _written(d / "r.yaml", "optim: {steps: " + "9" * 5000 + "}\n"),
     "{p}: not valid YAML: the number 99999999999999999999... has too many digits at line 1, column 16"),
    (lambda d: _written(d / "r.yaml", "loss: " + "[" * 5000 + "]" * 5000 + "\n"),
     "{p}: not valid YAML: nested too deeply"),
])
def test_a_bad_recipe_file_is_one_error_line_naming_it_once(tmp_path, make, says):
    path = make(tmp_path)
    proc = _main("--recipe", str(path))
    assert proc.returncode == 2 and proc.stderr == f"error: {says.format(p=path)}\n", proc.stderr[-3000:]


def test_bad_overrides_and_an_empty_recipe_path_are_one_error_line():
    proc = _main("--recipe", "recipes/tiny_cpu.yaml", "--set", "model.llm.num_query_groups=0")  # was ZeroDivisionError
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == "error: recipes/tiny_cpu.yaml: model.llm.num_query_groups: must be positive, got 0\n"
    proc = _main("--recipe", "recipes/tiny_cpu.yaml", "--set", "optim.steps={a")  # PyYAML's message spanned 5 lines
    assert proc.returncode == 2 and proc.stderr == (
        "error: recipes/tiny_cpu.yaml: optim.steps: the override value '{a' is not valid YAML: expected ',' or '}', "
        "but got '<stream end>' at line 1, column 3\n"), proc.stderr[-3000:]
    proc = _main("--recipe", "")  # an unset shell variable: was "error: : : a folder, not a recipe file"
    assert proc.returncode == 2
    assert proc.stderr == "error: recipe: the path is empty; give a recipe file, e.g. recipes/tiny_cpu.yaml\n"


def _run_with_an_unreadable_checkpoint(tmp_path):
    """A run folder whose latest checkpoint (saved before manifests) has an unreadable model-states
    file, and the recipe it trained with; returns the run and that checkpoint."""
    import json

    from pretrain.recipe import dump_recipe, load_recipe

    run = tmp_path / "run"
    folder = run / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "trainer_rank0.json").write_text(json.dumps({"step": 4, "dp_size": 1, "tp_size": 1, "pp_size": 1}))
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02garbage" * 8)
    (folder / "COMPLETE").write_text("ok\n")
    dump_recipe(load_recipe("recipes/tiny_cpu.yaml", [f"train.output_dir={run}"]), run / "recipe.yaml")
    return run, folder


@pytest.mark.slow
def test_failed_resume_keeps_the_run_recipe_and_says_one_line(tmp_path):
    """A resume that fails inside the trainer (an unreadable model-states file in a checkpoint saved
    before manifests) ends with one error line naming the file, and the run's recorded recipe is
    the one it trained with, not the one that failed."""
    run, folder = _run_with_an_unreadable_checkpoint(tmp_path)
    recorded = (run / "recipe.yaml").read_bytes()

    proc = _main("--recipe", "recipes/tiny_cpu.yaml", "--set", f"train.output_dir={run}", "--set", "optim.lr=5e-4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(folder / "mp_rank_00_model_states.pt") in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "resumed" not in proc.stdout
    assert (run / "recipe.yaml").read_bytes() == recorded


def test_a_failed_start_leaves_the_runtime_of_its_process_running(runtime, tmp_path, monkeypatch):
    """main() called in a process that already runs the distributed runtime (tests, notebooks): a
    start that fails in the trainer's resume leaves that runtime running, as a closed trainer does,
    instead of tearing down what it did not start."""
    import pretrain.runtime.distributed as distributed

    shutdowns = []
    monkeypatch.setattr(distributed, "shutdown_runtime", lambda: shutdowns.append(1))  # main imports it when called
    run, folder = _run_with_an_unreadable_checkpoint(tmp_path)
    proc = main_in_process("--recipe", "recipes/tiny_cpu.yaml", "--set", f"train.output_dir={run}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    # It failed in the trainer, at the checkpoint, not before it in the preflight.
    assert proc.stderr.startswith("error: ") and str(folder / "mp_rank_00_model_states.pt") in proc.stderr
    assert "[train]" in proc.stdout
    assert shutdowns == [] and torch.distributed.is_initialized()
