"""A small process pool that notices dead workers.

``multiprocessing.Pool`` waits forever for the result of a worker that was SIGKILLed (the OOM
killer, an operator): the build hangs at 0 % CPU. Here every worker holds one unit at a time over
its own pipe, so the parent knows which unit a dead worker held: that unit is given to a fresh
worker, at most ``max_attempts`` times in all, after which the build fails naming the unit.

Units are idempotent (written under temporary names, renamed, then marked done), so redoing one
gives the same bytes. A worker dies with its parent (``PR_SET_PDEATHSIG``), so a killed build leaves
no orphan writing into ``--out``.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, List, Optional, Sequence


class UnitFailed(SystemExit):
    """A unit that raised, or that killed its worker ``max_attempts`` times: one line for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
        self.message = message


class _PipeReporter:
    """Stands in for a queue: ``put(n)`` sends progress to the parent."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def put(self, n: int) -> None:
        self.conn.send(("progress", n))


@functools.lru_cache(maxsize=None)
def libc_prctl() -> Optional[Callable]:
    """libc's prctl (None off Linux). Called once before forking where a child will use it: a child
    forked from a threaded process must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent (strictly: the parent's thread
    that started it) dies (``PR_SET_PDEATHSIG``); False where that cannot be asked."""
    prctl = libc_prctl()
    if prctl is None:
        return False
    prctl(1, int(sig))  # PR_SET_PDEATHSIG
    return True


def _worker_main(conn, fn, init, initargs, close_fds) -> None:
    set_parent_death_signal(signal.SIGKILL)
    for fd in close_fds:  # e.g. the --out lock: only the parent may hold it
        try:
            os.close(fd)
        except OSError:
            pass
    init(*initargs, _PipeReporter(conn))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, unit = msg
        try:
            result = fn(unit)
        except BaseException as e:  # reported, not raised: the parent decides
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            conn.send(("error", index, last))
            continue
        conn.send(("done", index, result))


def _exit_text(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def run_units(fn: Callable, units: Sequence, workers: int, init: Callable, initargs: tuple,
              on_progress: Callable[[int], None], describe: Callable[[object], str],
              start_method: str = "fork", max_attempts: int = 3, close_fds: Sequence[int] = ()) -> List:
    """``[fn(u) for u in units]`` in ``workers`` processes, results in unit order.

    ``init(*initargs, reporter)`` runs once per worker; ``fn`` reports progress through the reporter.
    Raises ``UnitFailed`` when a unit raises or keeps killing its worker.
    """
    ctx = mp.get_context(start_method)
    results: List = [None] * len(units)
    todo = deque(range(len(units)))
    attempts = [0] * len(units)
    busy = {}  # conn -> (process, unit index or None)
    remaining = len(units)

    def spawn():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, fn, init, initargs, tuple(close_fds)), daemon=True)
        proc.start()
        child.close()
        busy[parent] = (proc, None)

    def stop_all():
        for conn, (proc, _) in list(busy.items()):
            proc.kill()
            proc.join()
            conn.close()
        busy.clear()

    try:
        while remaining:
            while len(busy) < min(workers, remaining):
                spawn()
            for conn, (proc, index) in list(busy.items()):
                if index is None and todo:
                    i = todo.popleft()
                    try:
                        conn.send((i, units[i]))
                    except OSError:  # the worker died while idle: the unit never reached it
                        todo.appendleft(i)
                        proc.kill()
                        proc.join()
                        del busy[conn]
                        conn.close()
                        continue
                    attempts[i] += 1
                    busy[conn] = (proc, i)
            sentinels = {proc.sentinel: conn for conn, (proc, _) in busy.items()}
            ready = wait(list(busy) + list(sentinels), timeout=5.0)
            dead = set()
            for r in ready:
                conn = sentinels.get(r, r)
                if conn in dead or conn not in busy:
                    continue
                proc, index = busy[conn]
                try:
                    while conn.poll():
                        kind, *payload = conn.recv()
                        if kind == "progress":
                            on_progress(payload[0])
                        elif kind == "done":
                            results[payload[0]] = payload[1]
                            remaining -= 1
                            busy[conn] = (proc, None)
                            index = None
                        else:
                            raise UnitFailed(f"{describe(units[payload[0]])} failed: {payload[1]}")
                except (EOFError, OSError):
                    pass
                if not proc.is_alive() or r is proc.sentinel:
                    proc.join()
                    dead.add(conn)
                    del busy[conn]
                    conn.close()
                    if index is not None:
                        if attempts[index] >= max_attempts:
                            raise UnitFailed(
                                f"{describe(units[index])} killed its worker {attempts[index]} times "
                                f"(last: {_exit_text(proc.exitcode)}); out of memory? Lower --workers, or "
                                "remove the input, then re-run (finished work is kept)")
                        print(f"warning: a worker died ({_exit_text(proc.exitcode)}) on {describe(units[index])}; "
                              f"retrying ({attempts[index]}/{max_attempts})", file=sys.stderr, flush=True)
                        todo.appendleft(index)
        for conn in list(busy):
            try:
                conn.send(None)
            except OSError:
                pass
        for conn, (proc, _) in list(busy.items()):
            proc.join(timeout=5)
            conn.close()
        busy.clear()
    finally:
        stop_all()
    return results
