"""When a run should stop: a signal (SIGTERM, SIGUSR1: SLURM's pre-emption warning) or the end of
the ``deepspeed`` command that launched it.

The ``deepspeed`` command (DeepSpeed's runner) starts one launcher per node
(``deepspeed.launcher.launch``), which starts the ranks. On one node the runner has no signal
handler: SIGTERM ends the runner alone, its launcher and the ranks carry on unattended, and no
stop checkpoint is ever written. So each rank started by that launcher watches the runner: when the
launcher's parent changes (the runner is gone and the launcher was re-parented), the rank asks for a
stop exactly as SIGTERM would, the ranks agree at the end of the step, save a checkpoint and exit
cleanly, and the launcher then exits by itself. ``torchrun`` and ``launch.sh`` forward signals to the
ranks themselves and need no watch.

What each signal does:

- SIGTERM, SIGUSR1, once or several times, also during a checkpoint save: the ranks finish the step
  (or the save under way), save once and exit with code 0. A request that arrives during a periodic
  save takes that checkpoint as its own. The handler only records the request: it cannot raise, and
  a second signal only records it again.
- SIGINT (Ctrl-C) is left to Python: ``KeyboardInterrupt`` ends the run at once, without a
  checkpoint (a save it interrupts stays incomplete and is never resumed from; the previous one is).
- Before training starts (building the model, loading the checkpoint) the handlers are not yet
  installed: a signal ends the process as by default; nothing is lost, as nothing was trained.
  When training ends the handlers in place before it are put back (``restore``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional


def _parent_of(pid: int) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the ppid follows the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RunnerWatch:
    """Notices that the ``deepspeed`` runner above this rank's launcher has gone."""

    LAUNCHER = "deepspeed.launcher.launch"

    def __init__(self) -> None:
        self.launcher = os.getppid()
        self.runner = _parent_of(self.launcher) if self.LAUNCHER in _command_line(self.launcher) else None

    @property
    def active(self) -> bool:
        return self.runner is not None

    def runner_gone(self) -> bool:
        return self.active and _parent_of(self.launcher) != self.runner


class StopRequested:
    """SIGTERM / SIGUSR1 / the end of the ``deepspeed`` runner ask for a checkpoint and a clean exit."""

    # Why a rank was asked to stop, as a number the ranks can agree on in one all-reduce (max): a
    # signal reaches the ranks of a multi-node job at different moments, and the rank that logs must
    # still name it when another rank saw it first.
    RUNNER_GONE = 1
    RUNNER_GONE_REASON = "the deepspeed command that launched this run has ended"

    def __init__(self, log=print) -> None:
        self.flag = False
        self.reason = ""
        self._code = 0
        self._log = log
        self._watch = RunnerWatch()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def restore(self) -> None:
        """Put back the handlers in place before: a process that trained in-process (tests, notebooks,
        benchmarks) must end on SIGTERM again afterwards, not record a request nobody reads."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def saving_line(self, tag: str) -> str:
        """The log line of a stop that saves ``tag`` (log readers and launch.sh's tests look for it)."""
        return f"stop requested{' (' + self.reason + ')' if self.reason else ''}: saving {tag} and exiting"

    def _handle(self, signum, _frame) -> None:
        self.flag = True
        self._code = max(self._code, int(signum))
        self.reason = signal.Signals(signum).name

    def agreed(self, comm) -> bool:
        """True on every rank when any rank was asked to stop (all must save together); ``reason``
        then names the request on every rank (of several, the one with the highest code)."""
        if not self.flag and self._watch.runner_gone():
            self.flag, self._code, self.reason = True, self.RUNNER_GONE, self.RUNNER_GONE_REASON
        code = comm.max_int(self._code)
        if code > self.RUNNER_GONE:
            self.reason = signal.Signals(code).name
        elif code == self.RUNNER_GONE:
            self.reason = self.RUNNER_GONE_REASON
        return code > 0
