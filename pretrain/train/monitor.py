"""Logging behind a small interface: TensorBoard on rank 0, a do-nothing stand-in elsewhere.

A run must never end because of its logging: the checkpoints are what matters. Once training has
started, a write that fails (a full disk, an I/O error, a folder replaced by a file) is one warning
line naming the file and the error, and training goes on; see ``TensorBoardMonitor``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # torch itself is imported where an image is logged: preflight reads this module's names
    import torch

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Where a resumed run moves the records of the steps after its checkpoint (see TensorBoardMonitor).
ABANDONED_METRICS_FILE = "metrics.abandoned.jsonl"


def one_line(text: str) -> str:
    """``text`` with its control characters (newlines, carriage returns, terminal escapes, which a
    prompt, a path or an error message may hold) written as escapes such as ``\\n``: one log event
    stays one line and cannot pass for another."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def describe_error(err: BaseException) -> str:
    """``ENOSPC: No space left on device`` for an OS error, ``Type: message`` for anything else."""
    if isinstance(err, OSError) and err.errno is not None:
        return f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror or err}"
    return f"{type(err).__name__}: {err}"


def remaining_time(elapsed_s: float, steps_done: int, steps_left: int) -> str:
    """The time ``steps_left`` more steps take at the pace of the last ``steps_done`` (``elapsed_s``,
    saves and sample grids included), as ``H:MM:SS`` or ``Nd HH:MM:SS``; ``?`` before any step."""
    if steps_done <= 0 or not math.isfinite(elapsed_s):
        return "?"
    seconds = round(elapsed_s / steps_done * steps_left)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}" if days else f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def _json_number(value):
    # json.dumps writes NaN and inf as bare NaN / Infinity, which strict JSON readers (jq, JavaScript,
    # pandas' strict parsers) refuse: the whole file would be unreadable to them.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class NullMonitor:
    # Whether anything logged here is kept: callers skip work whose only use is a log (decoding
    # the sample grid's images) where it is not.
    records = False

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class _Output:
    """One of the monitor's outputs. A write that fails is said once per outage (the first failure:
    one warning line naming the file and the error; later ones are counted silently) and, when the
    output is ``retried``, tried again the next time it is due; the first write that succeeds again
    says how many records were lost. An output that is not retried is off after its first failure
    (``give_up`` releases it)."""

    def __init__(self, path: Path, log: Callable[[str], None], retried: bool,
                 give_up: Optional[Callable[[], None]] = None) -> None:
        self.path, self.log, self.retried, self.give_up = path, log, retried, give_up
        self.off = False
        self.failing_since: Optional[str] = None  # when the current outage began
        self.lost = 0

    def attempt(self, when: str, write: Callable[[], None], path: Optional[Path] = None) -> bool:
        """Run ``write`` (``when``: "at step N", for the messages); False when it failed or the output is off."""
        if self.off:
            return False
        try:
            write()
        # Not only OSError: TensorBoard's writer thread hands on whatever it hit, and a picture that
        # cannot be encoded is no reason to stop training either.
        except Exception as err:
            self.lost += 1
            if self.failing_since is None:
                self.failing_since = when
                after = "tried again each time it is due" if self.retried else "off for the rest of this run"
                self.log(f"warning: cannot write {path or self.path} {when} ({describe_error(err)}): {after}; "
                         "training goes on")
            if not self.retried:
                self.off = True
                if self.give_up is not None:
                    try:
                        self.give_up()
                    except Exception:  # releasing a broken writer may fail the same way: already said
                        pass
            return False
        if self.failing_since is not None:
            self.log(f"{self.path} written again {when}: {self.lost} record(s) since the failure "
                     f"{self.failing_since} were lost")
            self.failing_since, self.lost = None, 0
        return True


class _RecordErrors:
    """Stands in for TensorBoard's record writer inside its background thread: an error there would
    end the thread with a traceback on stderr and come back on every later call. Here it is kept
    (``error``) for the monitor to report as one line, and the thread lives on."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.error: Optional[BaseException] = None

    def write(self, data) -> None:
        try:
            self.inner.write(data)
        except Exception as err:
            self.error = self.error or err

    def flush(self) -> None:
        try:
            self.inner.flush()
        except Exception as err:
            self.error = self.error or err

    def close(self) -> None:
        self.inner.close()


class TensorBoardMonitor(NullMonitor):
    """TensorBoard event files under ``output_dir/tensorboard`` and the same scalars as JSON lines in
    ``output_dir/metrics.jsonl`` (one object per step, appended across resumes: easy to diff).
    Images go to TensorBoard and, for a look without it, to ``output_dir/samples/step_NNNNNNN.png``.

    ``metrics.jsonl``: every line is strict JSON. A value that is not a finite number (a NaN or
    inf loss or gradient norm; a gradient norm that was not measured) is ``null`` there; TensorBoard
    gets the value itself.

    Resumes (``start_step``: the step the run starts or resumes at): a run that went on past its
    last checkpoint before it ended (a crash, a kill) logged steps that the resumed run redoes. At
    start, the records of steps after ``start_step`` (and a damaged line, such as one cut short by
    the crash) are moved, in their order, to the end of ``output_dir/metrics.abandoned.jsonl``, and
    one line says so: ``metrics.jsonl`` holds each step once, from the trajectory that continues.
    TensorBoard is told the same (``purge_step``: it hides the events of those steps). With
    ``start_step=None`` the existing records are left as they are.

    Failures: at start, an output that cannot be opened (``metrics.jsonl`` a folder, ``tensorboard``
    a file, no permission) is one ``ConfigError`` naming it, before training. Afterwards no write
    ends the run: the first failure is one warning line through ``log`` naming the file and the
    error. ``metrics.jsonl`` and the PNGs are tried again each time they are due (a line cut short
    is taken back, so the file stays valid JSON lines) and the first success says how many records
    were lost; TensorBoard is off for the rest of the run after its first failure.
    """

    records = True

    def __init__(self, output_dir: Path, start_step: Optional[int] = None, log: Callable[[str], None] = print) -> None:
        from ..model.config import ConfigError

        self.output_dir = Path(output_dir)
        self.log = log
        self.metrics_path = self.output_dir / METRICS_FILE
        self.writer = None
        self._fd: Optional[int] = None
        self._tb_errors: Optional[_RecordErrors] = None
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if start_step is not None:
                self._set_aside_abandoned(start_step)
            self._fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            # Last: a failed start leaves no TensorBoard writer thread behind.
            self.writer = self._summary_writer(start_step)
        except OSError as err:
            if self._fd is not None:
                os.close(self._fd)
            raise ConfigError(f"train.output_dir: cannot write {err.filename or self.output_dir} "
                              f"({describe_error(err)}); free or fix it, or choose another folder") from None
        self._metrics = _Output(self.metrics_path, log, retried=True)
        self._tensorboard = _Output(self.output_dir / TENSORBOARD_DIR, log, retried=False, give_up=self._drop_writer)
        self._samples = _Output(self.output_dir / "samples", log, retried=True)

    def _summary_writer(self, start_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        # Events of steps after the resumed one are from the abandoned trajectory: TensorBoard hides them.
        purge = start_step + 1 if start_step is not None else None
        writer = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=purge)
        # Its background thread writes the events; keep what it hits (see _RecordErrors). Private
        # attributes of TensorBoard's writer: without them the monitor works the same, only a failure
        # there also prints the thread's traceback.
        worker = getattr(getattr(writer.file_writer.event_writer, "_async_writer", None), "_worker", None)
        if getattr(worker, "_record_writer", None) is not None:
            self._tb_errors = worker._record_writer = _RecordErrors(worker._record_writer)
        return writer

    def _set_aside_abandoned(self, start_step: int) -> None:
        # Only a regular file holds records to sort (a device or a pipe there could be read forever).
        if not self.metrics_path.is_file() or self.metrics_path.is_symlink():
            return
        lines = self.metrics_path.read_bytes().splitlines(keepends=True)
        keep, stale = [], []
        for line in lines:
            try:
                record = json.loads(line)
                current = line.endswith(b"\n") and int(record["step"]) <= start_step
            except (ValueError, TypeError, KeyError):
                current = False  # damaged: not a record at all
            (keep if current else stale).append(line)
        if not stale:
            return
        aside = self.output_dir / ABANDONED_METRICS_FILE
        # The moved lines are safe in the other file before metrics.jsonl is replaced: a crash in
        # between leaves them in both (moved again at the next start), never in neither.
        with open(aside, "ab") as out:
            out.write(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in stale))
            out.flush()
            os.fsync(out.fileno())
        tmp = self.metrics_path.with_name(METRICS_FILE + ".tmp")
        with open(tmp, "wb") as out:
            out.write(b"".join(keep))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.metrics_path)
        self.log(f"{self.metrics_path}: {len(stale)} line(s) of steps after step {start_step} (logged by a run "
                 f"that went on past the checkpoint this one resumes from) or damaged moved to {aside}")

    # ---------------------------------------------------------------------------------------------
    def _tensorboard_flush(self) -> None:
        self.writer.flush()
        if self._tb_errors is not None and self._tb_errors.error is not None:
            raise self._tb_errors.error

    def _drop_writer(self) -> None:
        """Close TensorBoard's writer for good: its thread stopped and its event file closed, also when
        the disk fails; raises the first error its thread met, so that ``attempt`` reports it."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception:
            # SummaryWriter.close() flushes first and stops at a flush that fails (a full disk): its
            # thread would run and its event file stay open for the rest of the run. Private parts of
            # TensorBoard's writer, as in _summary_writer; without them only that clean-up is lost.
            for file_writer in list((writer.all_writers or {}).values()):
                async_writer = getattr(getattr(file_writer, "event_writer", None), "_async_writer", None)
                if async_writer is None or getattr(async_writer, "_closed", True):
                    continue
                async_writer._closed = True
                with contextlib.suppress(Exception):
                    async_writer._worker.stop()  # the thread never dies of a write: _RecordErrors keeps it
                with contextlib.suppress(Exception):
                    async_writer._writer.close()
            raise
        if self._tb_errors is not None and self._tb_errors.error is not None:
            raise self._tb_errors.error

    def _append_line(self, line: bytes) -> None:
        # One line per record, and never half a one: a write cut short (a full disk) is taken back,
        # so the line written at the next try does not run into it.
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
        except BaseException:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise

    def scalars(self, step: int, values: dict[str, float]) -> None:
        def to_tensorboard() -> None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self._tensorboard_flush()

        self._tensorboard.attempt(f"at step {step}", to_tensorboard)
        record = {"step": step, **{name: _json_number(value) for name, value in values.items()}}
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        self._metrics.attempt(f"at step {step}", lambda: self._append_line(line))

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """``image``: [3, H, W] float in [0, 1]. One image per step (the PNG is named by the step)."""
        from ..sample.decode import save_png

        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
        image = image.detach().float().cpu().clamp(0, 1)

        def to_tensorboard() -> None:
            self.writer.add_image(tag, image, step, dataformats="CHW")
            self._tensorboard_flush()

        self._tensorboard.attempt(f"at step {step}", to_tensorboard)
        png = self.output_dir / "samples" / f"step_{step:07d}.png"
        self._samples.attempt(f"at step {step}", lambda: save_png(image[None], [png]), path=png)

    def close(self) -> None:
        """Idempotent; never raises (a failure is one warning line, as during the run)."""
        if self.writer is not None:
            self._tensorboard.attempt("on closing", self._drop_writer)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)  # a network filesystem may report a failed write only here
            except OSError as err:
                self.log(f"warning: closing {self.metrics_path} failed ({describe_error(err)}): "
                         "its last records may be lost")
