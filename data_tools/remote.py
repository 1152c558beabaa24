"""Inputs that are not local files: ``pipe:`` commands and http(s) URLs, as webdataset users write them.

Image-text corpora at scale sit in object storage as thousands of tar shards named by brace ranges
(``laion-{00000..23999}.tar``) and are read through ``pipe:aws s3 cp s3://... -`` or URLs. Brace
ranges are expanded by webdataset's shard-list code. A ``pipe:`` command's output is read to its end
before its exit status is looked at (webdataset's ``gopen`` raises as soon as the command has exited,
dropping output still in the pipe); a non-zero status is reported as an unreadable remainder, never
taken for a short tar. http(s) is read with urllib (no curl needed). Only tar inputs (``--*-wds``)
may be remote: the other formats need random access to be cut into chunks.

Fingerprints (resume rules, see ``state.py``): an http(s) input is identified by the Content-Length,
ETag and Last-Modified of a HEAD request; a ``pipe:`` input by its command only - what a command
yields cannot be checked without running it, so changing the data behind an unchanged command
between an interruption and the resume is not detected.
"""

from __future__ import annotations

import subprocess
import tempfile
import urllib.request
from typing import BinaryIO, List

_TIMEOUT_S = 120


def is_remote(path: str) -> bool:
    return path.startswith(("pipe:", "http://", "https://"))


def expand_remote(pattern: str) -> List[str]:
    """``laion-{00000..00099}.tar`` -> 100 names, in order (webdataset's brace expansion)."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


class _PipeStream:
    """stdout of a shell command; at its end, a non-zero exit status raises ``OSError``."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr)
        self.checked = False

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and not self.checked:
            self.checked = True
            status = self.proc.wait()
            if status != 0:
                self.stderr.seek(0)
                tail = self.stderr.read()[-300:].decode("utf-8", "replace").strip()
                raise OSError(f"command exited with status {status}" + (f": {tail}" if tail else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


def open_remote(path: str) -> BinaryIO:
    if path.startswith("pipe:"):
        return _PipeStream(path[len("pipe:"):])
    return urllib.request.urlopen(path, timeout=_TIMEOUT_S)


def remote_fingerprint(path: str) -> dict:
    if path.startswith("pipe:"):
        return {"command": path[len("pipe:"):]}
    request = urllib.request.Request(path, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as r:
            headers = r.headers
            return {"size": int(headers["Content-Length"]) if headers.get("Content-Length") else None,
                    "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}
    except Exception as e:  # unreachable now: the reader reports it as an unreadable input
        return {"unreachable": f"{type(e).__name__}"}
