"""Faults of our own making in a real run's checkpoints (the trainer in-process, a world of one):
damaged, truncated, empty or missing files, a garbage ``latest``, NaN state, a full disk, a crafted
pickle. Each must either fall back to the previous good checkpoint with a line naming the bad file,
or stop with one ``CheckpointError`` naming the checkpoint and the file - never load silently,
never run code, never lose the last good checkpoint."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.recipe import load_recipe
from pretrain.train.checkpoint import CheckpointError, latest_tag
from pretrain.train.offline_weights import checkpoint_weights
from pretrain.train.safe_load import MANIFEST_FILE, hash_share, listed_files, write_manifest

STEP1, STEP2 = "step_00000001", "step_00000002"
OVERRIDES = ["train.save_interval=1", "train.keep_last=3", "train.image_interval=0", "data.loader_workers=0",
             "parallel.global_batch_size=2"]
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _recipe(out: Path):
    return load_recipe("recipes/tiny_cpu.yaml", [f"train.output_dir={out}", *OVERRIDES])


def _trainer(out: Path, steps: int = 3):
    from pretrain.train.trainer import Trainer

    return Trainer(_recipe(out), max_steps=steps)


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    """A run of two steps with a checkpoint after each (step_1, step_2), trained once per module."""
    out = tmp_path_factory.mktemp("healthy") / "run"
    _trainer(out, 2).train()
    return out


@pytest.fixture
def run(healthy_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(healthy_run, out)
    return out


def _ckpt(run: Path, tag: str = STEP2) -> Path:
    return run / "checkpoints" / tag


def _reseal(folder: Path) -> None:
    """Rewrite the manifest to match the files as they are now (what an attacker controlling the
    run folder can do)."""
    old = json.loads((folder / MANIFEST_FILE).read_text())
    files = hash_share(folder, listed_files(folder), 0, 1)
    write_manifest(folder, files, {k: v for k, v in old.items() if k not in ("files", "format")})


def _weights_of(folder: Path) -> dict:
    module = torch.load(folder / MODEL, map_location="cpu", weights_only=True)["module"]
    return {k: v for k, v in module.items() if not k.endswith("_extra_state")}


def _assert_resumed_at_step_1(trainer, run: Path) -> None:
    assert trainer.step == 1
    saved = _weights_of(_ckpt(run, STEP1))
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[k].detach(), v) for k, v in saved.items() if k in params)


def test_flipped_bytes_in_optimizer_shard_fall_back_to_previous_checkpoint(run, capsys):
    path = _ckpt(run) / OPTIM
    raw = bytearray(path.read_bytes())
    for offset in (len(raw) // 2, len(raw) // 2 + 7, len(raw) // 3):  # inside the tensor data
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    trainer = _trainer(run)
    out = capsys.readouterr().out
    assert f"{path}: checksum differs" in out and "resuming from" in out and STEP1 in out
    _assert_resumed_at_step_1(trainer, run)


@pytest.mark.parametrize("damage", ["truncate_model", "empty_optimizer", "missing_rank_file", "truncate_json",
                                    "truncate_ema"])
def test_damaged_newest_checkpoint_is_skipped_with_the_file_named(run, capsys, damage):
    folder = _ckpt(run)
    name = {"truncate_model": MODEL, "empty_optimizer": OPTIM, "missing_rank_file": "trainer_rank0.json",
            "truncate_json": "trainer_rank0.json", "truncate_ema": "ema_mp0_0_dp0.safetensors"}[damage]
    path = folder / name
    if damage == "missing_rank_file":
        path.unlink()
    else:
        keep = 0 if damage == "empty_optimizer" else path.stat().st_size // 2
        path.write_bytes(path.read_bytes()[:keep])
    trainer = _trainer(run)
    out = capsys.readouterr().out
    assert str(path) in out and "skipped" in out
    assert "different world size" not in out
    _assert_resumed_at_step_1(trainer, run)


@pytest.mark.parametrize("damage", ["truncate_json", "truncate_ema", "truncate_model", "missing_rank_file"])
def test_damaged_checkpoint_without_manifest_names_the_file(run, capsys, damage):
    """A checkpoint saved before manifests existed: no checksums, but a damaged per-rank file is
    found before loading (fall back) and any other damaged file is named in the error."""
    for tag in (STEP1, STEP2):
        (_ckpt(run, tag) / MANIFEST_FILE).unlink()
    name = {"truncate_json": "trainer_rank0.json", "truncate_ema": "ema_mp0_0_dp0.safetensors",
            "truncate_model": MODEL, "missing_rank_file": "trainer_rank0.json"}[damage]
    path = _ckpt(run) / name
    if damage == "missing_rank_file":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if damage in ("truncate_json", "missing_rank_file"):
        trainer = _trainer(run)
        assert str(path) in capsys.readouterr().out
        _assert_resumed_at_step_1(trainer, run)
        return
    with pytest.raises(CheckpointError) as err:
        _trainer(run)
    assert str(path) in str(err.value) and "truncated or damaged" in str(err.value)


def test_garbage_latest_falls_back_to_newest_complete_checkpoint(run, capsys):
    (run / "checkpoints" / "latest").write_bytes(b"\x00\xff\x13garbage\x80")
    trainer = _trainer(run)
    out = capsys.readouterr().out
    assert "latest is damaged" in out
    assert trainer.step == 2


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(run):
    for tag in (STEP1, STEP2):
        (_ckpt(run, tag) / MODEL).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_tag(run / "checkpoints")


def test_layout_change_without_conversion_points_to_universal(run):
    folder = _ckpt(run)
    for tag in (STEP1, STEP2):  # as if saved by 2 data-parallel ranks
        path = _ckpt(run, tag) / "trainer_rank0.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "dp_size": 2}))
        (path.parent / "trainer_rank1.json").write_text(json.dumps({**state, "dp_size": 2}))
        _reseal(path.parent)
    with pytest.raises(CheckpointError) as err:
        _trainer(run)
    assert str(folder) in str(err.value) and "python -m pretrain.train.universal" in str(err.value)
    assert "dp 2" in str(err.value) and "dp 1" in str(err.value)


class _Payload:
    """Unpickling it creates a file: what a crafted checkpoint would do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("reseal", [True, False])
@pytest.mark.parametrize("victim", [MODEL, OPTIM])
def test_crafted_pickle_runs_no_code_on_resume_or_conversion(run, tmp_path, victim, reseal):
    from pretrain.train.universal import convert

    marker = tmp_path / "pwned"
    folder = _ckpt(run)
    state = torch.load(folder / victim, map_location="cpu", weights_only=False)  # our own file
    state["payload"] = _Payload(marker)
    torch.save(state, folder / victim)
    if reseal:  # the attacker fixed the checksums too
        _reseal(folder)
    else:  # or removed the manifest (a checkpoint from before manifests)
        (folder / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="refused to unpickle") as err:
        _trainer(run)
    assert str(folder / victim) in str(err.value)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        convert(run, STEP2)
    assert not marker.exists()
    # The payload is live: the unguarded loader DeepSpeed uses would have run it.
    with open(folder / victim, "rb"):
        torch.load(folder / victim, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_export_reads_weights_only_and_verifies(run, tmp_path):
    cfg = _recipe(run).model
    path = _ckpt(run) / MODEL
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum differs"):
        checkpoint_weights(run / "checkpoints", STEP2, cfg, "raw")
    assert checkpoint_weights(run / "checkpoints", STEP1, cfg, "raw")


@pytest.mark.parametrize("what", ["weights", "optimizer state", "EMA"])
def test_non_finite_state_is_never_saved(run, what):
    trainer = _trainer(run)
    assert trainer.step == 2
    if what == "weights":
        tensor = next(p for p in trainer.model.parameters() if p.requires_grad).data
    elif what == "optimizer state":
        tensor = next(iter(trainer.engine.optimizer.optimizer.state.values()))["exp_avg_sq"]
    else:
        tensor = next(iter(trainer.ema.shadow.values()))
    tensor.view(-1)[3] = float("nan")
    trainer.step = 3
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=f"non-finite values in rank 0: {what}"):
        trainer.save()
    assert (run / "checkpoints" / "latest").read_text() == STEP2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    tensor.view(-1)[3] = 0.0


def test_nan_loaded_from_an_unverified_optimizer_shard_never_reaches_a_complete_checkpoint(run):
    """The issue's chain: a bad optimizer shard (no manifest to catch it) turns the weights into
    NaN at the next update; no checkpoint of that state is completed and rotation (keep_last=1)
    deletes nothing healthy."""
    folder = _ckpt(run)
    (folder / MANIFEST_FILE).unlink()
    state = torch.load(folder / OPTIM, map_location="cpu", weights_only=False)
    moments = state["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["exp_avg_sq"]
    moments.view(-1)[:5] = float("nan")  # as flipped exponent bits would
    torch.save(state, folder / OPTIM)
    trainer = _trainer(run, 4)
    with pytest.raises(CheckpointError, match="non-finite"):
        trainer.train()
    assert (run / "checkpoints" / "latest").read_text() == STEP2
    assert latest_tag(run / "checkpoints") == STEP2
    assert not any((run / "checkpoints" / t / "COMPLETE").exists() for t in ("step_00000003", "step_00000004"))
    assert (_ckpt(run, STEP1) / "COMPLETE").exists()


@pytest.mark.parametrize("where", ["deepspeed", "ema"])
def test_full_disk_during_save_keeps_the_previous_checkpoint(run, monkeypatch, where):
    import pretrain.train.checkpoint as checkpoint

    trainer = _trainer(run)
    trainer.step = 3

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints" / "step_00000003" / "x"))

    if where == "deepspeed":
        monkeypatch.setattr(trainer.engine.checkpoint_engine, "save", full)
    else:
        monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError) as err:
        trainer.save()
    message = str(err.value)
    assert "No space left on device" in message and "step_00000003" in message and STEP2 in message
    assert not (run / "checkpoints" / "step_00000003").exists()
    assert (run / "checkpoints" / "latest").read_text() == STEP2
    monkeypatch.undo()
    assert trainer.save() == "step_00000003"  # space freed: the next save works


def test_rotation_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    from pretrain.train.checkpoint import _rotate

    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        folder = ckpt / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(bytes(step))
        if step <= 2:  # healthy: a manifest whose files are there
            write_manifest(folder, hash_share(folder, listed_files(folder), 0, 1), {"finite": True})
        (folder / "COMPLETE").write_text("ok\n")
    (ckpt / "step_00000004" / "data.bin").write_bytes(b"")  # complete, but unhealthy
    _rotate(ckpt, keep_last=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002", "step_00000004"]
