"""Notices a step that hangs, shows where every thread of this rank is, and ends the process.

A rank that stops (SIGSTOP, a stuck filesystem, a dead node) leaves the others blocked in a
collective. The collective timeout (``train.collective_timeout_minutes``, passed to every process
group) ends waits inside collectives; this watchdog covers the rest (a rank stuck in data loading
or compute, a collective a backend does not time out) and says what happened in words.

A background thread compares the running step's (the trainer's whole iteration: step, metrics,
grid, checkpoint) age with ``factor`` x the median of the recent steps
(at least ``minimum_s``; the first steps, which include start-up and compilation, get
``first_steps_s``). When a step overruns it prints one line naming the step, the limit and what to
do, then the Python stack of every thread of this rank, and exits with ``EXIT_CODE`` so that the
launcher ends the other ranks and the scheduler can requeue: the run resumes from its last
checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from typing import Optional

EXIT_CODE = 75  # EX_TEMPFAIL: try again (a requeue resumes from the last checkpoint)


class StepWatchdog:
    def __init__(self, rank: int, minimum_s: float, factor: float = 10.0, first_steps_s: Optional[float] = None,
                 history: int = 20, poll_s: float = 1.0) -> None:
        self.rank, self.minimum_s, self.factor = rank, minimum_s, factor
        self.first_steps_s = first_steps_s if first_steps_s is not None else 3 * minimum_s
        self.poll_s = poll_s
        self.durations: deque[float] = deque(maxlen=history)
        self._step: Optional[int] = None
        self._started = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def limit(self) -> float:
        """Seconds the running step may take."""
        if len(self.durations) < 3:
            return self.first_steps_s
        return max(self.minimum_s, self.factor * statistics.median(self.durations))

    def step_started(self, step: int) -> None:
        with self._lock:
            self._step, self._started = step, time.monotonic()

    def step_finished(self) -> None:
        with self._lock:
            if self._step is not None:
                self.durations.append(time.monotonic() - self._started)
            self._step = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                step, age, limit = self._step, time.monotonic() - self._started, self.limit()
            if step is not None and age > limit:
                self._fire(step, age, limit)

    def _fire(self, step: int, age: float, limit: float) -> None:
        print(f"[watchdog] rank {self.rank}: step {step + 1} has run {age:.0f}s, over its limit of {limit:.0f}s "
              f"(median of recent steps x {self.factor:g}, at least train.collective_timeout_minutes): another "
              f"rank has probably stopped or a filesystem hangs. Exiting with code {EXIT_CODE} so the job "
              f"can be requeued; it resumes from the last checkpoint. Stacks of this rank's threads:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_CODE)
