"""Multi-process parity on CPU (gloo): TP=2 and PP=2 equal one process; DP replicas start identical.

Each parallel run is a real torchrun launch of ``parallel_worker.py``; weights come from the one-process
reference (the same worker code, run in this process) through our converter, so the test also covers
tensor-parallel sharding of checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch_helpers import REPO, as_a_child, child_env, torchrun_cmd

WORKER = Path(__file__).with_name("parallel_worker.py")
sys.path.insert(0, str(WORKER.parent))
from parallel_worker import run as run_worker, tiny_config  # noqa: E402

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow

ATOL = 1e-5


def launch(mode: str, nproc: int, out: Path) -> None:
    cmd = torchrun_cmd(nproc, WORKER, "--mode", mode, "--out", str(out))
    proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    with as_a_child():  # one thread, as the torchrun workers
        run_worker("reference", out)
    return out


def _local_reference_grads(ref: dict, meta: dict) -> dict[str, torch.Tensor]:
    """The reference gradients cut the way this rank holds its parameters."""
    from pretrain.convert.llama import shard_llm_state

    cfg = tiny_config()
    full_llm = {k[len("grad/llm."):]: v for k, v in ref.items() if k.startswith("grad/llm.")}
    local = shard_llm_state(full_llm, cfg.llm, meta["tp_rank"], meta["tp_size"], meta["layer_numbers"],
                            meta["pre"], meta["post"])
    expected = {f"grad/llm.{k}": v for k, v in local.items()}
    first_stage = ("und_", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner", "repa_projector")
    for key, value in ref.items():
        if not key.startswith("grad/") or key.startswith("grad/llm."):
            continue
        name = key[len("grad/"):]
        if name.startswith(first_stage) and not meta["pre"]:
            continue
        if name.startswith("gen_dec") and not meta["post"]:
            continue
        expected[key] = value
    return expected


def _assert_grads_match(got: dict, expected: dict) -> None:
    got_grads = {k: v for k, v in got.items() if k.startswith("grad/")}
    assert set(got_grads) == set(expected), sorted(set(got_grads) ^ set(expected))
    for key, value in expected.items():
        torch.testing.assert_close(got_grads[key], value, atol=ATOL, rtol=1e-4, msg=key)


def test_tensor_parallel_2_matches_one_process(reference):
    launch("tp", 2, reference)
    ref = load_file(reference / "reference_rank0.safetensors")
    for rank in range(2):
        got = load_file(reference / f"tp_rank{rank}.safetensors")
        meta = json.loads((reference / f"meta{rank}.json").read_text())
        for key in ("loss", "velocity", "logits", "hidden"):
            torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=1e-4, msg=key)
        _assert_grads_match(got, _local_reference_grads(ref, meta))


def test_pipeline_parallel_2_matches_one_process(reference):
    launch("pp", 2, reference)
    ref = load_file(reference / "reference_rank0.safetensors")
    first = load_file(reference / "pp_rank0.safetensors")
    last = load_file(reference / "pp_rank1.safetensors")
    # REPA's loss lives on stage 0, L_AR and L_RF on stage 1: together they are the whole loss.
    torch.testing.assert_close(first["loss"] + last["loss"], ref["loss"], atol=ATOL, rtol=1e-5)
    for key in ("velocity", "logits", "hidden"):
        torch.testing.assert_close(last[key], ref[key], atol=ATOL, rtol=1e-4, msg=key)
    for rank, got in ((0, first), (1, last)):
        meta = json.loads((reference / f"meta{rank}.json").read_text())
        assert meta["pre"] == (rank == 0) and meta["post"] == (rank == 1)
        _assert_grads_match(got, _local_reference_grads(ref, meta))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Path:
    """Each of 2 data-parallel ranks' freshly built weights: seeded alike, then seeded per rank."""
    out = tmp_path_factory.mktemp("replicas")
    launch("dp", 2, out)
    return out


def _replica_weights(out: Path, prefix: str = "") -> tuple[dict, dict]:
    return load_file(out / f"{prefix}rank0.safetensors"), load_file(out / f"{prefix}rank1.safetensors")


def test_data_parallel_replicas_start_identical(replicas):
    first, second = _replica_weights(replicas)
    assert first.keys() == second.keys() and len(first) > 50
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_unseeded_replicas_would_differ(replicas):
    """Control for the test above: without a common seed the replicas' weights differ."""
    first, second = _replica_weights(replicas, "unseeded_")
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert len(differing) > 10
