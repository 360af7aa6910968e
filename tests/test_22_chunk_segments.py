"""Chunk objects of version 2 (docs/FORMAT.md section 4): segments sealed one by one, read by
byte range. At the codec: a range returns exactly the bytes asked at every segment boundary; a
byte flipped in one segment fails the reads touching it and nothing else; a truncated object,
reordered segments and a dropped last segment are detected. Through the chunk store on a local
store (real files) and on S3 (the moto server): a random read fetches only the segments it
needs (a range read of the store), caches nothing, and a version 1 object still reads."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.errors import IntegrityError
from cryptfs.format import crypto
from cryptfs.format.codec import SEGMENT_SIZE, ChunkRef, Codec, segmented_layout
from cryptfs.stores import ObjectStore, open_store
from cryptfs.stores.local import LocalStore
from cryptfs.stores.memory import MemoryStore
from cryptfs.stores.replicated import Member, ReplicatedStore

MASTER, VAULT = bytes(range(32)), b"vault-id-0000022"
S, TAG = SEGMENT_SIZE, crypto.TAG_SIZE
CS = 1 << 16  # chunk size of the test vault


def codec() -> Codec:
    return Codec(MASTER, VAULT, CS)


def chunk(n: int, seed: int = 1) -> tuple[str, bytes, bytes]:
    """(name, plaintext, object) of a chunk of ``n`` bytes."""
    plain = bytes((i * 7 + seed) % 256 for i in range(n))
    c = codec()
    name = c.chunk_name(plain)
    return name, plain, c.seal_chunk(name, plain)


def read(name: str, blob: bytes, off: int, n: int, size: int | None = None) -> bytes:
    """Bytes [off, off + n) of the chunk in ``blob`` through a span, as a range reader does."""
    c = codec()
    size = len(blob) if size is None else size
    span = c.chunk_span(size, off, n)
    assert span is not None
    if span.take == 0:
        return b""
    return c.open_span(name, size, span, blob[span.lo : span.hi])


def expect(plain: bytes, t: int, off: int, n: int) -> bytes:
    """What a range read returns: the chunk's bytes, then its padding (zeros), cut at T - 4."""
    return (plain + bytes(t - 4 - len(plain)))[off : off + n]


def seg_of(blob: bytes, i: int) -> slice:
    return slice(1 + i * (S + TAG), min(len(blob), 1 + (i + 1) * (S + TAG)))


# -- the codec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 250, S - 4, S - 3, 3 * S + 5000, CS])
def test_range_reads_are_exact_at_every_segment_boundary(n: int) -> None:
    name, plain, blob = chunk(n)
    layout = segmented_layout(len(blob))
    assert layout is not None
    t, count = layout
    assert t == min(max(256, t), CS + 4) and len(blob) == 1 + t + TAG * count
    assert codec().open_chunk(ChunkRef(name, len(blob), b""), blob) == plain
    # plaintext offset p lies in segment p // S (the length field is last)
    edges = sorted({0, n, t - 4} | {i * S for i in range(1, count + 1)})
    for e in edges:
        for off, length in ((e - 1, 1), (e, 1), (e - 1, 2), (e - 4096, 8192), (e - S, S + 1),
                            (e, S), (0, e + 1), (e - 3, 4)):
            off = max(0, off)
            got = read(name, blob, off, length)
            assert got == expect(plain, t, off, length), (e, off, length)
    assert read(name, blob, 0, t + 100) == expect(plain, t, 0, t + 100)
    assert read(name, blob, t - 4, 10) == b""  # past the padded length


def test_a_flipped_byte_fails_only_the_reads_touching_its_segment() -> None:
    name, plain, blob = chunk(3 * S + 5000)
    t, count = segmented_layout(len(blob)) or (0, 0)
    assert count == 4
    starts = [i * S for i in range(count)]
    for bad in range(count):
        for where in (seg_of(blob, bad).start, seg_of(blob, bad).stop - 1):  # text, tag
            damaged = bytearray(blob)
            damaged[where] ^= 0x40
            for i in range(count):  # one read inside each segment, one across into the next
                inside = (starts[i] + 10, 100)
                if i == bad:
                    with pytest.raises(IntegrityError, match=f"segment {bad}"):
                        read(name, bytes(damaged), *inside)
                else:
                    assert read(name, bytes(damaged), *inside) == expect(plain, t, *inside)
                if i + 1 < count:
                    across = (starts[i + 1] - 8, 16)
                    if bad in (i, i + 1):
                        with pytest.raises(IntegrityError):
                            read(name, bytes(damaged), *across)
                    else:
                        assert read(name, bytes(damaged), *across) == expect(plain, t, *across)
            with pytest.raises(IntegrityError):
                codec().open_chunk_unchecked(name, bytes(damaged))


def test_truncated_reordered_and_cut_objects_are_detected() -> None:
    name, plain, blob = chunk(3 * S + 5000)
    c = codec()
    ref = ChunkRef(name, len(blob), b"")
    with pytest.raises(IntegrityError, match="bytes, expected"):
        c.open_chunk(ref, blob[:-1])
    # segments 1 and 2 swapped: each is at the wrong index (its nonce and associated data)
    a, b = seg_of(blob, 1), seg_of(blob, 2)
    swapped = blob[: a.start] + blob[b] + blob[a] + blob[b.stop :]
    assert len(swapped) == len(blob)
    assert read(name, swapped, 0, 100) == plain[:100]
    for off in (S, 2 * S):
        with pytest.raises(IntegrityError, match="segment"):
            read(name, swapped, off, 100)
    # the last segment dropped: the object now ends with a segment not flagged last (and its
    # size gives another T, so other nonces): nothing opens as the shorter object
    cut = blob[: seg_of(blob, 3).start]
    with pytest.raises(IntegrityError):
        c.open_chunk_unchecked(name, cut)
    with pytest.raises(IntegrityError):
        read(name, cut, 2 * S, 100)
    # a segment of another object put in its place fails too
    other_name, _p, other = chunk(3 * S + 5000, seed=2)
    one, two = seg_of(blob, 1).start, seg_of(blob, 2).start
    grafted = blob[:one] + other[seg_of(other, 1)] + blob[two:]
    with pytest.raises(IntegrityError):
        read(name, grafted, S, 100)
    assert other_name != name


def test_a_version_1_object_fails_a_span_and_opens_whole() -> None:
    """Readers tell the versions apart by the first byte; a range reader that cannot (it reads
    no first byte) fails authentication on a version 1 object and reads it whole instead."""
    name, plain, _blob = chunk(3 * S + 5000)
    c = codec()
    padded = struct.pack(">I", len(plain)) + plain
    padded += bytes(65540 - len(padded))
    key = crypto.subkey(MASTER, VAULT, crypto.PURPOSE_CHUNK)
    v1 = b"\x01" + crypto.seal(key, padded, b"cryptfs/chunk/v1\0" + VAULT + name.encode())
    assert c.open_chunk(ChunkRef(name, len(v1), b""), v1) == plain
    span = c.chunk_span(len(v1), S, 100)
    assert span is not None
    with pytest.raises(IntegrityError):
        c.open_span(name, len(v1), span, v1[span.lo : span.hi])


# -- the chunk store, on real stores --------------------------------------------------------------
class Counted:
    """A store wrapper counting whole and range reads (and the bytes they return)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.gets = 0
        self.ranges: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get(self, name: str, max_size: int, check: Callable[[bytes], bool] | None = None) -> bytes:
        self.gets += 1
        return self.inner.get(name, max_size, check)

    def get_range(self, name: str, offset: int, length: int, size: int) -> bytes:
        self.ranges.append((offset, length))
        return self.inner.get_range(name, offset, length, size)


def chunk_store(store: Any, tmp_path: Path, remote: bool, mem_bytes: int = 64 << 20) -> ChunkStore:
    refs: dict[str, ChunkRef] = {}
    return ChunkStore(store, codec(), remote=remote, staging=tmp_path / "staging",
                      cache=tmp_path / "cache" if remote else None, cache_bytes=8 << 20,
                      mem_bytes=mem_bytes, lookup=refs.get,
                      on_stored=lambda r: refs.__setitem__(r.name, r))


@pytest.fixture(params=["local", "s3"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectStore, bool]:
    if request.param == "local":
        return LocalStore(tmp_path / "store", create=True), False
    return open_store(request.getfixturevalue("s3_url")), True


def put_cold(cs: ChunkStore, plain: bytes) -> ChunkRef:
    """Store a chunk, uploaded, with no copy in memory, staging or the disk cache."""
    ref = cs.put(plain)
    cs.unpin([ref.name])
    cs.wait_uploaded()
    if cs.cache is not None:
        cs.cache.discard(ref.name)
    cs._mem.clear()
    cs._mem_size = 0
    return ref


def test_random_reads_fetch_only_their_segments(
        backing: tuple[ObjectStore, bool], tmp_path: Path) -> None:
    store, remote = backing
    counted = Counted(store)
    cs = chunk_store(counted, tmp_path, remote)
    try:
        _n, plain, _b = chunk(CS)
        ref = put_cold(cs, plain)
        t = CS + 4
        for off, n in ((S - 4096, 4096), (S - 10, 20), (3 * S, 4096), (CS - 1, 1), (5, 1)):
            before = len(counted.ranges)
            cs._ranged.clear()  # each read the first of this chunk (see below)
            assert cs.read_range(ref, off, n) == expect(plain, t, off, n)
            (lo, length), = counted.ranges[before:]  # one range read of the store
            first, last = off // S, (off + n - 1) // S
            assert lo == 1 + first * (S + TAG)
            assert length == min(ref.size - lo, (last - first + 1) * (S + TAG))
        assert counted.gets == 0 and cs.memory_bytes() == 0  # nothing cached as if whole
        # a random read that comes back to a chunk range-read before reads it whole: cached
        assert cs.read_range(ref, 3 * S, 10) == plain[3 * S : 3 * S + 10]
        assert counted.gets == 1 and cs.memory_bytes() == len(plain)
        assert cs.read_range(ref, 2 * S, 10) == plain[2 * S : 2 * S + 10]
        assert counted.gets == 1 and len(counted.ranges) == 5
    finally:
        cs.close()
        store.close()


def test_on_the_local_store_only_chunks_that_come_back_soon_are_read_whole(
        tmp_path: Path) -> None:
    """Random reads over more chunks than the memory cache holds stay range reads when they
    come back to a chunk (it would be evicted again before its next read); a chunk that comes
    back while the cache could still hold it is read whole. On a remote store (a local one
    standing for it) a chunk is read whole when it comes back among the last RANGED_MEMORY (a
    range read there is a request)."""
    for remote in (False, True):
        counted = Counted(LocalStore(tmp_path / f"store{remote}", create=True))
        cs = chunk_store(counted, tmp_path / str(remote), remote, mem_bytes=3 * (CS + 100))
        try:
            chunks = [chunk(CS, seed=k)[1] for k in range(5)]
            stored = [put_cold(cs, p) for p in chunks]
            for ref, plain in zip(stored, chunks, strict=True):  # each once: range reads
                assert cs.read_range(ref, S + 7, 100) == plain[S + 7 : S + 107]
            assert counted.gets == 0 and len(counted.ranges) == 5
            # the first comes back after four others, more than the cache holds: on the local
            # store a range read again; on a remote one read whole
            assert cs.read_range(stored[0], 2 * S, 10) == chunks[0][2 * S : 2 * S + 10]
            assert (counted.gets, len(counted.ranges)) == ((1, 5) if remote else (0, 6))
            # the last comes back at once: read whole (and cached) on both
            gets = counted.gets
            assert cs.read_range(stored[4], 2 * S, 10) == chunks[4][2 * S : 2 * S + 10]
            assert counted.gets == gets + 1 and cs.memory_bytes() >= CS
            assert cs.read_range(stored[4], 3 * S, 10) == chunks[4][3 * S : 3 * S + 10]
            assert counted.gets == gets + 1
        finally:
            cs.close()
            counted.close()


def test_a_damaged_segment_in_the_store_fails_only_reads_touching_it(
        backing: tuple[ObjectStore, bool], tmp_path: Path) -> None:
    store, remote = backing
    cs = chunk_store(store, tmp_path, remote)
    try:
        _n, plain, _b = chunk(CS)
        ref = put_cold(cs, plain)
        blob = bytearray(store.get(ref.name, ref.size))
        blob[seg_of(bytes(blob), 2).start + 100] ^= 1
        store.put(ref.name, bytes(blob))
        with pytest.raises(IntegrityError):
            cs.get(ref)  # the whole chunk fails
        for seg in (0, 1, 3, 0, 1, 3):  # the second time through get first, which fails
            off = seg * S + 1
            assert cs.read_range(ref, off, 64) == expect(plain, CS + 4, off, 64)
        for _ in range(2):
            with pytest.raises(IntegrityError, match=ref.name):
                cs.read_range(ref, 2 * S, 64)
        store.put(ref.name, bytes(blob[:-1]))  # truncated
        with pytest.raises(IntegrityError, match="bytes"):
            cs.read_range(ref, 1, 64)
    finally:
        cs.close()
        store.close()


def test_a_version_1_object_reads_by_range(tmp_path: Path) -> None:
    """An older vault's chunk (version 1) under a range read: the span fails, the object is read
    whole and opened as version 1, and then kept in memory (it is whole)."""
    store = Counted(LocalStore(tmp_path / "store", create=True))
    cs = chunk_store(store, tmp_path, remote=False)
    try:
        name, plain, _b = chunk(3 * S + 5000)
        padded = struct.pack(">I", len(plain)) + plain
        padded += bytes(65540 - len(padded))
        key = crypto.subkey(MASTER, VAULT, crypto.PURPOSE_CHUNK)
        v1 = b"\x01" + crypto.seal(key, padded, b"cryptfs/chunk/v1\0" + VAULT + name.encode())
        store.put(name, v1)
        ref = ChunkRef(name, len(v1), crypto.sha256(v1))
        assert cs.read_range(ref, S + 3, 5000) == plain[S + 3 : S + 5003]
        assert store.gets == 1 and len(store.ranges) == 1
        assert cs.read_range(ref, 7, 9) == plain[7:16]  # from memory now
        assert store.gets == 1 and len(store.ranges) == 1
    finally:
        cs.close()


def test_replicated_range_reads_fall_back_to_a_good_copy(tmp_path: Path) -> None:
    """The fastest member's copy is truncated: the range comes from a whole good copy."""
    a, b = MemoryStore("memory://a"), MemoryStore("memory://b")
    rs = ReplicatedStore([Member("a", a), Member("b", b)])
    try:
        data = os.urandom(40000)
        rs.put("data/x/y", data)
        assert rs.drain(10)
        for m in (a, b):
            m.objects["data/x/y"] = data[:-5]
            with pytest.raises(IntegrityError):
                m.get_range("data/x/y", 0, 10, 40000)
            other = b if m is a else a
            other.objects["data/x/y"] = data
            assert rs.get_range("data/x/y", 30000, 100, 40000) == data[30000:30100]
    finally:
        rs.close()
