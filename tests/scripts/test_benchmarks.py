"""The benchmarks that scripts/gpu_check.sh reads, at toy size on the CPU: they run, and their JSON
holds what the summary needs. Figures are not asserted (benchmarks print, they do not test speed);
the FLOP counts are, against a few-line re-derivation."""

from __future__ import annotations

import json
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
