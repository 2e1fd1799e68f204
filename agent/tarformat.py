"""The sync stream's framing: a minimal pax tar writer and a strict reader. Every member is one
pax extended header ('x', carrying the real path, size and the CUBE.* records) and one ustar
header, then its data; both are built and parsed here directly, since tarfile's generic code
cost more per member than a small file's data. What the members mean is agent.tarstream's.
"""

from __future__ import annotations

import tarfile

from .manifest import IO_CHUNK
from .patch import read_exact
from .protocol import AgentError


class TarWriter:
    """A minimal pax tar writer onto the output: tarfile's stream mode re-buffers (and copies)
    every byte, which costs more than hashing it. Pieces under PACK bytes (headers, padding,
    small files) are packed into one write; larger chunks go out as they are."""

    PACK = 256 << 10

    def __init__(self, out):
        self.out, self.buf, self.packed = out, bytearray(IO_CHUNK), bytearray()

    def _put(self, data):
        if len(data) >= self.PACK:
            self.flush()
            self.out.write(data)
            return
        self.packed += data
        if len(self.packed) >= self.PACK:
            self.flush()

    def flush(self):
        if self.packed:
            # A new buffer each time, never cleared in place: the output may keep the old one.
            packed, self.packed = self.packed, bytearray()
            self.out.write(packed)

    def addfile(self, info, chunks=()):
        self._put(_header(info))
        sent = 0
        for chunk in chunks:
            self._put(chunk)
            sent += len(chunk)
        if sent != info.size:
            raise AgentError("'%s' changed size while it was being sent." % info.name,
                             "Run the sync again once the file is no longer being written.")
        if sent % tarfile.BLOCKSIZE:
            self._put(tarfile.NUL * (tarfile.BLOCKSIZE - sent % tarfile.BLOCKSIZE))

    def close(self):
        self._put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self.flush()

    def ranges(self, f, spans, chunk=IO_CHUNK):
        """Chunks of the file for (offset, length) spans, read into one reused buffer."""
        view = memoryview(self.buf)
        for offset, length in spans:
            f.seek(offset)
            while length > 0:
                n = f.readinto(view[:min(length, chunk)])
                if not n:
                    return
                yield view[:n]
                length -= n


def _pax_record(key, value):
    """b"<len> key=value\n", len counting the whole record (its own digits too)."""
    body = b" %s=%s\n" % (key.encode("utf-8", "surrogateescape"),
                           value.encode("utf-8", "surrogateescape"))
    n = len(body) + len(b"%d" % (len(body) + 1))
    if len(b"%d" % n) + len(body) != n:   # the length's digits pushed it up a digit
        n += 1
    return b"%d" % n + body


# A ustar header block around its name, size and type: mode 0644, uid/gid/mtime 0, magic
# "ustar", version "00", all else empty. The checksum counts its own field as 8 spaces.
_USTAR_MID = b"0000644\0" + b"0000000\0" * 2
_USTAR_TAIL = b"\0" * 100 + b"ustar\0" + b"00" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
_USTAR_SUM = sum(_USTAR_MID) + sum(b"00000000000\0") + 8 * 32 + sum(_USTAR_TAIL)


def _ustar(name, size, typeflag):
    """One ustar header block. The real path and size travel in the pax header before it."""
    name, size_field = name[:99], b"%011o\0" % size
    checksum = _USTAR_SUM + sum(name) + sum(size_field) + typeflag[0]
    return b"".join([name, b"\0" * (100 - len(name)), _USTAR_MID, size_field,
                     b"00000000000\0", b"%06o\0 " % checksum, typeflag, _USTAR_TAIL])


_PAX_BLOCKS: dict = {}   # record length -> the 'x' header block announcing it


def _header(info):
    """pax extended header + ustar header for a member: what tarfile writes for it, built
    directly (tarfile's generic encoder cost more than the data of a small file)."""
    pax = dict(info.pax_headers, path=info.name, size=str(info.size))
    records = b"".join([_pax_record(k, pax[k]) for k in sorted(pax)])
    name = info.name.encode("utf-8", "surrogateescape")
    block = _PAX_BLOCKS.get(len(records))
    if block is None:
        block = _PAX_BLOCKS[len(records)] = _ustar(b"././@PaxHeader", len(records),
                                                   tarfile.XHDTYPE)
    return b"".join([block, records, tarfile.NUL * (-len(records) % tarfile.BLOCKSIZE),
                     _ustar(name, 0 if info.size >= 8 ** 11 else info.size, tarfile.REGTYPE)])


class Member:
    """One member of a sync stream: its path, data size, pax records and tar type flag
    (tarfile.TarInfo's constructor alone cost more than a small file's data)."""

    __slots__ = ("name", "size", "pax_headers", "type")

    def __init__(self, name, size, pax_headers, type=tarfile.REGTYPE):
        self.name, self.size, self.pax_headers, self.type = name, size, pax_headers, type


class TarReader:
    """Reads a sync stream: per member one pax header ('x') then one ustar header, then data.
    Stricter and far cheaper than tarfile's stream mode (which copies every byte twice more);
    anything else (global headers, GNU long names, ...) surfaces as a refused member type."""

    MAX_PAX = 64 << 20

    def __init__(self, f):
        self.f, self.left, self.pad = f, 0, 0

    def _exact(self, n):
        return read_exact(self.f, n)

    def next(self):
        """The next member's TarInfo (name and size from its pax header), None at the end."""
        while self.left:
            self.read(min(self.left, IO_CHUNK))
        if self.pad:
            self._exact(self.pad)
        block = self._exact(tarfile.BLOCKSIZE)
        if block == tarfile.NUL * tarfile.BLOCKSIZE:
            return None
        (name, kind, size), pax = _ustar_fields(block), {}
        if kind == tarfile.XHDTYPE and 0 <= size <= self.MAX_PAX:
            pax = _parse_pax(self._exact(-(-size // 512) * 512)[:size])
            name, kind, size = _ustar_fields(self._exact(tarfile.BLOCKSIZE))
        member = Member(pax.get("path", name), int(pax.get("size", size)), pax, kind)
        if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.size < 0:
            member.size = 0   # refused by _check_member; never read as data
        self.left, self.pad = member.size, -member.size % tarfile.BLOCKSIZE
        return member

    def take(self, n):
        """Exactly n more bytes of the current member's data (one file of a pack)."""
        if n > self.left:
            raise ValueError("a packed file runs past its member")
        data = read_exact(self.f, n) if n else b""
        self.left -= n
        return data

    def read(self, n=-1):
        """The current member's data, up to n bytes."""
        n = self.left if n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        data = self.f.read(n)
        if not data:
            raise AgentError("The sync stream ended early (connection cut?).",
                             "Run the sync again; it resumes where it stopped.")
        self.left -= len(data)
        return data


def _octal(field):
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _ustar_fields(block):
    """(name, type flag, size) of a ustar header block, its checksum verified. Only what a
    sync stream uses: the real path and size travel in the pax header before it."""
    if _octal(block[148:156]) != sum(block[:148]) + 256 + sum(block[156:]):
        raise ValueError("bad tar header checksum")
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return name, block[156:157], _octal(block[124:136])


def _parse_pax(data):
    """pax records: b"<len> <key>=<value>\n", len counting the whole record."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out

