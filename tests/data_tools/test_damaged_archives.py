"""Damaged tars lose nothing silently: every record is read or rejected, every unreadable byte range
is reported, and reading resumes after damage wherever the format allows it.

The reference is the undamaged archive: which records a damage may take is derived here from the
member offsets that ``tarfile`` (an independent writer/reader) gives for the clean file.
"""

import bz2
import gzip
import io
import lzma
import os
import tarfile

import pytest

from data_tools.archive import iter_tar
from data_tools.cli import main
from data_tools.sources import Chunk, ReaderOptions, RawRecord, Reject, read_chunk
from data_tools.synthetic import encode, make_image
from data_tools.verify import verify
from datacontract.format import Task
from datacontract.shards import read_manifest

N = 8
IMAGE = encode(make_image(24, 20, 3))
IMAGES = [encode(make_image(24, 20, i)) for i in range(16)]  # distinct: compressed bytes spread evenly


def _tar_bytes(n=N, extra=()):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(n):
            for ext, data in (("jpg", IMAGES[i]), ("txt", f"caption number {i}".encode())):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _offsets(data):
    """name -> (header offset, end of padded data) from tarfile, on the clean archive."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: (m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tf}


def _read(tmp_path, data, name="t.tar", **opts):
    path = tmp_path / name
    path.write_bytes(data)
    chunk = Chunk(0, "wds", Task.UNDERSTANDING, str(path), 0, 0)
    items = list(read_chunk(chunk, ReaderOptions(**opts)))
    written = {r.key for r in items if isinstance(r, RawRecord)}
    rejects = [r for r in items if isinstance(r, Reject)]
    return written, rejects


def _keys(*idx):
    return {f"k{i}" for i in idx}


def test_clean_archive_reads_every_record(tmp_path):
    written, rejects = _read(tmp_path, _tar_bytes())
    assert written == _keys(*range(N)) and rejects == []


@pytest.mark.parametrize("member,field", [("k2.jpg", 130), ("k2.txt", 148), ("k5.jpg", 0), ("k0.jpg", 60)])
def test_corrupt_header_loses_only_its_member(tmp_path, member, field):
    data = _tar_bytes()
    start, end = _offsets(data)[member]
    damaged = bytearray(data)
    damaged[start + field] ^= 0x5A
    written, rejects = _read(tmp_path, bytes(damaged))
    victim = int(member[1])
    assert written == _keys(*(i for i in range(N) if i != victim))
    (loss,) = [r for r in rejects if r.key.startswith("<unreadable")]
    assert f"{end - start} bytes at offset {start}" in loss.detail  # exactly the member's header + data
    assert [r.key for r in rejects if not r.key.startswith("<")] == [f"k{victim}"]
    assert all(r.reason == "damaged_archive" for r in rejects)


def test_garbage_over_several_records_then_recovery(tmp_path):
    data = _tar_bytes()
    off = _offsets(data)
    lo, hi = off["k2.txt"][0] + 100, off["k5.jpg"][0] - 7  # from inside k2.txt's header to just before k5
    damaged = bytearray(data)
    damaged[lo:hi] = os.urandom(hi - lo)
    written, rejects = _read(tmp_path, bytes(damaged))
    assert written == _keys(0, 1, 5, 6, 7)
    # k2 loses its caption (the group ends at the damage), k3 and k4 are inside it.
    assert {r.key for r in rejects} == {"k2", "<unreadable after record 3>"}
    loss = next(r for r in rejects if r.key.startswith("<"))
    assert f"{off['k5.jpg'][0] - off['k2.txt'][0]} bytes at offset {off['k2.txt'][0]}" in loss.detail


@pytest.mark.parametrize("where", ["in_header", "in_data", "at_boundary", "in_end_marker"])
def test_cut_archives_report_the_cut(tmp_path, where):
    data = _tar_bytes()
    off = _offsets(data)
    cut = {"in_header": off["k4.txt"][0] + 200, "in_data": off["k4.jpg"][0] + 700,
           "at_boundary": off["k4.txt"][0], "in_end_marker": off["k7.txt"][1] + 300}[where]
    written, rejects = _read(tmp_path, data[:cut])
    if where == "in_end_marker":  # only zero padding lost: nothing to report
        assert written == _keys(*range(N)) and rejects == []
        return
    assert written == _keys(0, 1, 2, 3)  # k4 lost its caption or image to the cut
    assert rejects and all(r.reason == "truncated_archive" for r in rejects)
    assert rejects[-1].key.startswith("<unreadable after record")


def _gzip_members(data, pieces):
    step = len(data) // pieces // 512 * 512
    return [gzip.compress(data[s : s + step], mtime=0) for s in range(0, len(data), step)]


def test_multi_member_gzip_recovers_after_a_damaged_member(tmp_path):
    data = _tar_bytes()
    parts = _gzip_members(data, 4)
    blob = bytearray(b"".join(parts))
    mid = len(parts[0]) + len(parts[1]) // 2
    blob[mid : mid + 16] = b"\xff" * 16
    written, rejects = _read(tmp_path, bytes(blob), "t.tar.gz")
    # Records wholly inside parts 0, 2, 3 survive; part 1's records are lost and reported.
    step = len(data) // 4 // 512 * 512
    off = _offsets(data)
    lost_range = (step, 2 * step)
    expected = {f"k{i}" for i in range(N)
                if not any(lost_range[0] < off[f"k{i}.{e}"][1] and off[f"k{i}.{e}"][0] < lost_range[1]
                           for e in ("jpg", "txt"))}
    assert expected <= written
    assert any("gzip" in r.detail for r in rejects)
    assert len(written) + len([r for r in rejects if not r.key.startswith("<")]) <= N


@pytest.mark.parametrize("damage", ["flip", "cut", "crc"])
def test_damaged_single_gzip_keeps_what_precedes_the_damage(tmp_path, damage):
    data = _tar_bytes()
    gz = bytearray(gzip.compress(data, mtime=0))
    if damage == "flip":
        gz[len(gz) * 3 // 4] ^= 0xFF
    elif damage == "cut":
        gz = gz[: len(gz) * 3 // 4]
    else:
        gz[-6] ^= 0xFF  # the CRC trailer only: every member decompresses
    written, rejects = _read(tmp_path, bytes(gz), "t.tar.gz")
    assert _keys(0, 1, 2) <= written  # the first part of the stream is intact
    assert rejects and any(r.key.startswith("<unreadable") for r in rejects)
    if damage == "crc":
        assert written == _keys(*range(N))


@pytest.mark.parametrize("codec", [bz2.compress, lzma.compress])
def test_other_compressions_read(tmp_path, codec):
    written, rejects = _read(tmp_path, codec(_tar_bytes()), "t.tar.x")
    assert written == _keys(*range(N)) and rejects == []


def test_long_names_pax_and_special_members(tmp_path):
    long_key = "d" * 60 + "/" + "e" * 70
    fifo = tarfile.TarInfo("pipe.txt")
    fifo.type = tarfile.FIFOTYPE
    sym = tarfile.TarInfo("sym.jpg")
    sym.type, sym.linkname = tarfile.SYMTYPE, "k0.jpg"
    hard = tarfile.TarInfo("hard.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "k0.jpg"
    extra = []
    for name, payload in ((long_key + ".jpg", IMAGE), (long_key + ".txt", b"long")):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        extra.append((info, payload))
    extra += [(sym, None), (tarfile.TarInfo("sym.txt"), b""), (hard, None), (fifo, None)]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for info, payload in extra:
                tf.addfile(info, io.BytesIO(payload) if payload else None)
        written, rejects = _read(tmp_path, buf.getvalue())
        assert written == {long_key}
        assert {r.key: r.reason for r in rejects} == {"sym": "link_member", "hard": "link_member",
                                                     "pipe": "unsupported_member"}


def test_oversized_member_is_rejected_unread(tmp_path):
    written, rejects = _read(tmp_path, _tar_bytes(), max_member_bytes=min(map(len, IMAGES)) - 1)
    assert written == set()
    assert {r.reason for r in rejects} == {"member_too_large"} and len(rejects) == N


def test_iter_tar_attributes_every_byte(tmp_path):
    """members + damages + zero blocks cover the damaged stream exactly (no byte unaccounted)."""
    data = _tar_bytes()
    off = _offsets(data)
    damaged = bytearray(data)
    damaged[off["k3.jpg"][0] + 10] ^= 1
    cut = bytes(damaged[: off["k6.jpg"][0] + 900])
    covered = 0
    for item in iter_tar(io.BytesIO(cut)):
        covered += item.length if hasattr(item, "length") else 512 + -(-item.size // 512) * 512
    assert covered == len(cut)


def test_build_accounts_for_damaged_tars(tmp_path, tokenizer_dir):
    data = _tar_bytes()
    off = _offsets(data)
    bad = bytearray(data)
    bad[off["k1.jpg"][0] + 20] ^= 0x10
    (tmp_path / "a.tar").write_bytes(bytes(bad))
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(data, mtime=0)[:-300])
    (tmp_path / "c.tar").write_bytes(data[: off["k3.txt"][0] + 50])
    out = str(tmp_path / "out")
    assert main(["build", "--tokenizer", tokenizer_dir, "--out", out, "--resolution", "32", "--seq-length", "256",
                 "--workers", "1", "--quiet", "--und-wds", str(tmp_path / "*.tar*")]) == 0
    m = read_manifest(out)
    by = {os.path.basename(e["path"]): e for e in m["inputs"]}
    assert by["a.tar"]["records_written"] == N - 1
    assert by["c.tar"]["records_written"] == 3
    for e in by.values():
        assert e["records_in"] == e["records_written"] + e["records_rejected"] and e["records_rejected"] >= 1
    assert verify(out, decode=False) == []
