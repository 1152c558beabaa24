"""Inputs that are not local files: ``pipe:`` commands and http(s) URLs, as webdataset users write them.

Image-text corpora at scale sit in object storage as thousands of tar shards named by brace ranges
(``laion-{00000..23999}.tar``) and are read through ``pipe:aws s3 cp s3://... -`` or URLs. Brace
ranges and lists are expanded here, as the shell would and in order; ``a::b`` joins two patterns
(webdataset's separator) only where ``b`` starts a new ``pipe:`` or URL, so an IPv6 address or a
``::`` inside a command is left alone. The rest of a command is passed to ``sh`` byte for byte:
backslashes, ``${VAR}`` and shell code with braces (``awk '{print $1, $2}'``) are the shell's business.

A ``pipe:`` command's output is read to its end before its exit status is looked at (webdataset's
``gopen`` raises as soon as the command has exited, dropping output still in the pipe); a non-zero
status is reported as an unreadable remainder, never taken for a short tar. http(s) is read with
urllib (no curl needed); a body shorter than its Content-Length is a failed download, not a short
tar. Only tar inputs (``--*-wds``) may be remote: the other formats need random access to be cut into
chunks.

A stream silent for ``STALL_TIMEOUT_S`` (a hung command, a stalled server) is given up: the records
before it are kept and the rest is one unreadable remainder, so one input cannot hang a build; a
slow stream that keeps sending is never cut. Quick failures that usually pass (5xx, 429, a refused or
reset connection) are retried after ``RETRY_DELAYS_S``.

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
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO, Iterator, List, Optional

STALL_TIMEOUT_S = 120.0  # seconds without a byte (or without an exit, once the output ended)
RETRY_DELAYS_S = (1.0, 4.0)  # waits before the 2nd and 3rd attempt of a request that failed quickly
MAX_NAMES = 1_000_000  # per pattern: a typo such as {0..99999999} must not eat the memory first
_CHUNK = 1 << 16
_STDERR_TAIL = 300


def is_remote(path: str) -> bool:
    return path.startswith(("pipe:", "http://", "https://"))


def _refuse(message: str):
    from .errors import BuildError

    raise BuildError(message)


# ------------------------------------------------------------------------------------ brace expansion


def expand_remote(pattern: str) -> List[str]:
    """``laion-{00000..00099}.tar`` -> 100 names, in order; ``BuildError`` for a pattern that cannot
    be meant (unbalanced braces, a name that is no command or URL, more than ``MAX_NAMES`` names)."""
    names: List[str] = []
    for part in re.split(r"::(?=pipe:|https?://)", pattern):
        _check_braces(part, pattern)
        for name in _expand(part):
            if len(names) == MAX_NAMES:
                _refuse(f"{pattern!r} expands to more than {MAX_NAMES:,} names; check the brace range, "
                        "or split it over several options")
            names.append(name)
    _check_names(names, pattern)
    return names


def _is_brace(text: str, i: int) -> bool:
    """``text[i]`` is a brace that groups (``\\{`` is the shell's literal brace, kept as written)."""
    return text[i] in "{}" and (i == 0 or text[i - 1] != "\\")


def _check_braces(text: str, pattern: str) -> None:
    depth = 0
    for i, c in enumerate(text):
        if _is_brace(text, i):
            depth += 1 if c == "{" else -1
            if depth < 0:
                break
    if depth != 0:
        _refuse(f"{pattern!r} has unbalanced braces; write shard ranges as {{00000..00099}} and lists as {{a,b}}")


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


def _closing(text: str, start: int) -> int:
    """Index of the ``}`` that closes the ``{`` at ``start`` (braces are balanced: checked before)."""
    depth = 0
    for i in range(start, len(text)):
        if _is_brace(text, i):
            depth += 1 if text[i] == "{" else -1
            if depth == 0:
                return i
    raise AssertionError("unbalanced braces")


def _top_level_split(body: str) -> List[str]:
    items, depth, last = [], 0, 0
    for i, c in enumerate(body):
        if _is_brace(body, i):
            depth += 1 if c == "{" else -1
        elif c == "," and depth == 0:
            items.append(body[last:i])
            last = i + 1
    return items + [body[last:]]


_RANGE = re.compile(r"^(?:(-?\d+)\.\.(-?\d+)|([A-Za-z])\.\.([A-Za-z]))(?:\.\.(-?\d+))?$")


def _alternatives(body: str) -> Optional[Iterator[str]]:
    """The expansions of one group's inside, or None when the group is literal: bash's rules - no
    whitespace inside (``awk '{print $1, $2}'`` is shell code), and a range or at least one comma."""
    if re.search(r"\s", body):
        return None
    m = _RANGE.match(body)
    if m:
        first, last, first_letter, last_letter, step = m.groups()
        stride = max(1, abs(int(step or 1)))
        return _numbers(first, last, stride) if first is not None else _letters(first_letter, last_letter, stride)
    items = _top_level_split(body)
    if len(items) < 2:
        return None
    return (name for item in items for name in _expand(item))


def _steps(a: int, b: int, stride: int) -> range:
    return range(a, b + 1, stride) if a <= b else range(a, b - 1, -stride)  # {5..1} counts down, as in bash


def _numbers(first: str, last: str, stride: int) -> Iterator[str]:
    # Zero-padded when an end is written with a leading zero: {00000..00099} keeps 5 digits.
    width = max(len(first), len(last)) if re.match(r"^-?0\d", first) or re.match(r"^-?0\d", last) else 0
    return (str(v).zfill(width) if v >= 0 else "-" + str(-v).zfill(width - 1)
            for v in _steps(int(first), int(last), stride))


def _letters(first: str, last: str, stride: int) -> Iterator[str]:
    return (chr(v) for v in _steps(ord(first), ord(last), stride))


def _expand(text: str) -> Iterator[str]:
    """Every name ``text`` stands for, in order (the first group varies slowest, as in bash)."""
    i = 0
    while True:
        i = text.find("{", i)
        if i < 0:
            yield text
            return
        if not _is_brace(text, i):
            i += 1
            continue
        end = _closing(text, i)
        if i > 0 and text[i - 1] == "$":  # ${VAR}, ${VAR:-a,b}: a shell parameter, not a list
            i = end + 1
            continue
        options = _alternatives(text[i + 1 : end])
        if options is None:  # literal braces; a group inside them may still expand
            i += 1
            continue
        head, tail = text[:i], text[end + 1 :]
        for option in options:
            for rest in _expand(tail):
                yield head + option + rest
        return


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


class _PipeStream(_DeferredErrorStream):
    """stdout of a shell command. At its end a non-zero exit status raises ``OSError``, and so does a
    silence of ``STALL_TIMEOUT_S``; an error is raised at the read after the bytes that preceded it."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        # No stdin (a command that reads it must not wait for a terminal or steal a job's input); a
        # session of its own, so that giving up kills the whole pipeline, not only the shell.
        self.proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, start_new_session=True)
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
        try:
            status = self.proc.wait(timeout=STALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._give_up(_stall_message("the command closed its output but did not exit"))
            return
        if status < 0:
            self.error = OSError(f"command killed by signal {-status}{self._stderr_tail()}")
        elif status != 0:
            self.error = OSError(f"command exited with status {status}{self._stderr_tail()}")

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
    if isinstance(e, urllib.error.HTTPError):
        return e.code in (429, 500, 502, 503, 504)
    if isinstance(e, urllib.error.URLError):
        return isinstance(e.reason, ConnectionError)
    return isinstance(e, ConnectionError)  # includes http.client.RemoteDisconnected


_failed_in_a_row = [0]  # requests that failed after all their retries (in this process)


def _urlopen(request):
    """urlopen, retried after ``RETRY_DELAYS_S`` when it failed quickly in a way that usually passes
    (a timeout is not retried: it has already waited ``STALL_TIMEOUT_S``). After 3 requests in a row
    failed even so, the server is down rather than blinking: no more waits until one succeeds, so an
    outage costs one request per input, not days of back-off over 24000 shards."""
    delays = RETRY_DELAYS_S if _failed_in_a_row[0] < 3 else ()
    for delay in (*delays, None):
        try:
            response = urllib.request.urlopen(request, timeout=STALL_TIMEOUT_S)
        except Exception as e:
            if delay is None or not _transient(e):
                _failed_in_a_row[0] += _transient(e)
                raise
            if isinstance(e, urllib.error.HTTPError):
                e.close()
            time.sleep(delay)
        else:
            _failed_in_a_row[0] = 0
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
