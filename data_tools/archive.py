"""A tar reader that accounts for every byte: members, or damage it reports and reads past.

``tarfile`` stops at the first bad header or compressed block and says nothing about what followed,
so the records after the damage would vanish. This reader walks the (optionally compressed) stream
itself and yields, in stream order, either a ``TarMember`` or a ``TarDamage`` covering the bytes it
could not read. Every byte of the stream is attributed to exactly one of: a member (header, data,
padding), the end-of-archive zero blocks, or a ``TarDamage`` - so nothing can be lost silently.

Recovery, where the format allows it:
- a corrupt header (bad checksum, garbage): scan forward for the next valid ustar header (magic and
  checksum) and continue from there; the skipped bytes are one ``TarDamage``;
- damaged compressed bytes (gzip, bzip2, xz): the rest of that compressed member is lost; reading
  continues at the next compressed member if one follows (multi-member gzip), then at the next tar
  header in it;
- a stream cut inside a header or inside member data: one ``TarDamage`` with the bytes that were there.

Members larger than ``max_member_bytes`` are skipped without being held in memory (``data=None``,
``too_large=True``).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional, Union

BLOCK = 512
_READ = 1 << 16
_ZERO = bytes(BLOCK)
_MAGICS = ((b"\x1f\x8b\x08", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
FILE, DIRECTORY, LINK, OTHER = "file", "directory", "link", "other"


@dataclass
class TarMember:
    name: str
    kind: str  # FILE, DIRECTORY, LINK (symlink or hardlink) or OTHER (device, fifo, sparse, ...)
    data: Optional[bytes]  # FILE only; None when too large
    offset: int  # stream offset of the header
    size: int
    too_large: bool = False


@dataclass
class TarDamage:
    """Bytes that could not be read as members: ``length`` stream bytes from ``offset`` (plus, for a
    damaged compressed stream, ``compressed_bytes`` skipped in the compressed file)."""

    offset: int
    length: int
    reason: str  # "truncated_archive" (the stream ends inside a member) or "damaged_archive"
    detail: str
    compressed_bytes: int = 0


class StreamDamage(Exception):
    def __init__(self, detail: str, raw_offset: int, raw_skipped: int) -> None:
        super().__init__(detail)
        self.detail, self.raw_offset, self.raw_skipped = detail, raw_offset, raw_skipped


class DecompressedStream:
    """``read(n)`` over the decompressed bytes of ``raw`` (format sniffed from its first bytes).

    On damaged compressed data ``read`` raises ``StreamDamage`` once, having skipped to the next
    compressed member (or to the end); later reads continue from there.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.pending = raw.read(_READ)
        self.raw_pos = 0  # offset in the raw file of pending[0]
        self.kind = next((k for magic, k in _MAGICS if self.pending.startswith(magic)), "none")
        self.magic = next((m for m, k in _MAGICS if k == self.kind), b"")
        self.dec = self._new()
        self.fed = False  # bytes of the current compressed member were fed
        self.failed: Optional[str] = None  # a decompression error to report at the next read

    def _new(self):
        if self.kind == "gzip":
            return zlib.decompressobj(31)
        if self.kind == "bzip2":
            return bz2.BZ2Decompressor()
        if self.kind == "xz":
            return lzma.LZMADecompressor()
        return None

    def _fill(self) -> bool:
        if not self.pending:
            self.pending = self.raw.read(_READ)
        return bool(self.pending)

    def read(self) -> bytes:
        """The next decompressed bytes (b"" at the end)."""
        while True:
            if not self._fill():
                if self.fed:
                    self.fed = False
                    raise StreamDamage(f"{self.kind} stream ends inside a compressed member", self.raw_pos, 0)
                return b""
            if self.dec is None:
                out, self.pending = self.pending, b""
                self.raw_pos += len(out)
                return out
            if self.failed is not None:
                error, self.failed = self.failed, None
                self._resync(error)
            piece = self.pending[:_READ]
            saved = self.dec.copy() if self.kind == "gzip" else None
            try:
                out = self.dec.decompress(piece)
            except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as e:
                if saved is None:
                    self._resync(f"{type(e).__name__}: {e}")
                # Keep what decompresses before the bad byte (for a bad checksum: everything).
                self.failed = f"{type(e).__name__}: {e}"
                good = self._good_prefix(saved, piece)
                self.raw_pos += good
                self.pending = self.pending[good:]
                out = saved.copy().decompress(piece[:good]) if good else b""
                if out:
                    return out
                continue
            self.fed = True
            if self.dec.eof:
                rest = self.dec.unused_data
                self.raw_pos += len(piece) - len(rest)
                self.pending = rest + self.pending[len(piece):]
                self.dec, self.fed = self._new(), False
                stripped = self.pending.lstrip(b"\0")  # zero padding after the last member is allowed
                self.raw_pos += len(self.pending) - len(stripped)
                self.pending = stripped
            else:
                self.raw_pos += len(piece)
                self.pending = self.pending[len(piece):]
            if out:
                return out

    @staticmethod
    def _good_prefix(saved, piece: bytes) -> int:
        """The longest prefix of ``piece`` that ``saved`` (a zlib state) decompresses without error."""
        lo, hi = 0, len(piece) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                saved.copy().decompress(piece[:mid])
                lo = mid
            except zlib.error:
                hi = mid - 1
        return lo

    def _resync(self, detail: str) -> None:
        start = self.raw_pos
        self.pending = self.pending[1:]
        self.raw_pos += 1
        while True:
            i = self.pending.find(self.magic)
            if i >= 0:
                self.raw_pos += i
                self.pending = self.pending[i:]
                break
            keep = len(self.magic) - 1  # a magic split across two reads
            drop = max(0, len(self.pending) - keep)
            self.raw_pos += drop
            tail = self.pending[drop:]
            more = self.raw.read(_READ)
            if not more:
                self.raw_pos += len(tail)
                self.pending = b""
                break
            self.pending = tail + more
        self.dec, self.fed = self._new(), False
        raise StreamDamage(f"damaged {self.kind} data ({detail})", start, self.raw_pos - start)


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256 (GNU) for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 1)) if field[0] & 0x40 else value
    text = field.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def _parse_header(block: bytes) -> Optional[dict]:
    """Fields of a header block, or None if it is not a valid header (checksum, size)."""
    if len(block) < BLOCK or block[:1] == b"\0":
        return None
    try:
        stored = _octal(block[148:156])
        size = _octal(block[124:136])
    except ValueError:
        return None
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed) or size < 0:
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000" and block[345:346] != b"\0":
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return {"name": name, "size": size, "type": block[156:157], "linkname": block[157:257].split(b"\0", 1)[0]}


def _pax_path(data: bytes) -> Optional[bytes]:
    path, pos = None, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value
        pos += max(length, 1)
    return path


class _Buffer:
    """Decompressed bytes with their stream offset; remembers a ``StreamDamage`` met while filling."""

    def __init__(self, stream: DecompressedStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.pos = 0  # stream offset of buf[0]
        self.eof = False
        self.damage: Optional[StreamDamage] = None

    def fill(self, n: int) -> bool:
        while len(self.buf) < n and not self.eof and self.damage is None:
            try:
                chunk = self.stream.read()
            except StreamDamage as d:
                self.damage = d
                break
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
        return len(self.buf) >= n

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.pos += len(out)
        return out


def iter_tar(raw: BinaryIO, max_member_bytes: int = 1 << 30) -> Iterator[Union[TarMember, TarDamage]]:
    """Members and damages of the tar in ``raw`` (plain or compressed), in stream order."""
    b = _Buffer(DecompressedStream(raw))
    long_name: Optional[bytes] = None
    ended = False  # the last block read was a zero block (end-of-archive marker)
    while True:
        if not b.fill(BLOCK):
            if b.damage is not None:
                yield from _resync(b, b.pos, "damaged_archive", "damaged data where a header should start")
                ended = True  # already reported: a missing end marker after damage says nothing new
                continue
            if b.buf.strip(b"\0"):
                n = len(b.buf)
                yield TarDamage(b.pos, n, "truncated_archive", f"the archive ends inside a header ({n} bytes)")
            elif not ended and not b.buf and b.pos > 0:
                # Cut exactly at a member boundary: nothing is visibly broken, but members may be missing.
                yield TarDamage(b.pos, len(b.buf), "truncated_archive",
                                "the archive ends without its end-of-archive marker (cut at a member boundary?)")
            b.take(len(b.buf))
            return
        block = bytes(b.buf[:BLOCK])
        if block == _ZERO:  # end-of-archive marker or padding; a concatenated archive may follow
            b.take(BLOCK)
            ended = True
            continue
        ended = False
        hdr = _parse_header(block)
        if hdr is None:
            yield from _resync(b, b.pos, "damaged_archive", "corrupt member header")
            ended = True
            continue
        start = b.pos
        b.take(BLOCK)
        size, kind = hdr["size"], hdr["type"]
        padded = -(-size // BLOCK) * BLOCK
        if size > max_member_bytes:
            lost = _skip(b, padded)
            name = (long_name or hdr["name"]).decode("utf-8", "replace")
            long_name = None
            if lost is not None:
                yield lost(start, name)
                continue
            yield TarMember(name, FILE if kind in (b"0", b"\0", b"7") else OTHER, None, start, size, too_large=True)
            continue
        if not b.fill(padded):
            name = (long_name or hdr["name"]).decode("utf-8", "replace")
            have = min(len(b.buf), padded)
            b.take(have)
            if b.damage is not None:
                yield from _resync(b, start, "damaged_archive", f"member {name!r} is damaged")
                ended = True
                continue
            yield TarDamage(start, BLOCK + have, "truncated_archive",
                            f"the archive ends inside member {name!r} ({have} of {size} data bytes)")
            return
        data = b.take(padded)[:size]
        if kind in (b"L",):  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0]
            continue
        if kind in (b"K", b"g", b"V"):  # GNU long link name, pax global header, volume label
            continue
        if kind == b"x":
            long_name = _pax_path(data) or long_name
            continue
        name = (long_name or hdr["name"]).decode("utf-8", "replace")
        long_name = None
        if kind in (b"0", b"\0", b"7"):
            yield TarMember(name, FILE, data, start, size)
        elif kind == b"5":
            yield TarMember(name, DIRECTORY, None, start, size)
        elif kind in (b"1", b"2"):
            yield TarMember(name, LINK, None, start, size)
        else:
            yield TarMember(name, OTHER, None, start, size)


def _skip(b: _Buffer, n: int):
    """Consume ``n`` bytes without holding them; on failure a factory for the damage to report."""
    left = n
    while left:
        b.fill(min(left, 1 << 20))
        step = min(left, len(b.buf))
        if step == 0:
            eof = b.damage is None
            return lambda start, name: TarDamage(start, b.pos - start, "truncated_archive" if eof else "damaged_archive",
                                                 f"member {name!r} is cut short")
        b.take(step)
        left -= step
    return None


def _resync(b: _Buffer, start: int, reason: str, why: str) -> Iterator[TarDamage]:
    """Skip to the next valid ustar header; one ``TarDamage`` for everything skipped from ``start``."""
    compressed, details = 0, [why]
    while True:
        if b.damage is not None:
            compressed += b.damage.raw_skipped
            details.append(f"{b.damage.detail}, {b.damage.raw_skipped} compressed bytes skipped at "
                           f"compressed offset {b.damage.raw_offset}")
            b.damage = None
            b.take(len(b.buf))  # what was decompressed before the damage cannot be aligned any more
        b.fill(len(b.buf) + _READ)
        found = -1
        i = b.buf.find(b"ustar", 257)
        while i >= 0 and i - 257 + BLOCK <= len(b.buf):
            # The header at `start` is the bad one (or was consumed): only later candidates count.
            if b.pos + i - 257 > start and _parse_header(bytes(b.buf[i - 257 : i - 257 + BLOCK])) is not None:
                found = i - 257
                break
            i = b.buf.find(b"ustar", i + 1)
        if found >= 0:
            b.take(found)
            break
        if b.damage is not None:
            continue
        if b.eof:
            b.take(len(b.buf))
            break
        b.take(max(0, len(b.buf) - BLOCK))  # keep a tail: a header may straddle two reads
        if not b.fill(len(b.buf) + 1) and b.damage is None:
            b.take(len(b.buf))
            break
    length = b.pos - start
    if length == 0 and compressed == 0:
        return
    yield TarDamage(start, length, reason, "; ".join(details), compressed)


def count_tar_records(path: str) -> Optional[int]:
    """Key groups of a local uncompressed tar, from its headers alone (seeks over member data);
    None when that is not possible (compressed, remote, damaged). Only for progress totals."""
    import os
    import posixpath

    try:
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        keys, last, pos = 0, None, 0
        while pos + BLOCK <= size:
            f.seek(pos)
            block = f.read(BLOCK)
            if block == _ZERO:
                break
            hdr = _parse_header(block)
            if hdr is None:
                return None if pos == 0 else keys
            if hdr["type"] in (b"0", b"\0", b"7"):
                base = posixpath.split(hdr["name"])
                key = posixpath.join(base[0], base[1].partition(b".")[0])
                if key != last:
                    keys, last = keys + 1, key
            pos += BLOCK + -(-hdr["size"] // BLOCK) * BLOCK
        return keys
