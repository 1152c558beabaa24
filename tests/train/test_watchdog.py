"""The step watchdog's limit follows the recent steps, and an overrun step ends the process with a
clear line and every thread's stack (in a child process: it calls os._exit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pretrain.train.watchdog import EXIT_CODE, StepWatchdog
from tests.launch_helpers import REPO, child_env


def test_the_limit_is_the_first_steps_allowance_then_a_multiple_of_the_median():
    dog = StepWatchdog(rank=0, minimum_s=2.0, factor=10.0, first_steps_s=30.0, poll_s=60)
    try:
        assert dog.limit() == 30.0
        for seconds in (0.5, 0.1, 0.3):
            dog.durations.append(seconds)
        assert dog.limit() == 3.0  # 10 x median 0.3
        dog.durations.extend([0.01] * 10)
        assert dog.limit() == 2.0  # never below the minimum
    finally:
        dog.close()


def test_a_hung_step_ends_the_process_with_its_stacks():
    script = textwrap.dedent("""
        import time
        from pretrain.train.watchdog import StepWatchdog
        dog = StepWatchdog(rank=3, minimum_s=0.2, factor=10, first_steps_s=0.2, poll_s=0.05)
        dog.step_started(41)
        def stuck_in_a_collective():
            time.sleep(30)
        stuck_in_a_collective()
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == EXIT_CODE
    assert "not reached" not in proc.stdout
    assert "[watchdog] rank 3: step 42 has run" in proc.stderr
    assert "stuck_in_a_collective" in proc.stderr  # the stack of the main thread
