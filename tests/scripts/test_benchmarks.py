"""The benchmarks that scripts/gpu_check.sh reads, at toy size on the CPU: they run, and their JSON
holds what the summary needs. Figures are not asserted (benchmarks print, they do not test speed);
the FLOP counts are, against a few-line re-derivation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch_helpers import child_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_throughput_toy_json(tmp_path):
    out = tmp_path / "throughput.json"
    subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--toy", "--threads", "1", "--json", str(out)],
                   cwd=ROOT, env=child_env(), check=True, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["toy"] and data["recipe"] == "recipes/tiny_cpu.yaml"
    ours, base = data["runs"]["ours"], data["runs"]["baseline"]
    assert ours["micro_batch_tokens"] == base["micro_batch_tokens"]  # the baseline trains the same lengths
    assert ours["micro_batches"] == 4 and ours["tokens"] == sum(ours["micro_batch_tokens"])
    # Megatron-LM's count of the tiny LLM (hidden 64, FFN 128 gated, 4 layers of 4 heads without
    # grouping, vocab 512), re-derived: per token 6 x (block matmul weights + logits) + 12 x layers x
    # width x sequence length (dense scores, forward and backward).
    per_layer = 3 * 64 * 64 + 64 * 64 + 2 * 128 * 64 + 128 * 64  # qkv, proj, gated fc1, fc2
    expected = sum(s * (6 * (4 * per_layer + 512 * 64) + 12 * 4 * 64 * s) for s in ours["micro_batch_tokens"])
    for run in (ours, base):
        assert run["megatron_flops_per_token"] * run["tokens"] == pytest.approx(expected, rel=1e-12)
        assert run["tokens_per_s"] > 0 and run["peak_memory_gib"] > 0
        assert run["megatron_tflops"] / run["tflops"] == pytest.approx(
            run["megatron_flops_per_token"] / run["flops_per_token"], rel=1e-9)


def test_kernels_bench_json_on_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run([sys.executable, "benchmarks/kernels_bench.py", "--only", "rms_norm", "--fwd-only", "--no-compile",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    data = json.loads(out.read_text())
    assert data["device"] == "CPU" and not data["triton_timed"] and data["failed"] == []
    (row,) = data["rows"]
    assert (row["kernel"], row["pass"], row["impl"]) == ("rms_norm", "fwd", "eager")
    # bandwidth = bytes the fused kernel moves / time: read x, write y (bf16; the CPU's small shapes:
    # batch 2, decoder width 64 on a 6 x 6 grid)
    assert row["gbps"] == pytest.approx(2 * (2 * 64 * 6 * 6) * 2 / (row["us"] * 1e-6) / 1e9, rel=1e-9)


def test_kernels_bench_verdicts_name_the_kernels_slower_than_torch_compile():
    """Issue #15's rule on made-up rows: the deciding pass is fwd+bwd where timed, else fwd; a
    kernel slower than the compiled reference gets 'compile' as its choice."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernels_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def rows(op, pass_name, triton_us, compile_us):
        return [{"kernel": op, "pass": pass_name, "impl": "triton", "us": triton_us},
                {"kernel": op, "pass": pass_name, "impl": "compile", "us": compile_us}]

    found = kernels_bench.verdicts(rows("rf_loss", "fwd", 5.0, 9.0) + rows("rf_loss", "fwd+bwd", 12.0, 10.0)
                                   + rows("cfg_euler_step", "fwd", 4.0, 6.0)
                                   + [{"kernel": "grn", "pass": "fwd", "impl": "triton", "us": 1.0}])
    assert found["rf_loss"] == {"pass": "fwd+bwd", "triton_us": 12.0, "compile_us": 10.0, "slower_than_compile": True,
                                "choice": "compile", "now": "triton"}
    assert found["cfg_euler_step"]["choice"] == "triton" and not found["cfg_euler_step"]["slower_than_compile"]
    assert "grn" not in found  # no compiled row: no verdict


def test_kernels_bench_budget_leaves_rows_unstarted(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run([sys.executable, "benchmarks/kernels_bench.py", "--only", "rf_loss", "--no-compile", "--budget", "0",
                    "--json", str(out)], cwd=ROOT, env=child_env(), check=True, capture_output=True, text=True,
                   timeout=300)
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["not_run"] == ["rf_loss/fwd/eager", "rf_loss/fwd+bwd/eager"]


# ---------------------------------------------------------------------------------------------
# bad option values: one argparse error line naming the option, exit status 2, no traceback, before
# any work (each of these ran, printed wrong figures, or ended in a traceback before)
BAD_OPTIONS = [
    ("data_packing.py", ["--documents", "0"], "--documents"),
    ("data_packing.py", ["--seq-length", "977"], "--seq-length"),
    ("data_packing.py", ["--window", "0"], "--window"),
    ("data_loader.py", ["--batches", "0"], "--batches"),
    ("data_loader.py", ["--records", "1"], "--records"),
    ("data_loader.py", ["--workers", "-1"], "--workers"),
    ("data_sharding.py", ["--samples", "0"], "--samples"),
    ("data_sharding.py", ["--samples", "5", "--workers", "3"], "--samples"),
    ("data_sharding.py", ["--workers", "0"], "--workers"),
    ("step_overhead.py", ["--threads", "0"], "--threads"),
    ("step_overhead.py", ["--drop-prob", "nan"], "--drop-prob"),
    ("step_overhead.py", ["--device", "bogus"], "--device"),
    ("train_throughput.py", ["--peak-tflops", "0"], "--peak-tflops"),
    ("train_throughput.py", ["--peak-tflops", "nan"], "--peak-tflops"),
    ("train_throughput.py", ["--threads", "0"], "--threads"),
    ("train_throughput.py", ["--json", "{missing}/t.json"], "--json"),
    ("train_throughput.py", ["--json", "{tmp}"], "--json"),
    ("train_throughput.py", ["--recipe", "{missing}/r.yaml"], "--recipe"),
    ("train_throughput.py", ["--set", "model.llm.bogus=3"], "model.llm.bogus"),
    ("kernels_bench.py", ["--batch", "0"], "--batch"),
    ("kernels_bench.py", ["--peak-gbps", "-5"], "--peak-gbps"),
    ("kernels_bench.py", ["--budget", "nan"], "--budget"),
    ("kernels_bench.py", ["--rep", "0"], "--rep"),
    ("kernels_bench.py", ["--only", "rms_norm,bogus"], "--only"),
    ("kernels_bench.py", ["--json", "{missing}/k.json"], "--json"),
]


@pytest.mark.parametrize("script,args,option", BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_option_values_are_one_error_line(tmp_path, script, args, option):
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and option in last, last


@pytest.mark.parametrize("script", ["data_loader.py", "data_packing.py", "data_sharding.py", "step_overhead.py",
                                    "train_throughput.py", "kernels_bench.py"])
def test_help_gives_every_default(script):
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120, check=True)
    text = " ".join(proc.stdout.split("options:", 1)[1].split())
    entries = re.split(r" (?=--[a-z][\w-]* )", text)[1:]  # one per long option
    assert len(entries) >= 2
    for entry in entries:
        if re.match(r"--[\w-]+ [A-Z{]", entry):  # takes a value (flags have no default to show)
            assert "default" in entry, (script, entry)


def test_kernels_bench_op_names_are_the_cases():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernels_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    cases = kernels_bench.build_cases(torch.device("cpu"), torch.float32, 1, small=True)
    assert tuple(c.name for c in cases) == kernels_bench.OP_NAMES
