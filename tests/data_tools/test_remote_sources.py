"""Tar shards named by brace ranges and read through pipe: commands or http(s), as webdataset users
write them: the same shards as the local files, the same accounting, the same resume rules.
HTTP is served by a local http.server on 127.0.0.1 that each test starts and stops."""

import functools
import glob
import http.server
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from data_tools import remote
from data_tools.cli import main
from data_tools.synthetic import encode, make_image, write_tar
from datacontract.shards import read_manifest
from tests.launch_helpers import REPO, child_env


def _shard_bytes(out):
    return {os.path.relpath(p, out): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*", "*.arrow")))}


@pytest.fixture
def parts(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for p in range(3):
        members = []
        for i in range(3):
            members += [(f"p{p}r{i}.jpg", encode(make_image(40, 30, 10 * p + i))), (f"p{p}r{i}.txt", f"part {p} rec {i}".encode())]
        write_tar(str(d / f"laion-{p:05d}.tar"), members)
    return d


@pytest.fixture
def server(parts):
    handler = functools.partial(QuietHandler, directory=str(parts))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _build(tok, out, *inputs):
    return main(["build", "--tokenizer", tok, "--out", out, "--resolution", "32", "--seq-length", "256",
                 "--workers", "1", "--quiet", "--shard-rows", "2", *inputs])


def test_brace_ranges_through_pipe_and_http_give_the_local_shards(parts, server, tokenizer_dir, tmp_path):
    local = str(tmp_path / "local")
    assert _build(tokenizer_dir, local, "--und-wds", str(parts / "laion-*.tar")) == 0
    reference = _shard_bytes(local)
    piped = str(tmp_path / "piped")
    assert _build(tokenizer_dir, piped, "--und-wds", f"pipe:cat {parts}/laion-{{00000..00002}}.tar") == 0
    assert _shard_bytes(piped) == reference
    web = str(tmp_path / "web")
    assert _build(tokenizer_dir, web, "--und-wds", f"{server}/laion-{{00000..00002}}.tar") == 0
    assert _shard_bytes(web) == reference
    m = read_manifest(web)
    assert [e["path"] for e in m["inputs"]] == [f"{server}/laion-{p:05d}.tar" for p in range(3)]
    assert m["totals"]["records_in"] == m["totals"]["records_written"] == 9


def test_failed_downloads_and_commands_are_accounted_not_fatal(parts, server, tokenizer_dir, tmp_path):
    out = str(tmp_path / "out")
    cut = f"pipe:head -c 7000 {parts}/laion-00001.tar; exit 1"
    assert _build(tokenizer_dir, out, "--und-wds", f"{server}/laion-{{00000..00003}}.tar",  # 00003 is a 404
                  "--gen-wds", cut) == 0
    m = read_manifest(out)
    by = {e["path"]: e for e in m["inputs"]}
    missing = by[f"{server}/laion-00003.tar"]
    assert missing["records_written"] == 0 and missing["rejects_by_reason"] == {"unreadable_archive": 1}
    piped = by[cut]
    assert piped["records_in"] == piped["records_written"] + piped["records_rejected"]
    assert piped["records_written"] >= 1 and "unreadable_archive" in piped["rejects_by_reason"]
    assert m["totals"]["records_in"] == m["totals"]["records_written"] + m["totals"]["records_rejected"]


def test_a_finished_build_refuses_a_changed_url(parts, server, tokenizer_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    urls = f"{server}/laion-{{00000..00001}}.tar"
    assert _build(tokenizer_dir, out, "--und-wds", urls) == 0
    assert _build(tokenizer_dir, out, "--und-wds", urls) == 0
    with open(parts / "laion-00001.tar", "ab") as f:
        f.write(bytes(10240))
    capsys.readouterr()
    assert _build(tokenizer_dir, out, "--und-wds", urls) == 2
    assert "laion-00001.tar" in capsys.readouterr().err


def test_remote_inputs_other_than_tars_are_refused(tokenizer_dir, tmp_path, capsys):
    assert _build(tokenizer_dir, str(tmp_path / "o"), "--text-jsonl", "pipe:cat x.jsonl") == 2
    assert "--text-jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ hostile inputs


def test_patterns_expand_as_the_shell_would_and_typos_are_one_line(tokenizer_dir, tmp_path, capsys, monkeypatch):
    # What the shell must get byte for byte (webdataset's expansion made tracebacks of ${VAR}, dropped
    # backslashes, split awk code at its comma and IPv6 addresses at '::').
    for command in ["pipe:echo ${HOME}", "pipe:printf '%s\\n' x", "pipe:awk '{print $1, $2}' f", "pipe:cat a\\{b,c\\}",
                    "pipe:cat a{b\\,c}", "pipe:cat x.tar | awk 'BEGIN{ OFS=\",\" }{print}'"]:
        assert remote.expand_remote(command) == [command]
    # An escaped comma separates nothing; quotes do not stop expansion (URLs quoted for the shell).
    assert remote.expand_remote("pipe:cat {a\\,b,c}") == ["pipe:cat a\\,b", "pipe:cat c"]
    assert remote.expand_remote("pipe:curl -s 'https://h/a-{0..1}.tar'") == [
        "pipe:curl -s 'https://h/a-0.tar'", "pipe:curl -s 'https://h/a-1.tar'"]
    ipv6 = "http://[::1]:8000/a-{8..10}.tar"
    assert remote.expand_remote(ipv6) == [f"http://[::1]:8000/a-{i}.tar" for i in (8, 9, 10)]
    assert remote.expand_remote("pipe:cat x-{00..01}{a,b}::https://h/y-{1..0}") == [
        "pipe:cat x-00a", "pipe:cat x-00b", "pipe:cat x-01a", "pipe:cat x-01b", "https://h/y-1", "https://h/y-0"]
    monkeypatch.setattr(remote, "MAX_NAMES", 100)
    out = str(tmp_path / "o")
    for pattern, says in [("pipe:cat laion-{00000..00099.tar", "unbalanced braces"),
                          ("http://h/laion-{00000..00100}.tar", "more than 100 names"),
                          ("http://h/laion-{00000-00099}.tar", "brace"),
                          ("http://[::1/x.tar", "not a valid URL"), ("https:///x.tar", "no host"),
                          ("http://h:99999/x.tar", "not a valid URL"), ("pipe:{,}", "empty pipe: command")]:
        assert _build(tokenizer_dir, out, "--und-wds", pattern) == 2, pattern
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and err.startswith("error: "), (pattern, err)
    assert not os.path.exists(out)


def _running(marker: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    return True
        except OSError:
            pass
    return False


@pytest.mark.timeout(60)  # the old reader waited for a hung command forever
def test_a_hung_command_is_given_up_keeping_what_it_wrote(parts, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "STALL_TIMEOUT_S", 3.0)
    tar, mark = parts / "laion-00000.tar", f"{random.randrange(10 ** 6):06d}"  # sleeps of this run only
    stalls = f"pipe:head -c 5120 {tar}; sleep 29.{mark}"  # the first record, then silence
    lingers = f"pipe:cat {tar}; exec >&-; sleep 28.{mark}"  # all of it, but it never exits
    reads_stdin = "pipe:cat"  # must get no input rather than wait for the terminal's (or the job's)
    stdin_read, stdin_write = os.pipe()
    saved_stdin = os.dup(0)
    os.dup2(stdin_read, 0)
    try:
        assert _build(tokenizer_dir, str(tmp_path / "o"), "--und-wds", stalls, "--und-wds", lingers,
                      "--und-wds", reads_stdin) == 0
    finally:
        os.dup2(saved_stdin, 0)
        for fd in (saved_stdin, stdin_read, stdin_write):
            os.close(fd)
    by = {e["path"]: e for e in read_manifest(str(tmp_path / "o"))["inputs"]}
    assert by[stalls]["records_written"] == 1 and by[stalls]["rejects_by_reason"] == {"unreadable_archive": 2}
    assert by[lingers]["records_written"] == 3 and by[lingers]["rejects_by_reason"] == {"unreadable_archive": 1}
    assert by[reads_stdin]["rejects_by_reason"] == {"empty_file": 1}
    rejects = open(tmp_path / "o" / "rejects.jsonl").read()
    assert "the command wrote nothing for 3 s" in rejects and "closed its output but did not exit" in rejects
    assert not _running(f"29.{mark}") and not _running(f"28.{mark}")  # the whole pipeline was stopped


def _eventually(condition, seconds: float = 30.0) -> bool:
    """Polls ``condition`` until it holds; False if it still does not after ``seconds`` (a bound on the
    wait, not a timing claim)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


_OPEN_AND_READ = "import sys\nfrom data_tools.remote import open_remote\nopen_remote(sys.argv[1]).read()\n"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["command", "pipeline"])
def test_a_command_dies_with_the_process_that_read_it_even_by_kill_9(shape):
    # Was: in a session of its own (so that a stall can kill it whole), it outlived its reader - a
    # worker SIGKILLed by the pool on Ctrl-C, or killed by the OOM killer - for as long as it ran.
    mark = f"{random.randrange(10 ** 6):06d}"
    sleeps = [f"300.{mark}"] if shape == "command" else [f"300.{mark}", f"301.{mark}"]
    command = "pipe:" + " | ".join(f"sleep {s}" for s in sleeps)
    reader = subprocess.Popen([sys.executable, "-c", _OPEN_AND_READ, command], cwd=REPO, env=child_env())
    try:
        assert _eventually(lambda: all(_running(f"sleep\0{s}\0") for s in sleeps)), "the command never started"
    finally:
        reader.kill()
        reader.wait()
    assert _eventually(lambda: not any(_running(s) for s in sleeps)), f"{command!r} outlived its reader"


@pytest.mark.timeout(120)
def test_an_interrupted_build_leaves_no_command_running(tokenizer_dir, tmp_path):
    # The reported case: Ctrl-C on a build with --workers 2; the pool SIGKILLs its workers, whose
    # streams are never closed. SIGINT is set to its default in the build, which may have been started
    # from a shell that ignores it (a background job).
    mark = f"{random.randrange(10 ** 6):06d}"
    sleeps = [f"300.{mark}", f"301.{mark}", f"302.{mark}"]
    build = subprocess.Popen(
        [sys.executable, "-m", "data_tools", "build", "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "o"),
         "--resolution", "32", "--seq-length", "256", "--workers", "2", "--quiet",
         "--und-wds", f"pipe:sleep {sleeps[0]} | sleep {sleeps[1]}", "--und-wds", f"pipe:sleep {sleeps[2]}"],
        cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert _eventually(lambda: all(_running(f"sleep\0{s}\0") for s in sleeps)), "the commands never started"
        build.send_signal(signal.SIGINT)
        build.wait(timeout=60)
    finally:
        build.kill()
        build.wait()
    assert _eventually(lambda: not any(_running(s) for s in sleeps)), "a command outlived the build"


def test_a_command_s_group_is_signalled_only_before_its_shell_is_reaped(monkeypatch):
    # Once reaped, the shell's pid - the group's id - may be reused by an unrelated process group.
    signalled = []
    real_killpg = os.killpg

    def killpg(pgid, sig):
        signalled.append(os.path.exists(f"/proc/{pgid}"))  # a zombie, not yet reaped, is still there
        real_killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", killpg)
    mark = f"{random.randrange(10 ** 6):06d}"
    for command, error in [("echo x", None), ("echo x; exit 3", "exited with status 3"),
                           ("echo x; kill -9 $$", "killed by signal 9"),
                           (f"echo x; sleep 300.{mark} >/dev/null &", None),  # left running: killed at the end
                           ("echo x; sleep 30", "closed early")]:
        signalled.clear()
        stream = remote.open_remote(f"pipe:{command}")
        try:
            assert stream.read(2) == b"x\n"
            if error is None:
                assert stream.read() == b""
            elif error != "closed early":
                with pytest.raises(OSError, match=error):
                    stream.read()
        finally:
            stream.close()
        assert signalled and all(signalled), command
    assert _eventually(lambda: not _running(f"300.{mark}"))


class FaultyHandler(QuietHandler):
    """Serves ``parts`` with the fault named by the first path element: /cut/NAME sends half the body
    and closes, /stall/NAME sends half and then nothing, /pause/NAME half, then the rest after 0.5 s,
    /nohead/NAME refuses HEAD (405), /blip/NAME answers the first HEAD with 503."""

    blipped = set()
    release = threading.Event()  # ends the stalled responses at teardown

    def do_HEAD(self):
        fault, _, name = self.path.lstrip("/").partition("/")
        if fault == "nohead" or (fault == "blip" and name not in self.blipped):
            self.blipped.add(name)
            self.send_error(405 if fault == "nohead" else 503)
            return
        self.path = "/" + name
        super().do_HEAD()

    def do_GET(self):
        fault, _, name = self.path.lstrip("/").partition("/")
        self.path = "/" + name
        if fault not in ("cut", "stall", "pause"):
            return super().do_GET()
        data = open(os.path.join(self.directory, name), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        if fault == "stall":
            self.release.wait(30)
        if fault == "pause":
            time.sleep(0.5)
            self.wfile.write(data[len(data) // 2 :])


@pytest.fixture
def faulty(parts):
    FaultyHandler.blipped.clear()
    FaultyHandler.release.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FaultyHandler, directory=str(parts)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    FaultyHandler.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.timeout(60)
def test_a_download_cut_or_stalled_is_a_failed_download_keeping_what_arrived(faulty, tokenizer_dir, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(remote, "STALL_TIMEOUT_S", 3.0)
    cut, stalled = f"{faulty}/cut/laion-00000.tar", f"{faulty}/stall/laion-00001.tar"
    assert _build(tokenizer_dir, str(tmp_path / "o"), "--und-wds", cut, "--und-wds", stalled) == 0
    by = {e["path"]: e for e in read_manifest(str(tmp_path / "o"))["inputs"]}
    for url in (cut, stalled):  # the first record arrived whole; the rest is a failed download, not a short tar
        assert by[url]["records_written"] == 1 and by[url]["rejects_by_reason"] == {"unreadable_archive": 2}, url
    rejects = open(tmp_path / "o" / "rejects.jsonl").read()
    assert "closed after 5120 of 10240 bytes" in rejects and "the server sent nothing for 3 s" in rejects


def test_a_url_that_refuses_head_is_still_fingerprinted(faulty, parts, tokenizer_dir, tmp_path, capsys):
    out, url = str(tmp_path / "o"), f"{faulty}/nohead/laion-00001.tar"
    assert _build(tokenizer_dir, out, "--und-wds", url) == 0
    assert read_manifest(out)["input_fingerprints"][0]["size"] == 10240
    with open(parts / "laion-00001.tar", "ab") as f:
        f.write(bytes(10240))
    capsys.readouterr()
    assert _build(tokenizer_dir, out, "--und-wds", url) == 2  # was: the stale build, accepted
    assert "laion-00001.tar (size 10240 -> 20480)" in capsys.readouterr().err


def test_a_blip_on_head_is_retried_not_fatal_at_the_end(faulty, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.0,))
    monkeypatch.setattr(remote, "_failed_in_a_row", [0])
    out = str(tmp_path / "o")
    # Was: fingerprinted "unreachable", read fine, then refused after all the work as changed.
    assert _build(tokenizer_dir, out, "--und-wds", f"{faulty}/blip/laion-{{00000..00001}}.tar") == 0
    m = read_manifest(out)
    tars = [e for e in m["input_fingerprints"] if e["task"] != -1]  # not the tokenizer's entry
    assert m["totals"]["records_written"] == 6 and len(tars) == 2 and all(e["size"] == 10240 for e in tars)


@pytest.fixture
def black_hole():
    """A port whose connections the kernel accepts (the listen backlog) and nobody ever answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.timeout(60)
def test_a_host_that_never_answers_is_cut_off_after_three_timeouts(black_hole, faulty, monkeypatch):
    # Was: timeouts never counted, so each request to a black-holed host waited STALL_TIMEOUT_S
    # (120 s), for the HEAD and again for the GET of each of thousands of shards.
    monkeypatch.setattr(remote, "STALL_TIMEOUT_S", 0.3)
    monkeypatch.setattr(remote, "DOWN_TIMEOUT_S", 0.05, raising=False)
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.0, 0.0))
    monkeypatch.setattr(remote, "_failed_in_a_row", [0])
    timeouts = []  # one per attempt
    real_urlopen = urllib.request.urlopen

    def urlopen(request, timeout):
        timeouts.append(timeout)
        return real_urlopen(request, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    for i in range(5):
        with pytest.raises(OSError):
            remote.open_remote(f"{black_hole}/laion-{i:05d}.tar")
    assert remote.remote_fingerprint(f"{black_hole}/laion-00005.tar") == {"unreachable": "TimeoutError"}
    assert timeouts == [0.3, 0.3, 0.3, 0.05, 0.05, 0.05]  # never retried; short once the host is down
    # A request that succeeds ends it; its body is read with the usual patience, not the short timeout.
    monkeypatch.setattr(remote, "STALL_TIMEOUT_S", 30.0)
    del timeouts[:]
    stream = remote.open_remote(f"{faulty}/pause/laion-00000.tar")
    try:
        assert len(stream.read()) == 10240
    finally:
        stream.close()
    assert remote.remote_fingerprint(f"{faulty}/ok/laion-00000.tar")["size"] == 10240
    assert timeouts == [0.05, 30.0]
    # Refused connections (retried) count as well.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/x.tar"
    del timeouts[:]
    for _ in range(4):
        with pytest.raises(OSError):
            remote.open_remote(refused)
    assert timeouts == [30.0] * 9 + [0.05]
