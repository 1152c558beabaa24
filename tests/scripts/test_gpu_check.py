"""scripts/gpu_check.sh and its helpers on a CPU host: syntax, the no-CUDA routing, the summary
table, the comparison rules of the trainer phase, the wheel list; the CPU smoke run (slow).

The GPU phases themselves are not run here: without CUDA each one must say "skipped: no CUDA".
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch_helpers import child_env
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
WHEELS = ROOT / "scripts" / "gpu_wheels.sh"
PHASES = ("setup", "tests", "trainer", "throughput", "kernels")
sys.path.insert(0, str(ROOT / "scripts" / "gpu_check"))

import summary  # noqa: E402
import trainer_check  # noqa: E402

no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host the script runs its real phases")


def run_script(tmp_path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # child_env: without the rendezvous variables the in-process runtime fixture may have set.
    env = dict(child_env(), OUT=str(tmp_path / "out"), GPU_CHECK_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script", [SCRIPT, WHEELS], ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@no_cuda_only
def test_without_cuda_every_phase_skips_and_the_summary_is_written(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    for phase in PHASES:
        assert f"{phase}: skipped: no CUDA" in proc.stdout
        assert (out / f"{phase}.log").read_text().strip() == f"{phase}: skipped: no CUDA"
    table = (out / "summary.txt").read_text()
    assert table in proc.stdout  # printed and written alike
    rows = json.loads((out / "summary.json").read_text())["phases"]
    assert [(r["phase"], r["status"]) for r in rows] == [(p, "skipped") for p in PHASES]
    assert re.search(r"^total\s+skipped", table, re.M)
    # what comes back from the device machine: at most 8 files, no sub-folders
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())


@no_cuda_only
def test_only_the_selected_phases_run(tmp_path, monkeypatch):
    """GPU_CHECK_ONLY names the phases of a second try; the others say they were not selected."""
    monkeypatch.setenv("GPU_CHECK_ONLY", "kernels")
    monkeypatch.setenv("GPU_CHECK_LIMIT_KERNELS", "1")  # the CPU bench is cut short: a timeout row
    proc = run_script(tmp_path, "--cpu-smoke")
    rows = {r["phase"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["phases"]}
    for phase in ("tests", "trainer", "throughput"):
        assert rows[phase]["status"] == "skipped" and rows[phase]["figures"].startswith("not selected")
    assert rows["kernels"]["status"] == "TIMEOUT" and proc.returncode == 1


def test_unknown_argument_is_refused(tmp_path):
    proc = run_script(tmp_path, "--bogus")
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_wheels_dry_run_lists_the_pinned_packages_and_downloads_nothing(tmp_path):
    env = dict(os.environ, GPU_WHEELS_DIR=str(tmp_path / "wheels"))
    proc = subprocess.run(["bash", str(WHEELS), "--dry-run"], capture_output=True, text=True, env=env, check=True)
    listed = dict(re.findall(r"^\s+([A-Za-z0-9_.-]+)==(\S+)", proc.stdout, re.M))
    # the versions setup.py pins must be the ones that travel
    setup_py = (ROOT / "setup.py").read_text()
    for name in ("deepspeed", "megatron-core"):
        pinned = re.search(rf'"{name}==([^"]+)"', setup_py).group(1)
        assert listed[name] == pinned
    assert {"diffusers", "pydantic", "hjson"} <= set(listed)
    # preinstalled on the GPU machine (KINDS.md): they must not travel
    assert not {"torch", "triton", "transformers", "numpy", "pyarrow"} & set(listed)
    assert not (tmp_path / "wheels").exists()


# ---------------------------------------------------------------------------------------------
# the summary table, from phase outputs written here
def write_phase_outputs(work: Path, out: Path) -> None:
    work.mkdir()
    out.mkdir()
    (work / "phases.tsv").write_text("\n".join([
        "setup\t0\t12.0\t45", "tests\t1\t50.5\t110", "trainer\t124\t130.0\t130", "throughput\t0\t90.0\t170",
        "kernels\tskip\t0\t0\tno CUDA"]) + "\n")
    (out / "setup.log").write_text("setup: installing 13 wheels\nsetup: torch 2.11.0 (CUDA 13.0); NVIDIA H200\n")
    (work / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.fused_kernels.test_a" name="test_ok"/>'
        '<testcase classname="tests.fused_kernels.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.fused_kernels.test_a" name="test_skip"><skipped/></testcase>'
        '<testcase classname="tests.fused_kernels.test_a" name="test_ok2"/></testsuite></testsuites>')
    run = {"tokens_per_s": 30000.0, "tflops": 200.0, "mfu": 0.2022, "megatron_tflops": 250.0,
           "megatron_mfu": 0.2528, "peak_memory_gib": 61.25}
    (work / "throughput.json").write_text(json.dumps({"device": "NVIDIA H200", "runs": {"ours": run, "baseline": run}}))
    (work / "overhead.json").write_text('note: a line before the object\n{"syncs_per_micro_step": 3, "launch_ratio": 1.2}')


def test_summary_statuses_figures_and_exit_code(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    write_phase_outputs(work, out)
    assert summary.main(["--work", str(work), "--out", str(out)]) == 1  # a failure and a timeout
    rows = {r["phase"]: r for r in json.loads((out / "summary.json").read_text())["phases"]}
    assert {k: r["status"] for k, r in rows.items()} == {
        "setup": "pass", "tests": "FAIL", "trainer": "TIMEOUT", "throughput": "pass", "kernels": "skipped"}
    assert rows["setup"]["figures"] == "torch 2.11.0 (CUDA 13.0); NVIDIA H200"
    assert rows["tests"]["figures"] == "2 passed, 1 failed, 1 skipped; failed: test_a::test_bad"
    assert rows["trainer"]["figures"].startswith("limit 130 s reached")
    assert "ours 30,000 tok/s, 200.0 TFLOP/s MFU 20.2% (Megatron 250.0, 25.3%), 61.2 GiB" in rows["throughput"]["figures"]
    assert rows["throughput"]["figures"].endswith("syncs/micro-step 3")
    assert rows["kernels"]["figures"] == "no CUDA"
    table = (out / "summary.txt").read_text()
    assert re.search(r"^total\s+FAIL\s+failed: tests, trainer\s+282\.5$", table, re.M)


def test_summary_kernel_figures(tmp_path):
    work = tmp_path
    rows = []
    for kernel, eager, compiled, triton, fraction in (("a", 100, 80, 100, 0.5), ("b", 100, 50, 50, 0.6),
                                                      ("c", 100, 40, 25, 0.9)):
        rows += [{"kernel": kernel, "pass": "fwd", "impl": "eager", "us": eager, "speedup_vs_eager": 1.0,
                  "peak_fraction": 0.1},
                 {"kernel": kernel, "pass": "fwd", "impl": "compile", "us": compiled,
                  "speedup_vs_eager": eager / compiled, "peak_fraction": 0.2},
                 {"kernel": kernel, "pass": "fwd", "impl": "triton", "us": triton, "speedup_vs_eager": eager / triton,
                  "peak_fraction": fraction}]
    (work / "kernels.json").write_text(json.dumps({"peak_gbps": 4800.0, "rows": rows, "failed": [{"kernel": "d"}]}))
    text, _ = summary.kernels_figures(work)
    # speed-ups 1, 2, 4; vs compile 0.8, 1.0, 1.6; fractions 50-90%, median 60%
    assert text == ("3 kernels, 9 rows, 1 failed; Triton vs eager x1.00-x4.00 (median x2.00), vs compile median x1.00; "
                    "50%-90% of 4800 GB/s (median 60%)")
    # with the benchmark's verdicts (issue #15) and rows left out by its time budget
    verdicts = {k: {"slower_than_compile": k == "a"} for k in "abc"}
    (work / "kernels.json").write_text(json.dumps({"peak_gbps": 4800.0, "rows": rows, "failed": [],
                                                   "verdicts": verdicts, "not_run": ["e/fwd/eager"]}))
    text, _ = summary.kernels_figures(work)
    assert text.endswith("; slower than torch.compile (set 'compile' in fused_kernels/dispatch.py CUDA_CHOICE): a; "
                         "1 rows not run (time budget)")
    verdicts["a"]["slower_than_compile"] = False
    (work / "kernels.json").write_text(json.dumps({"peak_gbps": 4800.0, "rows": rows, "verdicts": verdicts}))
    assert summary.kernels_figures(work)[0].endswith("; none of 3 slower than torch.compile")


def test_tests_phase_with_no_gpu_tests_is_a_failure_that_says_so(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "phases.tsv").write_text("tests\t5\t20.0\t110\n")
    assert summary.main(["--work", str(work), "--out", str(out)]) == 1
    row = json.loads((out / "summary.json").read_text())["phases"][0]
    assert row["status"] == "FAIL" and row["figures"] == "no test is marked gpu (pytest collected none)"


# ---------------------------------------------------------------------------------------------
# the trainer phase's rules
def rows(values: dict[int, float]) -> dict[int, dict]:
    return {s: {k: v for k in trainer_check.FIGURES} for s, v in values.items()}


def test_trainer_comparison_tolerance_and_missing_steps():
    ref = rows({1: 8.0, 2: -0.05})
    near = rows({1: 8.0 * (1 + 5e-5), 2: -0.05 * (1 - 5e-5)})
    far = rows({1: 8.0 * (1 + 2e-4), 2: -0.05})
    ok, worst, _ = trainer_check.compare(near, ref, (1, 2), trainer_check.FIGURES, trainer_check.FP32_RTOL)
    assert ok and worst == pytest.approx(5e-5, rel=1e-6)
    ok, worst, where = trainer_check.compare(far, ref, (1, 2), trainer_check.FIGURES, trainer_check.FP32_RTOL)
    assert not ok and worst == pytest.approx(2e-4, rel=1e-6) and where.endswith("step 1")
    nan = rows({1: math.nan, 2: -0.05})
    assert not trainer_check.compare(nan, ref, (1, 2), trainer_check.FIGURES, 1.0)[0]
    assert trainer_check.compare(ref, ref, (1, 3), trainer_check.FIGURES, 1.0)[:2] == (False, math.inf)


def test_trainer_metrics_null_reads_as_nan_and_fails_the_comparison(tmp_path):
    """The trainer writes NaN/inf as null (strict JSON): a diverged run must fail its check, not stop
    the script with a TypeError."""
    rows = [{"step": s, **{k: 1.0 for k in trainer_check.FIGURES}} for s in (1, 2)]
    rows[1]["loss/total"] = None
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = trainer_check.by_step(trainer_check.read_metrics(tmp_path))
    assert math.isnan(got[2]["loss/total"]) and got[2]["loss/ar"] == 1.0
    ref = {s: {k: 1.0 for k in trainer_check.FIGURES} for s in (1, 2)}
    assert not trainer_check.compare(got, ref, (1, 2), trainer_check.FIGURES, 1.0)[0]


def test_reference_losses_are_consistent():
    """The stored CPU figures: 6 finite steps, the total is the sum of the three terms (weights 1 in
    the tiny recipe), the loss falls (what the bf16 check relies on), and the command is recorded."""
    ref = json.loads(trainer_check.REFERENCE.read_text())
    assert [s["step"] for s in ref["steps"]] == [1, 2, 3, 4, 5, 6]
    for s in ref["steps"]:
        assert all(math.isfinite(s[k]) for k in trainer_check.FIGURES)
        assert s["loss/total"] == pytest.approx(s["loss/ar"] + s["loss/rf"] + s["loss/repa"], abs=1e-6)
    steps = {s["step"]: s for s in ref["steps"]}
    assert (steps[5]["loss/total"] + steps[6]["loss/total"]) / 2 < steps[1]["loss/total"]
    assert "--recipe recipes/tiny_cpu.yaml" in ref["command"] and "--steps 6" in ref["command"]


@no_cuda_only
def test_trainer_phase_skips_without_cuda(tmp_path, capsys):
    out = tmp_path / "trainer.json"
    assert trainer_check.main(["--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    assert capsys.readouterr().out == "trainer: skipped: no CUDA (the comparison against the CPU reference needs a GPU)\n"
    assert json.loads(out.read_text())["status"] == "skipped"


# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@no_cuda_only
def test_cpu_smoke_run_goes_through_every_phase(tmp_path):
    """--cpu-smoke: the trainer phase on the CPU (fp32 vs the reference: equal; resume), the toy
    throughput benchmark and two kernels, through the same phase runner and summary."""
    proc = run_script(tmp_path, "--cpu-smoke", timeout=600)
    rows = {r["phase"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["phases"]}
    assert rows["setup"]["status"] == "skipped"
    for phase in ("trainer", "throughput", "kernels"):
        assert rows[phase]["status"] == "pass", (phase, proc.stdout[-3000:])
    assert rows["trainer"]["details"]["figures"]["fp32_vs_cpu_max_rel"] <= 1e-6
    assert rows["trainer"]["details"]["figures"]["resume_step3_rel"] == 0.0
    assert "tok/s" in rows["throughput"]["figures"] and "Llama" in rows["throughput"]["figures"]
    assert rows["kernels"]["figures"].startswith("2 kernels")
    assert rows["tests"]["figures"]  # passed/skipped counts, or that no test is marked gpu
    assert (proc.returncode == 0) == (rows["tests"]["status"] == "pass")


# ---------------------------------------------------------------------------------------------
# bad settings: one error line naming what to change, exit status 2, before any phase runs
@pytest.mark.parametrize("env,args,names", [
    ({"GPU_CHECK_ONLY": "kernel"}, (), "GPU_CHECK_ONLY"),  # misspelt: every phase skipped, exit 0
    ({"GPU_CHECK_LIMIT_KERNELS": "abc"}, (), "GPU_CHECK_LIMIT_KERNELS"),  # the summary's traceback
    ({"GPU_CHECK_LIMIT_TESTS": "1.5"}, (), "GPU_CHECK_LIMIT_TESTS"),
    ({"GPU_CHECK_LIMIT_TRAINER": "0"}, (), "GPU_CHECK_LIMIT_TRAINER"),
    ({"OUT": "{tmp}/a_file"}, (), "OUT="),  # a file: the summary's traceback
    ({"OUT": "{tmp}/a_file/sub"}, (), "OUT="),
    ({"GPU_CHECK_PYTHON": "{tmp}/no_python"}, (), "GPU_CHECK_PYTHON"),  # was "skipped: no CUDA" for all
    ({"TMPDIR": "{tmp}/no such dir"}, (), "TMPDIR"),
    ({}, ("--cpu-smoke", "--bogus"), "--bogus"),  # a second argument was ignored
])
def test_bad_settings_are_one_error_line(tmp_path, env, args, names):
    (tmp_path / "a_file").write_text("")
    base = dict(child_env(), OUT=str(tmp_path / "out"), GPU_CHECK_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    base.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=base, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check.sh: error:") and names in last, last
    assert "Traceback" not in proc.stdout + proc.stderr and "==" not in proc.stdout  # no phase started


@pytest.mark.parametrize("script", [SCRIPT, WHEELS], ids=lambda p: p.name)
def test_help_lists_the_options_and_exits_0(script, tmp_path):
    env = dict(os.environ, GPU_WHEELS_DIR=str(tmp_path / "wheels"))
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:")
    assert "(default" in proc.stdout or "default:" in proc.stdout
    assert not (tmp_path / "wheels").exists()


@no_cuda_only
def test_out_with_spaces_and_relative_out(tmp_path):
    """An $OUT with spaces and quotes is used as it is; a relative one is the caller's folder."""
    odd = tmp_path / "with space" / "ä'x"
    env = dict(child_env(), OUT=str(odd), GPU_CHECK_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (odd / "summary.txt").is_file() and not (odd / ".gpu_check_write_test").exists()
    env["OUT"] = "relative_out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "relative_out" / "summary.txt").is_file() and not (ROOT / "relative_out").exists()


def test_trainer_check_bad_options_are_one_error_line(tmp_path, capsys):
    for argv in (["--budget", "nan"], ["--budget", "0"], ["--json", str(tmp_path / "missing" / "t.json")],
                 ["--json", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_:
            trainer_check.main(argv)
        assert exit_.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: argument " + argv[0] in last, last
