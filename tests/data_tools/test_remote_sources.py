"""Tar shards named by brace ranges and read through pipe: commands or http(s), as webdataset users
write them: the same shards as the local files, the same accounting, the same resume rules.
HTTP is served by a local http.server on 127.0.0.1 that each test starts and stops."""

import functools
import glob
import http.server
import os
import threading

import pytest

from data_tools.cli import main
from data_tools.synthetic import encode, make_image, write_tar
from datacontract.shards import read_manifest


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
