"""SQLite's write-ahead log read as bytes, and metadata segments (docs/FORMAT.md 6.2).

Incremental shipping of the SQLite engine (in the spirit of Litestream): the frames committed
to the ``-wal`` file since the last shipped position are read, checked (header, salts and the
cumulative checksum of every frame, as SQLite's own recovery does) and folded into one
*segment*: the newest image of every page changed, and the database size in pages at the last
commit. A metadata snapshot (a full database image) with its segments applied in order is the
database at the last segment's commit.

No SQL here: this module reads the file format (https://sqlite.org/fileformat.html#walformat)
and writes pages into a database file that nothing has open.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

WAL_HEADER = 32
FRAME_HEADER = 24
WAL_MAGIC = 0x377F0682  # | 1: checksums over big-endian words
WAL_VERSION = 3007000
SEGMENT_MAGIC = b"cryptfs-wal-segment-v1\n"
_SEG_HEAD = struct.Struct(">III")  # page size, database size in pages, page count
_MASK = 0xFFFFFFFF
WAL_INDEX_HEADER = 48  # one copy of the wal-index header; the -shm file starts with two
_INDEX = struct.Struct("=IIIBBHII2I8s2I")  # the salts: bytes copied from the log header


@dataclass(frozen=True)
class WalIndex:
    """What SQLite's wal-index header (the start of the ``-shm`` file) says of the log: its
    salts, the number of valid frames, and the cumulative checksum after the last of them."""

    salts: tuple[int, int]
    frames: int
    cksum: tuple[int, int]


def read_wal_index(head: bytes) -> WalIndex | None:
    """Parse the first 96 bytes of a ``-shm`` file (https://sqlite.org/walformat.html: two
    copies of a 48-byte header in native byte order, checksummed). None unless both copies
    are equal, initialised and pass their checksum (a writer in the middle of updating it,
    or no index): then the caller reads the log the long way."""
    if len(head) < 2 * WAL_INDEX_HEADER or head[:WAL_INDEX_HEADER] != \
            head[WAL_INDEX_HEADER:2 * WAL_INDEX_HEADER]:
        return None
    (version, _unused, _change, is_init, _big, _page, mx_frame, _npage, fc1, fc2, salts,
     c1, c2) = _INDEX.unpack_from(head)
    if version != WAL_VERSION or not is_init:
        return None
    if checksum(head[:40], (0, 0), sys.byteorder == "big") != (c1, c2):
        return None
    s1, s2 = struct.unpack(">2I", salts)  # big-endian, as in the log header
    return WalIndex((s1, s2), mx_frame, (fc1, fc2))


class WalError(Exception):
    """The write-ahead log or a segment is not what the format says (one line)."""


@dataclass(frozen=True)
class WalPosition:
    """Where shipping stands: the WAL generation (its salts), the frames shipped of it, and the
    cumulative checksum after the last of them (the next frame's checksum continues it)."""

    salts: tuple[int, int] | None  # None: the log was empty (the next header starts anew)
    frames: int
    cksum: tuple[int, int]


@dataclass
class WalRead:
    """Frames read after a position up to the last commit frame."""

    position: WalPosition
    pages: dict[int, bytes]
    page_size: int
    db_pages: int | None  # the database size at the last commit read (None: no commit)


def checksum(data: bytes, s: tuple[int, int], big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes) continuing from ``s``: for
    each pair of 32-bit words, ``s0 += x0 + s1; s1 += x1 + s0`` (mod 2**32). Sixteen words a
    loop, masked once: the sums are exact integers, so the result is the same."""
    s0, s1 = s
    e = ">" if big_endian else "<"
    head = len(data) - len(data) % 64
    for a, b, c, d, f, g, h, i, j, k, m, n, o, p, q, r in struct.iter_unpack(e + "16I",
                                                                               data[:head]):
        s0 += a + s1
        s1 += b + s0
        s0 += c + s1
        s1 += d + s0
        s0 += f + s1
        s1 += g + s0
        s0 += h + s1
        s1 += i + s0
        s0 += j + s1
        s1 += k + s0
        s0 += m + s1
        s1 += n + s0
        s0 += o + s1
        s1 += p + s0
        s0 = (s0 + q + s1) & _MASK
        s1 = (s1 + r + s0) & _MASK
    for x0, x1 in struct.iter_unpack(e + "II", data[head:]):
        s0 = (s0 + x0 + s1) & _MASK
        s1 = (s1 + x1 + s0) & _MASK
    return s0, s1


def read_wal(pread: Callable[[int, int], bytes], after: WalPosition | None,
             keep_pages: bool = True, index: WalIndex | None = None) -> WalRead | None:
    """Read the committed frames after ``after`` (from the start of the log if ``after`` is
    None or of an earlier generation). ``pread(size, offset)`` reads the ``-wal`` file.
    Returns None if the log is empty (no header yet: every commit is in the database file).
    Frames are read while their salts and checksums hold, as SQLite's recovery does; what
    follows the last commit frame is not part of the result. Raises WalError for a header
    that is not a valid WAL header.

    ``index``: the live wal-index header of this log (:func:`read_wal_index`, read while no
    writer can commit). When it is of the same generation as ``after`` and the frames up to
    its end carry the log's salts, end in a commit frame and the last one's checksum is the
    index's, those frames are taken without computing the checksum of each (SQLite checked
    them as it wrote them): shipping costs reading what changed, not hashing it in Python.
    Otherwise the log is read the long way."""
    hdr = pread(WAL_HEADER, 0)
    if len(hdr) < WAL_HEADER:
        return None
    magic, version, page_size, _ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", hdr)
    if magic & ~1 != WAL_MAGIC or version != WAL_VERSION or page_size < 512 \
            or page_size > 65536 or page_size & (page_size - 1):
        raise WalError("the write-ahead log has no valid header")
    big = bool(magic & 1)
    if checksum(hdr[:24], (0, 0), big) != (c1, c2):
        raise WalError("the write-ahead log header fails its checksum")
    if after is not None and after.salts == (salt1, salt2):
        pos = after
    else:  # a new generation of the log (SQLite restarted it): every frame is new
        pos = WalPosition((salt1, salt2), 0, (c1, c2))
    frame = FRAME_HEADER + page_size
    if index is not None and index.salts == (salt1, salt2) and index.frames >= pos.frames:
        quick = _read_indexed(pread, pos, index, page_size, keep_pages)
        if quick is not None:
            return quick
    pages: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    db_pages: int | None = None
    frames, cksum = pos.frames, pos.cksum
    batch = max(1, (4 << 20) // frame)
    while True:
        buf = pread(batch * frame, WAL_HEADER + frames * frame)
        got = len(buf) // frame
        for i in range(got):
            f = buf[i * frame:(i + 1) * frame]
            pgno, commit, fs1, fs2, fc1, fc2 = struct.unpack_from(">6I", f)
            if (fs1, fs2) != (salt1, salt2) or pgno == 0:
                got = -1
                break
            cksum = checksum(f[:8] + f[FRAME_HEADER:], cksum, big)
            if cksum != (fc1, fc2):
                got = -1
                break
            frames += 1
            if keep_pages:
                pending[pgno] = f[FRAME_HEADER:]
            if commit:
                pages.update(pending)
                pending.clear()
                db_pages = commit
                pos = WalPosition((salt1, salt2), frames, cksum)
        if got < batch:
            break
    return WalRead(pos, pages, page_size, db_pages)


def _read_indexed(pread: Callable[[int, int], bytes], pos: WalPosition, index: WalIndex,
                  page_size: int, keep_pages: bool) -> WalRead | None:
    """The frames after ``pos`` up to the end ``index`` gives (see :func:`read_wal`); None if
    they do not match it."""
    frame = FRAME_HEADER + page_size
    count = index.frames - pos.frames
    if count == 0:
        return WalRead(pos, {}, page_size, None) if index.cksum == pos.cksum else None
    buf = pread(count * frame, WAL_HEADER + pos.frames * frame)
    if len(buf) != count * frame:
        return None
    pages: dict[int, bytes] = {}
    db_pages = 0
    for i in range(count):
        pgno, commit, fs1, fs2 = struct.unpack_from(">4I", buf, i * frame)
        if (fs1, fs2) != index.salts or pgno == 0:
            return None
        if keep_pages:
            pages[pgno] = buf[i * frame + FRAME_HEADER:(i + 1) * frame]
        db_pages = commit
    if not db_pages or struct.unpack_from(">2I", buf, (count - 1) * frame + 16) != index.cksum:
        return None  # not ending in a commit frame, or not the frame the index ends at
    return WalRead(WalPosition(index.salts, index.frames, index.cksum), pages, page_size,
                   db_pages)


def encode_segment(page_size: int, db_pages: int, pages: dict[int, bytes]) -> bytes:
    """A segment's plaintext: magic, header (page size, database size in pages, page count),
    then each page as a 4-byte big-endian page number and its ``page_size`` bytes, in page
    order."""
    out = [SEGMENT_MAGIC, _SEG_HEAD.pack(page_size, db_pages, len(pages))]
    for pgno in sorted(pages):
        out.append(pgno.to_bytes(4, "big"))
        out.append(pages[pgno])
    return b"".join(out)


def db_page_size(header: bytes) -> int:
    """The page size a database header (its first 100 bytes) records."""
    v = int.from_bytes(header[16:18], "big")
    return 65536 if v == 1 else v


def decode_segment(segment: bytes) -> tuple[int, int, dict[int, bytes]]:
    """A segment's page size, database size in pages and pages (page number: bytes). Raises
    WalError (one line) for a malformed segment: bad magic, a length that does not match its
    header, or a page numbered outside the database it describes."""
    head = len(SEGMENT_MAGIC) + _SEG_HEAD.size
    if len(segment) < head or not segment.startswith(SEGMENT_MAGIC):
        raise WalError("it is not a metadata segment")
    page_size, db_pages, count = _SEG_HEAD.unpack_from(segment, len(SEGMENT_MAGIC))
    if len(segment) != head + count * (4 + page_size) or not db_pages:
        raise WalError("its length does not match its header")
    pages: dict[int, bytes] = {}
    view = memoryview(segment)
    at = head
    for _ in range(count):
        pgno = int.from_bytes(view[at:at + 4], "big")
        if not 1 <= pgno <= db_pages:
            raise WalError(f"it names page {pgno} of a {db_pages}-page database")
        pages[pgno] = bytes(view[at + 4:at + 4 + page_size])
        at += 4 + page_size
    return page_size, db_pages, pages


def apply_segment(fd: int, segment: bytes) -> None:
    """Write a segment's pages into the database file open at ``fd`` and cut the file to the
    segment's database size. Raises WalError (one line) for a malformed segment or one whose
    page size differs from the database's."""
    page_size, db_pages, pages = decode_segment(segment)
    if page_size != db_page_size(os.pread(fd, 100, 0)):
        raise WalError("its page size differs from the snapshot's")
    for pgno, page in pages.items():
        os.pwrite(fd, page, (pgno - 1) * page_size)
    os.ftruncate(fd, db_pages * page_size)


@dataclass
class MergedSegments:
    """Segments folded into one: applied to a database, :meth:`segment` leaves it exactly as
    applying the folded segments in order does (the newest image of each page; a page beyond
    a later segment's database size is dropped, as that segment's truncation cut it off, and
    one the database grew back over without writing it is zeros, as the truncation left it).
    Its size is that of the pages changed, however many segments changed them."""

    page_size: int = 0
    db_pages: int = 0
    pages: dict[int, bytes] = field(default_factory=dict)
    cut: int | None = None  # the smallest database size a truncation left, if one did

    @classmethod
    def after(cls, image: bytes) -> MergedSegments:
        """Nothing merged yet, on top of the database ``image`` (a truncation is measured
        from its size)."""
        if len(image) < 100:
            raise WalError("the database image is too short")
        page_size = db_page_size(image[:100])
        return cls(page_size, len(image) // page_size)

    def add(self, segment: bytes) -> None:
        """Fold in the next segment (WalError: malformed, or another page size)."""
        page_size, db_pages, pages = decode_segment(segment)
        if self.page_size and page_size != self.page_size:
            raise WalError("its page size differs from the segments before")
        if db_pages < self.db_pages:
            for pgno in [n for n in self.pages if n > db_pages]:
                del self.pages[pgno]
            self.cut = db_pages if self.cut is None else min(self.cut, db_pages)
        self.page_size, self.db_pages = page_size, db_pages
        self.pages.update(pages)

    def with_segment(self, segment: bytes) -> MergedSegments:
        """A copy with ``segment`` folded in (this one unchanged)."""
        out = MergedSegments(self.page_size, self.db_pages, dict(self.pages), self.cut)
        out.add(segment)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the pages held."""
        return len(self.pages) * self.page_size

    def segment(self) -> bytes:
        """The merged segment."""
        pages = self.pages
        if self.cut is not None and self.cut < self.db_pages:  # grown back over a cut: zeros
            zero = bytes(self.page_size)
            pages = {**{n: zero for n in range(self.cut + 1, self.db_pages + 1)}, **pages}
        return encode_segment(self.page_size, self.db_pages, pages)
