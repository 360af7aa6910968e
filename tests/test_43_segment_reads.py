"""Reads through a real mount of chunk objects made of segments (docs/FORMAT.md section 4): a
byte flipped in one segment of a stored object is EIO for the reads that touch that segment and
for nothing else, random reads (range reads of the store) and sequential ones (whole chunks,
falling back to the segments a read needs) alike; a truncated object is EIO. On the local store
and on the moto S3 server."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv

from cryptfs.format.codec import SEGMENT_SIZE
from cryptfs.format.crypto import TAG_SIZE
from cryptfs.format.layout import CONFIG

S = SEGMENT_SIZE
pytestmark = pytest.mark.timeout(300)


def chunk_objects(env: VaultEnv) -> tuple[int, dict[int, tuple[str, int]]]:
    """The vault's chunk size and {chunk index: (object name, size)} of its only file."""
    store = env.store()
    try:
        chunk_size = int(json.loads(store.get(CONFIG, 1 << 20))["chunk_size"])
    finally:
        store.close()
    con = sqlite3.connect(env.db)
    try:
        rows = con.execute("SELECT b.idx, o.name, o.size FROM blocks b "
                           "JOIN objects o ON o.name = b.obj").fetchall()
    finally:
        con.close()
    return chunk_size, {int(i): (str(n), int(sz)) for i, n, sz in rows}


def pread(path: Path, n: int, off: int) -> bytes:
    """One read, as a random reader does it: no read-ahead, so exactly these pages reach cryptfs,
    and dropped from the page cache after, so the next read of them does too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            return os.pread(fd, n, off)
        finally:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_damaged_segment_fails_only_the_reads_touching_it(vault_env: VaultEnv) -> None:
    env = vault_env
    mnt = env.root / "mnt"
    env.mount(mnt)
    try:
        chunk_size = int(json.loads(env.store().get(CONFIG, 1 << 20))["chunk_size"])
        data = os.urandom(2 * chunk_size + 5000)
        (mnt / "f.bin").write_bytes(data)
    finally:
        env.umount(mnt)
    cs, objects = chunk_objects(env)
    assert cs == chunk_size and sorted(objects) == [0, 1, 2]
    name, size = objects[1]
    store = env.store()
    try:
        blob = bytearray(store.get(name, size))
        assert blob[0] == 2 and size == 1 + cs + 4 + TAG_SIZE * (cs // S + 1)
        blob[1 + 2 * (S + TAG_SIZE) + 50] ^= 0x10  # segment 2 of chunk 1
        store.put(name, bytes(blob))
    finally:
        store.close()
    shutil.rmtree(env.root / "cache", ignore_errors=True)  # the good copy a remote store cached

    f = mnt / "f.bin"
    seg2 = cs + 2 * S  # file offset of chunk 1's segment 2
    env.mount(mnt)
    try:
        # random reads: segments 0, 1, 3 and the last of chunk 1 read, segment 2 does not
        for off in (cs + 8192, cs + S + 4096, seg2 - 4096, seg2 + S, 2 * cs - 4096):
            assert pread(f, 4096, off) == data[off : off + 4096], off
        for off, n in ((seg2, 1), (seg2 + S - 1, 1), (seg2 + S - 10, 20), (seg2 + 5000, 4096)):
            with pytest.raises(OSError) as info:
                pread(f, n, off)
            assert info.value.errno == 5, (off, n)  # EIO
        # a read from segment 1 into segment 2: EIO, or (the kernel reads page by page) short,
        # with only the bytes before segment 2
        try:
            got = pread(f, 20, seg2 - 10)
        except OSError as e:
            assert e.errno == 5
        else:
            assert got == data[seg2 - 10 : seg2]
        # a read at the chunk's start fetches the whole chunk, which fails; the segment it
        # needs is read instead
        assert pread(f, 4096, cs) == data[cs : cs + 4096]
        # the other chunks are untouched; a sequential read of the file fails at segment 2
        assert pread(f, 4096, 0) == data[:4096]
        assert pread(f, 5000, 2 * cs) == data[2 * cs :]
        with open(f, "rb") as fh:
            assert fh.read(cs) == data[:cs]
            with pytest.raises(OSError):
                fh.read()
    finally:
        env.umount(mnt)

    # truncated: every read of that chunk fails, the others still read
    store = env.store()
    try:
        store.put(name, bytes(blob[:-1]))
    finally:
        store.close()
    env.mount(mnt)
    try:
        for off in (cs, cs + 8192):
            with pytest.raises(OSError):
                pread(f, 4096, off)
        assert pread(f, 4096, 8192) == data[8192 : 8192 + 4096]
    finally:
        env.umount(mnt)
