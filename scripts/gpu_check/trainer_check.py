"""Phase 2 of scripts/gpu_check.sh: the real trainer on the tiny recipe, checked against the CPU.

Runs ``pretrain.main`` (a world of one: NCCL on CUDA) on ``recipes/tiny_cpu.yaml`` four times, each in
its own output folder under ``--work``; the first three at once:

- ``fp32``: 3 steps in fp32 with TF32 off (``NVIDIA_TF32_OVERRIDE=0`` and torch's two switches), so
  every matmul and convolution is true fp32. Its losses and gradient norms must match the CPU
  reference (``reference_losses.json``, made by ``--make-reference``) within ``FP32_RTOL``.
- ``bf16``: 6 steps with ``train.precision=bf16`` (DeepSpeed bf16). Every figure finite, within
  ``BF16_RTOL`` / ``BF16_REPA_ATOL`` of the fp32 reference, and the loss falls: the mean total of
  steps 5-6 under step 1's.
- ``resume``: 2 steps (saving at its end), then the same folder with ``--steps 3``: it resumes at
  step 2, and its step 3 must equal the uninterrupted ``fp32`` run's step 3 within ``RESUME_RTOL``.

Tolerances (relative, per figure, |a - b| <= rtol |b| + 1e-7):
- FP32_RTOL = 1e-4. fp32 without TF32 rounds at 6e-8 per operation; the differences between two
  fp32 paths measured on the CPU over 3 trainer steps (2 threads vs 1: up to 2.5e-7; the Triton
  kernels in the interpreter vs the PyTorch references: 8e-8) stay under 3e-7 relative, and
  cuBLAS/cuDNN summation orders over these short reductions (<= 512 terms) may add ~1e-6. 1e-4
  leaves that headroom through three Adam updates; a wrong kernel, weight or random draw moves the
  losses by 1e-2 or more, and TF32 left on (10-bit mantissa) by ~1e-4.
- BF16_RTOL = 5e-3 on the total, L_AR and L_RF (L_REPA, a cosine near 0, absolute BF16_REPA_ATOL =
  1e-2). DeepSpeed's bf16 engine driven on the CPU (same recipe, 10 steps) differed from fp32 by at
  most 6.2e-4 relative (L_RF) and 2.0e-3 absolute (L_REPA); GPU bf16 kernels (SDPA, Triton with bf16
  I/O) round differently, so ~8x / 5x that headroom. bf16's own rounding is 3.9e-3 per value.
- RESUME_RTOL = 1e-6: resuming restores weights, optimizer, EMA, data cursor and draws, so step 3 is
  the same computation; only run-to-run nondeterminism of GPU kernels (atomics in backward passes,
  ~1e-7) may differ. The figure printed next to it is the run-to-run difference of steps 1-2.

Usage:
    python scripts/gpu_check/trainer_check.py --work DIR --json RESULT.json [--budget S] [--allow-cpu]
    python scripts/gpu_check/trainer_check.py --make-reference   # on a CPU host: rewrites the reference
Exit status: 0 passed or skipped (no CUDA), 1 a check failed, 2 a run failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("reference_losses.json")
RECIPE = "recipes/tiny_cpu.yaml"
FIGURES = ("loss/total", "loss/ar", "loss/rf", "loss/repa", "grad_norm")
FP32_RTOL = 1e-4
BF16_RTOL = 5e-3
BF16_REPA_ATOL = 1e-2
RESUME_RTOL = 1e-6
ATOL = 1e-7
# pretrain.main with TF32 off in torch as well as in the libraries (NVIDIA_TF32_OVERRIDE=0 below)
sys.path.insert(0, str(ROOT))  # the shared argparse types, also when run without PYTHONPATH
from pretrain.cli_args import finite_number, output_file  # noqa: E402

RUNNER = ("import sys, torch; torch.backends.cuda.matmul.allow_tf32 = False; "
          "torch.backends.cudnn.allow_tf32 = False; from pretrain.main import main; sys.exit(main(sys.argv[1:]))")


def trainer_argv(out_dir: Path, steps: int, precision: str) -> list[str]:
    return [sys.executable, "-c", RUNNER, "--recipe", RECIPE, "--set", f"train.output_dir={out_dir}",
            "--set", f"train.precision={precision}", "--steps", str(steps)]


def trainer_env() -> dict[str, str]:
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def read_metrics(out_dir: Path) -> list[dict]:
    """The trainer's per-step scalars (``metrics.jsonl``, appended across resumes)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # The trainer writes a value that is not a finite number as null (strict JSON): back to NaN here,
    # so a diverged run fails its checks instead of stopping this script with a TypeError.
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: math.nan if v is None else v for k, v in row.items()} for row in rows]


def by_step(rows: list[dict]) -> dict[int, dict]:
    return {int(r["step"]): r for r in rows}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def within(a: float, b: float, rtol: float, atol: float = ATOL) -> bool:
    return math.isfinite(a) and abs(a - b) <= rtol * abs(b) + atol


# ---------------------------------------------------------------------------------------------
class Runs:
    """Trainer processes with their logs; all of them are killed on exit or SIGTERM."""

    def __init__(self, work: Path, deadline: float) -> None:
        self.work, self.deadline, self.procs = work, deadline, {}
        signal.signal(signal.SIGTERM, self._terminate)

    def start(self, name: str, out_dir: Path, steps: int, precision: str) -> None:
        argv = trainer_argv(out_dir, steps, precision)
        log = open(self.work / f"{name}.log", "a")
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait(self, name: str) -> int | None:
        """Exit status, or None when the budget ran out (the process is then killed)."""
        try:
            return self.procs[name].wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            return None

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _terminate(self, *_):
        self.kill_all()
        sys.exit(2)

    def log_text(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")


def compare(rows: dict[int, dict], ref: dict[int, dict], steps, keys, rtol: float, atol: float = ATOL):
    """-> (all within, largest relative difference, where)."""
    ok, worst, where = True, 0.0, "all equal"
    for step in steps:
        for key in keys:
            if step not in rows or step not in ref:
                return False, math.inf, f"step {step} missing"
            a, b = float(rows[step][key]), float(ref[step][key])
            ok &= within(a, b, rtol, atol)
            if not math.isfinite(a) or rel_diff(a, b) > worst:
                worst, where = (math.inf if not math.isfinite(a) else rel_diff(a, b)), f"{key} step {step}"
    return ok, worst, where


def check(args) -> dict:
    import torch

    result = {"phase": "trainer", "status": "skipped", "checks": [], "figures": {}}
    if not torch.cuda.is_available() and not args.allow_cpu:
        result["summary"] = "no CUDA (the comparison against the CPU reference needs a GPU)"
        return result
    cuda = torch.cuda.is_available()
    reference = json.loads(REFERENCE.read_text())
    ref = by_step(reference["steps"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = Runs(work, time.monotonic() + args.budget)
    dirs = {name: work / f"run_{name}" for name in ("fp32", "bf16", "resume")}
    print(f"trainer: {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu (--allow-cpu)'}; runs under {work}")
    runs.start("fp32", dirs["fp32"], 3, "fp32")
    runs.start("resume", dirs["resume"], 2, "fp32")
    if cuda:  # on the CPU the engine keeps fp32 (bf16 only on GPUs): nothing to check there
        runs.start("bf16", dirs["bf16"], 6, "bf16")
    status = {name: runs.wait(name) for name in list(runs.procs)}
    if status["resume"] == 0:
        runs.start("resume", dirs["resume"], 3, "fp32")
        status["resume"] = runs.wait("resume")
    for name in runs.procs:
        print(f"\n===== {name} (exit {status[name]}) =====\n{runs.log_text(name)}")
    failed = {n: s for n, s in status.items() if s != 0}
    if failed:
        result["status"] = "error"
        result["summary"] = "run failed: " + ", ".join(f"{n} {'timed out' if s is None else f'exit {s}'}"
                                                       for n, s in failed.items())
        return result

    def add(name: str, ok: bool, detail: str) -> None:
        result["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    fp32 = by_step(read_metrics(dirs["fp32"]))
    ok, worst, where = compare(fp32, ref, (1, 2, 3), FIGURES, FP32_RTOL)
    result["figures"]["fp32_vs_cpu_max_rel"] = worst
    add("fp32 vs CPU reference, steps 1-3", ok, f"max rel diff {worst:.2e} ({where}), tolerance {FP32_RTOL:g}")

    resumed = by_step(read_metrics(dirs["resume"]))
    _, noise, _ = compare(resumed, fp32, (1, 2), FIGURES, RESUME_RTOL)
    ok, worst, where = compare(resumed, fp32, (3,), FIGURES, RESUME_RTOL)
    ok &= "resumed from" in runs.log_text("resume") and sorted(resumed) == [1, 2, 3]
    result["figures"]["resume_step3_rel"] = worst
    result["figures"]["run_to_run_rel"] = noise
    add("resume 2+1 vs uninterrupted 3", ok, f"step-3 rel diff {worst:.2e} (tolerance {RESUME_RTOL:g}); "
        f"run-to-run steps 1-2 {noise:.2e}")

    if cuda:
        bf16 = by_step(read_metrics(dirs["bf16"]))
        finite = len(bf16) == 6 and all(math.isfinite(float(r[k])) for r in bf16.values() for k in FIGURES)
        ok_l, worst, where = compare(bf16, ref, range(1, 7), ("loss/total", "loss/ar", "loss/rf"), BF16_RTOL)
        ok_r, worst_repa, _ = compare(bf16, ref, range(1, 7), ("loss/repa",), 0.0, BF16_REPA_ATOL)
        repa_abs = max((abs(float(bf16[s]["loss/repa"]) - float(ref[s]["loss/repa"])) for s in range(1, 7)
                        if s in bf16), default=math.inf)
        _, vs_gpu, _ = compare(bf16, fp32, (1, 2, 3), ("loss/total", "loss/ar", "loss/rf"), BF16_RTOL)
        first = float(bf16[1]["loss/total"]) if 1 in bf16 else math.nan
        last = sum(float(bf16[s]["loss/total"]) for s in (5, 6)) / 2 if finite else math.nan
        result["figures"].update(bf16_vs_fp32_max_rel=worst, bf16_repa_abs=repa_abs, bf16_vs_gpu_fp32_rel=vs_gpu,
                                 bf16_loss_first=first, bf16_loss_last=last)
        add("bf16 finite and close to fp32", finite and ok_l and ok_r,
            f"max rel diff {worst:.2e} ({where}; tolerance {BF16_RTOL:g}), L_REPA abs {repa_abs:.1e} "
            f"(tolerance {BF16_REPA_ATOL:g}); vs this GPU's fp32 steps 1-3 {vs_gpu:.2e}")
        add("bf16 loss falls", finite and last < first, f"total {first:.4f} at step 1 -> {last:.4f} (mean of 5-6)")

    passed = all(c["ok"] for c in result["checks"])
    result["status"] = "pass" if passed else "fail"
    f = result["figures"]
    parts = [f"fp32 vs CPU {f['fp32_vs_cpu_max_rel']:.1e} (tol {FP32_RTOL:g})"]
    if "bf16_vs_fp32_max_rel" in f:
        parts.append(f"bf16 {f['bf16_vs_fp32_max_rel']:.1e} (tol {BF16_RTOL:g}), loss "
                     f"{f['bf16_loss_first']:.3f}->{f['bf16_loss_last']:.3f}")
    parts.append(f"resume {f['resume_step3_rel']:.1e} (tol {RESUME_RTOL:g})")
    result["summary"] = "; ".join(parts)
    return result


# ---------------------------------------------------------------------------------------------
def make_reference(steps: int = 6) -> None:
    """The CPU fp32 losses of ``steps`` steps, one thread (reproducible), into ``REFERENCE``."""
    import torch

    if torch.cuda.is_available():
        sys.exit("error: --make-reference runs the CPU reference: run it on a host without CUDA")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = trainer_argv(out, steps, "fp32")
        env = dict(trainer_env(), OMP_NUM_THREADS="1")
        subprocess.run(argv, cwd=ROOT, env=env, check=True)
        rows = read_metrics(out)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    shown = ["OMP_NUM_THREADS=1", "python", "-c", RUNNER] + argv[3:]
    reference = {
        "made_by": "python scripts/gpu_check/trainer_check.py --make-reference",
        "command": shlex.join(shown).replace(str(out), "<tmp>/run"),
        "commit": commit, "torch": torch.__version__, "python": platform.python_version(),
        "device": "cpu, 1 thread, fp32, kernels: PyTorch references (train.kernels=auto on CPU)",
        "steps": [{"step": int(r["step"]), **{k: float(r[k]) for k in FIGURES}} for r in rows],
    }
    REFERENCE.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {REFERENCE} ({len(rows)} steps)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="folder for the runs and their logs (default: a temporary one)")
    # Checked while parsing: a JSON path that cannot be written was a traceback after all the runs,
    # and a NaN budget ended every run after 1 s as "timed out" (0 or negative ones too).
    p.add_argument("--json", dest="json_path", type=output_file, default=None,
                   help="write the result here (default: none)")
    p.add_argument("--budget", type=finite_number(1.0), default=125.0,
                   help="seconds for all runs together, at least 1 (default 125)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run on the CPU when there is no GPU (checks the plumbing: fp32 and resume only)")
    p.add_argument("--make-reference", action="store_true", help="rewrite reference_losses.json (CPU host)")
    args = p.parse_args(argv)
    if args.make_reference:
        make_reference()
        return 0
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check_trainer_")
    result = check(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"trainer: {result['status']}: {result['summary']}")
    return {"pass": 0, "skipped": 0, "fail": 1}.get(result["status"], 2)


if __name__ == "__main__":
    sys.exit(main())
