"""A training run's side channels under faults: metrics.jsonl, TensorBoard and the sample PNGs on a
full disk or a path taken by something else, non-finite values, a resume after a crash, a failing
sample grid, signals during a save. The run must go on and save its checkpoints, say each failure in
one line naming the file and the error, and never write a record a strict reader refuses."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain.model.config import ConfigError
from pretrain.train.monitor import TensorBoardMonitor, remaining_time

NEVER_STOP = SimpleNamespace(agreed=lambda comm: False, reason="")


def strict_rows(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed as strict JSON (bare NaN / Infinity refused)."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def train_lines(capsys) -> list[str]:
    out = capsys.readouterr().out
    assert "Traceback" not in out
    return out.splitlines()


def test_non_finite_values_are_null_and_every_line_is_strict_json(tmp_path):
    monitor = TensorBoardMonitor(tmp_path)
    monitor.scalars(1, {"loss/total": float("nan"), "grad_norm": float("inf"), "lr": -float("inf")})
    monitor.scalars(2, {"loss/total": 1.5, "grad_norm": 0.25, "lr": 1e-4})
    monitor.close()
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss/total": None, "grad_norm": None, "lr": None},
                    {"step": 2, "loss/total": 1.5, "grad_norm": 0.25, "lr": 1e-4}]


def test_a_full_disk_is_one_warning_then_retried_and_never_leaves_half_a_line(tmp_path, monkeypatch):
    messages = []
    monitor = TensorBoardMonitor(tmp_path, log=messages.append)
    metrics = tmp_path / "metrics.jsonl"
    real_write = os.write
    full = {"on": False}

    def write(fd, data):
        # The disk fills in the middle of a line: part of it is written, then ENOSPC.
        if full["on"] and fd == monitor._fd:
            real_write(fd, bytes(data[:7]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    monitor.scalars(1, {"loss": 1.0})
    full["on"] = True
    for step in (2, 3, 4):
        monitor.scalars(step, {"loss": float(step)})
    full["on"] = False
    monitor.scalars(5, {"loss": 5.0})
    monitor.close()
    assert [row["step"] for row in strict_rows(metrics)] == [1, 5]
    assert len(messages) == 2, messages
    assert str(metrics) in messages[0] and "ENOSPC" in messages[0] and "step 2" in messages[0]
    assert "written again at step 5" in messages[1] and "3 record(s)" in messages[1]


def test_full_disk_and_broken_outputs_during_training_leave_the_run_going(make_trainer, tmp_path, capsys,
                                                                          monkeypatch):
    """metrics.jsonl on a full disk (/dev/full: every write is ENOSPC), TensorBoard's event file
    failing with EIO, samples/ taken by a file: the run trains to its end and saves its checkpoint;
    each output is one warning line naming it and its error."""
    from tensorboard.summary.writer import record_writer

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    (out / "samples").write_text("not a folder")

    def io_error(*_args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    trainer = make_trainer("data.loader_workers=0", "optim.steps=3", "train.save_interval=3",
                           "train.image_interval=1", "train.image_euler_steps=2", out=out)
    # The event file's disk fails once the run is under way.
    monkeypatch.setattr(record_writer.RecordWriter, "write", io_error)
    monkeypatch.setattr(record_writer.RecordWriter, "flush", io_error)
    thread_errors = []  # a writer thread that died would print its traceback through this hook
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    trainer.train()
    trainer.close()  # again, as pretrain.main does: nothing more to say, nothing raised
    assert trainer.step == 3
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").exists()
    assert thread_errors == []
    lines = train_lines(capsys)
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 3, warnings
    assert any(str(out / "metrics.jsonl") in w and "ENOSPC" in w for w in warnings), warnings
    assert any(str(out / "tensorboard") in w and "EIO" in w for w in warnings), warnings
    assert any(str(out / "samples" / "step_0000001.png") in w and "EEXIST" in w for w in warnings), warnings
    assert sum("step 3/3" in line for line in lines) == 1  # the step lines go on


@pytest.mark.parametrize("taken", ["metrics.jsonl", "tensorboard"])
def test_an_output_taken_at_start_is_one_config_error(make_trainer, tmp_path, taken):
    out = tmp_path / "run"
    out.mkdir()
    if taken == "metrics.jsonl":
        (out / taken).mkdir()
    else:
        (out / taken).write_text("a file where the event files go")
    with pytest.raises(ConfigError) as err:
        make_trainer("data.loader_workers=0", out=out)
    message = str(err.value)
    assert "\n" not in message and str(out / taken) in message and "train.output_dir" in message, message


def test_a_resume_moves_the_abandoned_steps_aside(make_trainer, tmp_path, capsys):
    """A run logged steps 1-3, saved at step 2 and crashed in the middle of a line; the resumed run
    redoes step 3 and goes on. metrics.jsonl then holds each step once, from the continued
    trajectory; the abandoned lines are kept in metrics.abandoned.jsonl, not lost."""
    out = tmp_path / "run"
    first = make_trainer("data.loader_workers=0", "optim.steps=4", "train.save_interval=2", out=out)
    for _ in range(3):
        first.train_step()
        first._after_step(NEVER_STOP)
    first.close()
    metrics = out / "metrics.jsonl"
    abandoned_step_3 = metrics.read_text().splitlines()[-1]
    with open(metrics, "a") as cut_short:
        cut_short.write('{"step": 4, "loss/to')
    capsys.readouterr()

    second = make_trainer("data.loader_workers=0", "optim.steps=4", "train.save_interval=2", out=out)
    assert second.step == 2
    second.train()
    rows = strict_rows(metrics)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    aside = (out / "metrics.abandoned.jsonl").read_text().splitlines()
    assert aside == [abandoned_step_3, '{"step": 4, "loss/to']
    said = [line for line in train_lines(capsys) if "metrics.abandoned.jsonl" in line]
    assert len(said) == 1 and "2 line(s)" in said[0] and "after step 2" in said[0], said


def test_tensorboard_hides_the_abandoned_steps_after_a_resume(make_trainer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    first = make_trainer("data.loader_workers=0", "optim.steps=3", "train.save_interval=1", out=out)
    for _ in range(2):
        first.train_step()
        first._after_step(NEVER_STOP)
    first.close()
    # The run resumes from step 1 (as when the step-2 checkpoint was the one lost in the crash).
    (out / "checkpoints" / "latest").write_text("step_00000001")
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_00000002")
    second = make_trainer("data.loader_workers=0", "optim.steps=3", "train.save_interval=1", out=out)
    second.train()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2, 3]


def test_a_failing_grid_decoder_is_one_line_and_the_run_goes_on(make_trainer, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    trainer = make_trainer("data.loader_workers=0", "optim.steps=2", "train.save_interval=2",
                           "train.image_interval=1", "train.image_euler_steps=2", out=out)

    def broken_decoder(_samples):
        raise RuntimeError("decoder exploded\n[train] step 999/999 loss 0.0000 (forged)")

    monkeypatch.setattr(trainer.sample_grid.sampler, "images", broken_decoder)
    trainer.train()
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    lines = train_lines(capsys)
    failed = [line for line in lines if "sample grid of step" in line]
    assert len(failed) == 2 and all("decoder exploded" in line for line in failed), failed
    # The message's newline is written as an escape: no line passes for a step the run never made.
    assert not any("step 999/999" in line and "decoder" not in line for line in lines), lines
    assert all(line.startswith("[train] ") for line in lines), lines


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGTERM, signal.SIGTERM],
                                     [signal.SIGUSR1, signal.SIGTERM]])
def test_a_stop_during_a_save_takes_that_checkpoint_and_exits(make_trainer, tmp_path, capsys, monkeypatch, signals):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    trainer = make_trainer("data.loader_workers=0", "optim.steps=6", "train.save_interval=2", out=out)
    save = trainer.save

    def save_interrupted():
        for sig in signals:
            os.kill(os.getpid(), sig)  # the real handler, in the middle of the save
        return save()

    monkeypatch.setattr(trainer, "save", save_interrupted)
    trainer.train()
    assert trainer.step == 2  # no further step after the save the request arrived in
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    stops = [line for line in train_lines(capsys) if "stop requested" in line]
    assert stops == [f"[train] stop requested ({signals[-1].name}): saving step_00000002 and exiting "
                     "(saved as the request came)"]
    # Training over, SIGTERM and SIGUSR1 do again what they did before it.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def test_remaining_time_is_the_pace_so_far_times_the_steps_left():
    assert remaining_time(10.0, 4, 6) == "0:00:15"  # 2.5 s a step
    assert remaining_time(3_600.0, 1, 3) == "3:00:00"
    assert remaining_time(100.0, 1, 2_000) == "2d 07:33:20"  # 200,000 s
    assert remaining_time(5.0, 1, 0) == "0:00:00"
    assert remaining_time(0.0, 0, 10) == "?"  # no step yet


def test_the_step_line_says_the_time_left(make_trainer, capsys):
    trainer = make_trainer("data.loader_workers=0", "optim.steps=2", "train.save_interval=2")
    trainer.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] step ")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"]
    assert all(re.search(r" eta \d+:\d\d:\d\d$", line) for line in lines), lines
    assert lines[-1].endswith(" eta 0:00:00")


def test_a_tensorboard_given_up_on_is_closed_for_good(tmp_path, monkeypatch):
    # Before: SummaryWriter.close() stopped at its failing flush, so its thread kept running and its
    # event file stayed open for the rest of the run.
    from tensorboard.summary.writer import record_writer
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    def writers() -> set:
        return {t for t in threading.enumerate() if isinstance(t, _AsyncWriterThread) and t.is_alive()}

    before = writers()
    lines = []
    monitor = TensorBoardMonitor(tmp_path, log=lines.append)
    assert len(writers() - before) == 1

    def no_space(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
    monkeypatch.setattr(record_writer.RecordWriter, "flush", no_space)
    monitor.scalars(1, {"loss/total": 1.0})
    assert writers() - before == set() and monitor.writer is None
    assert len(lines) == 1 and f"cannot write {tmp_path / 'tensorboard'} at step 1 (ENOSPC" in lines[0], lines
    monitor.scalars(2, {"loss/total": 1.0})  # off for the rest of the run: no second line
    monitor.close()
    assert len(lines) == 1 and strict_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss/total": 1.0},
                                                                          {"step": 2, "loss/total": 1.0}]


def test_a_fresh_start_hides_an_earlier_runs_steps_in_tensorboard_too(tmp_path):
    # Before: metrics.jsonl set the earlier run's lines aside, but TensorBoard showed both runs' step 1..3.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    earlier = TensorBoardMonitor(tmp_path, start_step=0, log=lambda line: None)
    for step in (1, 2, 3):
        earlier.scalars(step, {"loss/total": 9.0})
    earlier.close()
    lines = []
    fresh = TensorBoardMonitor(tmp_path, start_step=0, log=lines.append)  # its checkpoints were removed
    fresh.scalars(1, {"loss/total": 1.0})
    fresh.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == [(1, 1.0)]
    assert strict_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss/total": 1.0}] and len(lines) == 1
