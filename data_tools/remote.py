"""Inputs that are not local files: ``pipe:`` commands and http(s) URLs, as webdataset users write them.

Image-text corpora at scale sit in object storage as thousands of tar shards named by brace ranges
(``laion-{00000..23999}.tar``) and are read through ``pipe:aws s3 cp s3://... -`` or URLs. Brace
ranges and lists are expanded as bash would, in order (``brace_patterns``); ``a::b`` joins two
patterns (webdataset's separator) only where ``b`` starts a new ``pipe:`` or URL, so an IPv6 address
or a ``::`` inside a command is left alone. Braces are expanded in the whole command, quotes included
(``pipe:curl -s 'https://h/a-{0..9}.tar'`` is ten commands, as in webdataset): a group is left to the
shell only when it holds whitespace (``awk '{print $1, $2}'``), holds no comma and no range
(``{print}``), is a ``${VAR}``, or is escaped (``\\{``, ``\\,``). So shell code with a comma in braces
and no space must be written otherwise: ``awk 'BEGIN{ OFS="," }'``, not ``awk 'BEGIN{OFS=","}'``.
What expansion leaves reaches ``sh`` byte for byte (backslashes included, for the shell to remove).

A ``pipe:`` command's output is read to its end before its exit status is looked at (webdataset's
``gopen`` raises as soon as the command has exited, dropping output still in the pipe); a non-zero
status is reported as an unreadable remainder, never taken for a short tar. A command runs in a
process group of its own that dies with the process that started it, however that one dies (a
Ctrl-C, kill -9, a worker killed by the pool): no pipeline outlives the build. http(s) is read with
urllib (no curl needed); a body shorter than its Content-Length is a failed download, not a short
tar. Only tar inputs (``--*-wds``) may be remote: the other formats need random access to be cut into
chunks.

A stream silent for ``STALL_TIMEOUT_S`` (a hung command, a stalled server) is given up: the records
before it are kept and the rest is one unreadable remainder, so one input cannot hang a build; a
slow stream that keeps sending is never cut. A request that fails quickly in a way that usually
passes (HTTP 429, 500, 502, 503 or 504, a refused or reset connection) is retried after
``RETRY_DELAYS_S``; a timeout is not (it has already waited). After ``CUTOFF_FAILURES`` requests in a
row failed in one of these ways (retries and timeouts included), the remote side is taken for down:
no more retries, and ``DOWN_TIMEOUT_S`` instead of ``STALL_TIMEOUT_S`` to connect and get the response
headers, until a request succeeds - so an outage or a black-holed host costs seconds per input, not
minutes over 24000 shards. These counts are per process (each worker has its own), not per host:
inputs that alternate between a down host and a healthy one keep the full retries and timeouts.

Fingerprints (resume rules, see ``state.py``): an http(s) input is identified by the Content-Length,
ETag and Last-Modified of a HEAD request (of a GET whose body is not read, where HEAD is refused, as
by presigned URLs); a ``pipe:`` input by its command only - what a command yields cannot be checked
without running it, so changing the data behind an unchanged command between an interruption and
the resume is not detected, nor is it for a server that sends none of the three headers.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO, List, Optional

from .brace_patterns import balanced, expand
from .workers import libc_prctl, set_parent_death_signal

STALL_TIMEOUT_S = 120.0  # seconds without a byte (or without an exit, once the output ended)
RETRY_DELAYS_S = (1.0, 4.0)  # waits before the 2nd and 3rd attempt of a request that failed quickly
CUTOFF_FAILURES = 3  # failed requests in a row after which a host is taken for down
DOWN_TIMEOUT_S = 10.0  # to connect and get the headers while a host is taken for down
MAX_NAMES = 1_000_000  # per pattern: a typo such as {0..99999999} must not eat the memory first
_CHUNK = 1 << 16
_STDERR_TAIL = 300


def is_remote(path: str) -> bool:
    return path.startswith(("pipe:", "http://", "https://"))


def _refuse(message: str):
    from .errors import BuildError

    raise BuildError(message)


# ------------------------------------------------------------------------------------ patterns


def expand_remote(pattern: str) -> List[str]:
    """``laion-{00000..00099}.tar`` -> 100 names, in order; ``BuildError`` for a pattern that cannot
    be meant (unbalanced braces, a name that is no command or URL, more than ``MAX_NAMES`` names)."""
    names: List[str] = []
    for part in re.split(r"::(?=pipe:|https?://)", pattern):
        if not balanced(part):
            _refuse(f"{pattern!r} has unbalanced braces; write shard ranges as {{00000..00099}} and lists as "
                    "{a,b}")
        for name in expand(part):
            if len(names) == MAX_NAMES:
                _refuse(f"{pattern!r} expands to more than {MAX_NAMES:,} names; check the brace range, "
                        "or split it over several options")
            names.append(name)
    _check_names(names, pattern)
    return names


def _check_names(names: List[str], pattern: str) -> None:
    hosts_seen = set()  # a million shards name a handful of hosts: parse each host once
    for name in names:
        where = f"{name!r}" if name == pattern else f"{name!r} (from {pattern!r})"
        if name.startswith("pipe:"):
            if not name[len("pipe:"):].strip():
                _refuse(f"{where}: empty pipe: command")
            continue
        if not is_remote(name):
            _refuse(f"{where} is neither a pipe: command nor an http(s) URL; give local files separately")
        bad = re.search(r"[\s{}]", name)
        if bad:
            what = "whitespace" if bad.group().isspace() else \
                "a brace that is not a range {00000..00099} or a list {a,b}"
            _refuse(f"{where} is not a valid URL: it holds {what}; percent-encode it or fix the pattern")
        host = re.split(r"[/?#]", name.split("://", 1)[1], maxsplit=1)[0]
        if host not in hosts_seen:
            try:
                parts = urllib.parse.urlsplit(f"http://{host}/")
                if not parts.hostname:
                    raise ValueError("no host")
                parts.port  # raises for a port that is no number or out of range
            except ValueError as e:
                _refuse(f"{where} is not a valid URL ({e})")
            hosts_seen.add(host)


# ------------------------------------------------------------------------------------ streams


def _stall_message(what: str) -> str:
    return f"{what} for {STALL_TIMEOUT_S:g} s; gave up on it (hung?)"


class _DeferredErrorStream:
    """A stream whose failure is raised at the read after the bytes that preceded it, so that a tar
    reader keeps every record that arrived whole before a stall or a cut."""

    error: Optional[Exception] = None

    def _handed_over(self, chunks: List[bytes]) -> bytes:
        if chunks:
            return b"".join(chunks)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return b""


# The command runs under a watchdog shell that leads a process group (a session) of its own, so that
# giving up kills the whole pipeline (killpg), not only a shell. Out of the build's group, it gets
# neither a terminal's Ctrl-C nor any signal the build gets, and would outlive a killed build: so the
# kernel sends the watchdog SIGTERM when the process that started it dies, however it dies
# (PR_SET_PDEATHSIG), and its trap kills the whole group. The command is a positional argument
# (nothing to quote) and runs in the background so that the trap runs at once, not after it (a
# background job starts with SIGINT ignored: no matter, none comes); ``wait`` returns its status,
# 128+n for a signal n. The watchdog sends its own stdout to /dev/null, so that the end of the output
# still means that the command closed it.
_WATCHDOG = 'trap "kill -KILL 0" TERM; /bin/sh -c "$1" & exec >/dev/null; wait $!'


def _dying_with_this_process():
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (strictly: when the
    thread that starts it ends; the build's readers run on their process's main thread)."""
    if libc_prctl() is None:  # looked up here, in the parent (see libc_prctl)
        return None
    parent = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:  # died before the prctl: no signal will come
            os._exit(1)

    return preexec


def _exit_message(status: int) -> str:
    # sh reports a command killed by signal n as status 128+n; the watchdog itself killed reads as -n.
    n = -status if status < 0 else status - 128 if status > 128 else 0
    name = {s.value: s.name for s in signal.Signals}.get(n)
    return f"command killed by signal {n} ({name})" if name else f"command exited with status {status}"


class _PipeStream(_DeferredErrorStream):
    """stdout of a shell command. At its end a non-zero exit status raises ``OSError``, and so does a
    silence of ``STALL_TIMEOUT_S``; an error is raised at the read after the bytes that preceded it."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        # No stdin: a command that reads it must not wait for a terminal or steal a job's input.
        self.proc = subprocess.Popen(["/bin/sh", "-c", _WATCHDOG, "sh", command], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True,
                                     preexec_fn=_dying_with_this_process())
        self.poller = select.poll()
        self.poller.register(self.proc.stdout.fileno(), select.POLLIN)
        self.done = False
        self.closed = False
        self.error: Optional[OSError] = None

    def read(self, n: int = -1) -> bytes:
        chunks, have = [], 0
        while not self.done and (n < 0 or have < n):
            if not self.poller.poll(STALL_TIMEOUT_S * 1000):
                self._give_up(_stall_message("the command wrote nothing"))
                break
            data = os.read(self.proc.stdout.fileno(), _CHUNK if n < 0 else min(n - have, _CHUNK))
            if not data:
                self._check_exit()
                break
            chunks.append(data)
            have += len(data)
        return self._handed_over(chunks)

    def _check_exit(self) -> None:
        self.done = True
        if not self._exited_within(STALL_TIMEOUT_S):
            self._give_up(_stall_message("the command closed its output but did not exit"))
            return
        self._kill()  # what the command left running in the background
        if self.proc.returncode != 0:
            self.error = OSError(_exit_message(self.proc.returncode) + self._stderr_tail())

    def _exited_within(self, timeout: float) -> bool:
        """Whether the watchdog exited within ``timeout`` s, leaving it unreaped (see ``_kill``)."""
        deadline, pause = time.monotonic() + timeout, 0.001
        while True:
            try:
                if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored?): Popen records it as gone
                self.proc.wait()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(2 * pause, 0.05)

    def _give_up(self, message: str) -> None:
        self.done = True
        self._kill()
        self.error = OSError(message + self._stderr_tail())

    def _stderr_tail(self) -> str:
        # Only the end is read: a command may have written gigabytes of progress to stderr.
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - _STDERR_TAIL))
        tail = " ".join(self.stderr.read().decode("utf-8", "replace").split())
        return f": {tail}" if tail else ""

    def _kill(self) -> None:
        """SIGKILL the command's whole process group, then reap the watchdog - in that order: until it
        is reaped, the watchdog's pid (the group's id) cannot be reused, and name another group."""
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._kill()  # also a background job that still holds the pipe open
        self.proc.stdout.close()
        self.stderr.close()


def _transient(e: Exception) -> bool:
    """A quick failure that usually passes: retried."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in (429, 500, 502, 503, 504)
    if isinstance(e, urllib.error.URLError):
        return isinstance(e.reason, ConnectionError)
    return isinstance(e, ConnectionError)  # includes http.client.RemoteDisconnected


def _no_answer(e: Exception) -> bool:
    """A timeout, to connect (``URLError``) or for the headers (raised bare): not retried, but counted."""
    if isinstance(e, urllib.error.HTTPError):
        return False
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    return isinstance(reason, (TimeoutError, socket.timeout))


_failed_in_a_row = [0]  # requests that failed in a row, after their retries (in this process)


def _urlopen(request):
    """urlopen, retried after ``RETRY_DELAYS_S`` when it failed in a ``_transient`` way; while the host
    is taken for down (``CUTOFF_FAILURES``, see the module's docstring), tried once, with
    ``DOWN_TIMEOUT_S``."""
    down = _failed_in_a_row[0] >= CUTOFF_FAILURES
    timeout, delays = (DOWN_TIMEOUT_S, ()) if down else (STALL_TIMEOUT_S, tuple(RETRY_DELAYS_S))
    for delay in (*delays, None):
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except Exception as e:
            if delay is None or not _transient(e):
                _failed_in_a_row[0] += _transient(e) or _no_answer(e)
                raise
            if isinstance(e, urllib.error.HTTPError):
                e.close()
            time.sleep(delay)
        else:
            _failed_in_a_row[0] = 0
            if timeout != STALL_TIMEOUT_S:  # the body is read with the usual patience
                sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # no public handle
                if sock is not None:
                    sock.settimeout(STALL_TIMEOUT_S)
            return response


def _content_length(headers) -> Optional[int]:
    value = (headers.get("Content-Length") or "").strip()
    return int(value) if value.isdigit() else None


class _HttpStream(_DeferredErrorStream):
    """The body of a GET. ``read(n)`` returns what arrived instead of waiting for all ``n`` bytes when
    the connection fails, so the records before a stall or a cut are kept; the failure (a timeout, a
    body shorter than its Content-Length) is raised at the next read."""

    def __init__(self, url: str) -> None:
        self.response = _urlopen(url)
        self.expected = _content_length(self.response.headers)
        self.received = 0
        self.done = False
        self.error: Optional[Exception] = None

    def read(self, n: int = -1) -> bytes:
        chunks, have = [], 0
        while not self.done and (n < 0 or have < n):
            try:
                data = self.response.read1(_CHUNK if n < 0 else n - have)
            except (OSError, http.client.HTTPException) as e:  # a timeout, a reset, a cut chunk
                why = _stall_message("the server sent nothing") if isinstance(e, TimeoutError) else \
                    f"{type(e).__name__}: {e}"
                self.done, self.error = True, OSError(f"download failed after {self.received} bytes: {why}")
                break
            if not data:
                self.done = True
                if self.expected is not None and self.received < self.expected:
                    self.error = OSError(f"the connection closed after {self.received} of {self.expected} "
                                         "bytes (Content-Length)")
                break
            self.received += len(data)
            chunks.append(data)
            have += len(data)
        return self._handed_over(chunks)

    def close(self) -> None:
        self.response.close()


def open_remote(path: str) -> BinaryIO:
    if path.startswith("pipe:"):
        return _PipeStream(path[len("pipe:"):])
    return _HttpStream(path)


def remote_fingerprint(path: str) -> dict:
    if path.startswith("pipe:"):
        return {"command": path[len("pipe:"):]}
    try:
        try:
            response = _urlopen(urllib.request.Request(path, method="HEAD"))
        except urllib.error.HTTPError as e:
            if e.code in (404, 410) or _transient(e):
                raise
            # HEAD refused (405, 501, or 403 from a URL presigned for GET only): the headers of a GET
            # whose body is not read.
            response = _urlopen(path)
        with response:
            headers = response.headers
            return {"size": _content_length(headers), "etag": headers.get("ETag"),
                    "last_modified": headers.get("Last-Modified")}
    except Exception as e:  # unreachable now: the reader reports it as an unreadable input
        return {"unreachable": f"{type(e).__name__}"}
