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
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

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
