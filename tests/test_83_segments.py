"""Incremental checkpoints, in-process on real vaults (local store, real SQLite files).

An fsync stores the metadata pages changed since the last checkpoint (a segment) and a
checkpoint naming the snapshot and its segments in order; the vault opens from the store alone
with everything fsynced; a segment that is missing, changed or swapped with another refuses the
restore with one line; an fsync with nothing new stores nothing; a new snapshot replaces the
segments once they add up, and the old objects are collected; a checkpoint cut short leaves
the store's previous one good.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_alone import new_vault, read_from_store_alone, use_machine

from cryptfs.errors import IntegrityError, StoreError
from cryptfs.format.layout import CHECKPOINT_PREFIX, DATA_PREFIX, META_PREFIX, PACK_PREFIX
from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.meta.wal import MergedSegments, WalError, apply_segment, encode_segment
from cryptfs.paths import VaultPaths
from cryptfs.vault import checkpointer
from cryptfs.vault.checkpoints import (
    CHECKPOINT_VERSION,
    Checkpoint,
    checkpoint_objects,
    read_checkpoints,
)
from cryptfs.vault.core import Vault, create_vault
from cryptfs.vault.localstate import read_head
from cryptfs.vault.restore import materialize

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    use_machine(tmp_path, monkeypatch, 1)
    return tmp_path


@pytest.fixture
def vault(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vault]:
    """A vault whose checkpoints store every change as a segment (no delta: these tests are
    about segments; the delta's are at the end)."""
    monkeypatch.setattr(checkpointer, "DELTA_MAX", -1)
    with new_vault(home, 64 << 10) as v:
        yield v


def write(v: Vault, name: bytes, data: bytes) -> None:
    fs = v.fs
    assert fs is not None
    _node, fh = fs.create(ROOT_INO, name, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    fs.write(fh, 0, data)
    fs.flush(fh)
    fs.release(fh)


def newest(v: Vault) -> Checkpoint:
    cks, bad = read_checkpoints(v.store, v.codec)
    assert not bad
    return cks[0]


def store_files(home: Path) -> set[str]:
    root = home / "store"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def names_in(db: Path) -> set[bytes]:
    con = sqlite3.connect(db)
    try:
        return {bytes(r[0]) for r in con.execute("SELECT name FROM dentries WHERE parent = 1")}
    finally:
        con.close()


def read_on_new_machine(home: Path, monkeypatch: pytest.MonkeyPatch, name: bytes) -> bytes:
    """Attach the vault from the store alone (fresh local state) and read one file."""
    return read_from_store_alone(home, monkeypatch, 2, [name], 64 << 10)[name]


def test_fsync_ships_segments_and_the_store_alone_restores(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert vault.fs is not None
    for i in range(1500):  # a snapshot much bigger than what one fsync changes
        vault.fs.mkdir(ROOT_INO, b"directory number %d" % i, 0o755, 0, 0)
    write(vault, b"first", b"1" * 1000)
    vault.sync()
    base = newest(vault)
    # the first of a mount: a snapshot
    assert base.version == CHECKPOINT_VERSION and base.segments == []
    for i in range(3):
        write(vault, b"f%d" % i, os.urandom(3000))
        vault.sync()
    ck = newest(vault)
    assert ck.meta == base.meta and len(ck.segments) == 3
    for ref in ck.segments:  # only what changed: a few pages of many
        plain = vault.codec.open_blob(b"meta", ref.name, vault.store.get(ref.name, ref.size))
        _size, db_pages, count = struct.unpack(">III", plain[23:35])
        assert 0 < count <= 16 and db_pages > 3 * count
    # nothing new: nothing stored, the same checkpoint stays the newest
    before = store_files(home)
    vault.sync()
    assert store_files(home) == before and newest(vault).name == ck.name
    # the checkpoint's metadata, materialized from the store, is the local database's
    out = home / "materialized.db"
    materialize(vault.store, vault.codec, ck, out)
    assert {b"first", b"f0", b"f1", b"f2"} < names_in(out) == names_in(vault.paths.db)
    data = b"last" * 500
    write(vault, b"last", data)
    vault.sync()
    assert read_on_new_machine(home, monkeypatch, b"last") == data


def test_a_damaged_segment_refuses_the_restore(vault: Vault, home: Path) -> None:
    write(vault, b"a", b"a")
    vault.sync()
    for name in (b"b", b"c"):
        write(vault, name, name * 100)
        vault.sync()
    ck = newest(vault)
    assert len(ck.segments) == 2
    seg1, seg2 = (home / "store" / r.name for r in ck.segments)
    b1, b2 = seg1.read_bytes(), seg2.read_bytes()
    flipped = bytearray(b1)
    flipped[len(b1) // 2] ^= 1
    out = home / "restored.db"
    for damage in ("missing", "changed", "swapped"):
        if damage == "missing":
            seg2.unlink()
        elif damage == "changed":
            seg1.write_bytes(bytes(flipped))
        else:
            seg1.write_bytes(b2)
            seg2.write_bytes(b1)
        with pytest.raises(IntegrityError) as e:
            materialize(vault.store, vault.codec, ck, out)
        msg = str(e.value)
        assert "\n" not in msg and "metadata segment" in msg and ck.name in msg, damage
        assert ("missing" in msg) if damage == "missing" else \
            ("does not match" in msg or "more than the" in msg)
        assert not out.exists()
        seg1.write_bytes(b1)
        seg2.write_bytes(b2)
    materialize(vault.store, vault.codec, ck, out)  # undamaged again: it restores
    assert names_in(out) == {b"a", b"b", b"c"}


def dump(db: Path) -> list[tuple[object, ...]]:
    """Every row of the namespace, inode and chunk-map tables: two databases with equal dumps
    hold the same files."""
    con = sqlite3.connect(db)
    try:
        return [(t, *r) for t in ("dentries", "inodes", "blocks")
                for r in con.execute(f"SELECT * FROM {t} ORDER BY 1, 2")]
    finally:
        con.close()


def test_segments_past_the_limit_are_merged_and_the_snapshot_stays(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a chain has MAX_SEGMENTS segments the next round ships one segment of them all
    merged, not a full snapshot: the snapshot stays, the chain stays short, what it replaced
    is collected, and the store alone restores exactly the local database after every round
    (files created, overwritten, renamed, truncated, unlinked)."""
    assert vault.fs is not None
    monkeypatch.setattr(checkpointer, "MAX_SEGMENTS", 2)
    monkeypatch.setattr(checkpointer, "COLLECT_INTERVAL", 0.0)
    for i in range(200):  # a snapshot much bigger than what one fsync changes
        vault.fs.mkdir(ROOT_INO, b"directory number %d" % i, 0o755, 0, 0)
    write(vault, b"x", b"x" * 3000)
    vault.sync()
    first = newest(vault)
    y = os.urandom(70_000)
    steps = [
        lambda: write(vault, b"y0", y),
        lambda: write(vault, b"x", b"X" * 100),
        lambda: vault.fs.rename(ROOT_INO, b"y0", ROOT_INO, b"y1", 0),  # type: ignore[union-attr]
        lambda: write(vault, b"z", os.urandom(5000)),
        lambda: vault.fs.unlink(ROOT_INO, b"x"),  # type: ignore[union-attr]
        lambda: [vault.fs.rmdir(ROOT_INO, b"directory number %d" % i)  # type: ignore[union-attr]
                 for i in range(150)],
        lambda: write(vault, b"w", b"w" * 10),
    ]
    lengths = []
    for i, step in enumerate(steps):
        step()
        vault.sync()
        ck = newest(vault)
        assert ck.meta == first.meta  # no new snapshot
        lengths.append(len(ck.segments))
        out = home / f"m{i}.db"
        materialize(vault.store, vault.codec, ck, out)
        assert dump(out) == dump(vault.paths.db)
    assert max(lengths) == 2 and lengths.count(1) >= 2  # merged when a third was due
    kept = {n for n in store_files(home) if n.startswith(META_PREFIX)}
    assert kept == {r.name for r in checkpoint_objects(ck)}  # what a merge replaced is gone
    assert read_on_new_machine(home, monkeypatch, b"y1") == y


def test_merged_segments_leave_the_database_as_applying_them_in_order() -> None:
    """wal.MergedSegments: folding segments (pages rewritten, the database cut short and grown
    again) and applying the merge gives the same file, byte for byte, as applying each in
    order; its size is the pages changed, not the segments'; a malformed one is refused."""
    ps = 512
    base = bytearray(os.urandom(ps * 6))
    base[16:18] = ps.to_bytes(2, "big")  # the page size in the database header
    page = {n: os.urandom(ps) for n in range(1, 12)}
    segs = [
        encode_segment(ps, 5, {2: page[1], 5: page[2]}),  # the base's page 6 is cut off
        encode_segment(ps, 6, {5: page[10]}),  # its page 6 is zeros now
        encode_segment(ps, 8, {5: page[3], 7: page[4], 8: page[5]}),
        encode_segment(ps, 4, {3: page[6]}),  # cut short: pages 5 to 8 are gone
        encode_segment(ps, 9, {9: page[7], 2: page[8]}),  # grown again: 5 to 8 are holes
        encode_segment(ps, 9, {2: page[9]}),
    ]
    merged = MergedSegments.after(bytes(base))
    for seg in segs:
        merged.add(seg)
    assert sorted(merged.pages) == [2, 3, 9] and merged.db_pages == 9
    assert merged.nbytes == 3 * ps

    def applied(segments: list[bytes]) -> bytes:
        fd = os.memfd_create("db")
        try:
            os.write(fd, base)
            for seg in segments:
                apply_segment(fd, seg)
            return os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)

    assert applied([merged.segment()]) == applied(segs)
    assert merged.with_segment(segs[1]).db_pages == 6 and merged.db_pages == 9  # a copy
    with pytest.raises(WalError):
        merged.add(segs[0][:-1])
    with pytest.raises(WalError):
        merged.add(encode_segment(ps * 2, 9, {1: os.urandom(ps * 2)}))


def test_a_snapshot_replaces_the_segments_once_they_add_up_to_a_share_of_it(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments adding up to 1/COMPACT_RATIO of their snapshot (here: any), or merged pages
    past MAX_MERGED, make the next round store a full snapshot; the old chain is collected."""
    monkeypatch.setattr(checkpointer, "COLLECT_INTERVAL", 0.0)
    write(vault, b"x", b"x")
    vault.sync()
    first = newest(vault)
    monkeypatch.setattr(checkpointer, "COMPACT_FLOOR", 0)
    monkeypatch.setattr(checkpointer, "COMPACT_RATIO", 1 << 20)
    for i in range(2):
        write(vault, b"y%d" % i, b"y")
        vault.sync()
    ck = newest(vault)
    assert ck.meta != first.meta and ck.segments == []  # a new snapshot
    kept = {n for n in store_files(home) if n.startswith(META_PREFIX)}
    assert kept == {r.name for r in checkpoint_objects(ck)}  # the old chain was collected
    out = home / "m.db"
    materialize(vault.store, vault.codec, ck, out)
    assert names_in(out) == {b"x", b"y0", b"y1"}
    # merged pages past MAX_MERGED: a snapshot instead of the merge
    monkeypatch.setattr(checkpointer, "COMPACT_RATIO", 2)
    monkeypatch.setattr(checkpointer, "COMPACT_FLOOR", 1 << 20)
    monkeypatch.setattr(checkpointer, "MAX_SEGMENTS", 1)
    monkeypatch.setattr(checkpointer, "MAX_MERGED", 1)
    write(vault, b"z0", b"z")
    vault.sync()
    assert newest(vault).meta == ck.meta and len(newest(vault).segments) == 1
    write(vault, b"z1", b"z")
    vault.sync()
    last = newest(vault)
    assert last.meta != ck.meta and last.segments == []
    materialize(vault.store, vault.codec, last, out)
    assert names_in(out) == {b"x", b"y0", b"y1", b"z0", b"z1"}


def test_a_checkpoint_cut_short_keeps_the_previous_one(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(vault, b"a", b"a")
    vault.sync()
    write(vault, b"b", b"b")
    vault.sync()
    good = newest(vault)
    real_put = vault.store.put

    def no_checkpoints(name: str, blob: bytes) -> None:
        if name.startswith("checkpoints/"):
            raise StoreError("the store went away")
        real_put(name, blob)

    write(vault, b"c", b"c")
    monkeypatch.setattr(vault.store, "put", no_checkpoints)
    with pytest.raises(StoreError):
        vault.sync()  # its segment is stored, its checkpoint is not
    assert newest(vault).name == good.name
    out = home / "m.db"
    materialize(vault.store, vault.codec, good, out)
    assert names_in(out) == {b"a", b"b"}
    monkeypatch.setattr(vault.store, "put", real_put)
    write(vault, b"d", b"d")
    vault.sync()  # ships everything since the last good checkpoint, c included
    ck = newest(vault)
    assert ck.meta == good.meta and len(ck.segments) == len(good.segments) + 1
    materialize(vault.store, vault.codec, ck, out)
    assert names_in(out) == {b"a", b"b", b"c", b"d"}


def test_collection_waits_for_its_interval_and_the_end_of_the_mount(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of fsyncs does not delete in the store: old checkpoints and replaced chunks stay
    until collection is due, every checkpoint of the burst restores, and the final round of
    the mount collects them all (and its head file names the newest ledger entry)."""
    monkeypatch.setattr(checkpointer, "COLLECT_INTERVAL", 3600.0)
    monkeypatch.setattr(checkpointer, "COLLECT_ROUNDS", 1000)
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{home}/store"], b"pw", 64 << 10, os.getuid(), os.getgid())
    v = Vault.open(paths, b"pw")

    def kinds() -> tuple[int, int]:
        files = store_files(home)
        return (sum(n.startswith(CHECKPOINT_PREFIX) for n in files),  # (short chunks are
                sum(n.startswith((DATA_PREFIX, PACK_PREFIX)) for n in files))  # packed)

    try:
        write(v, b"f", b"0" * 1000)
        v.sync()  # the first round of a mount collects
        first = kinds()
        for i in range(1, 7):
            write(v, b"f", str(i).encode() * 1000)  # the chunk before is garbage now
            v.sync()
        cks, chunks = kinds()
        assert cks == first[0] + 6 > checkpointer.KEEP_CHECKPOINTS and chunks == first[1] + 6
        out = home / "m.db"
        materialize(v.store, v.codec, newest(v), out)
        assert names_in(out) == {b"f"}
    finally:
        v.close()
    assert kinds() == (checkpointer.KEEP_CHECKPOINTS, 1)
    head = read_head(paths)
    con = sqlite3.connect(paths.db)
    try:
        assert head is not None and head.seq == con.execute("SELECT max(seq) FROM ledger"
                                                            ).fetchone()[0]
    finally:
        con.close()
    assert read_on_new_machine(home, monkeypatch, b"f") == b"6" * 1000


def test_an_fsync_leaves_a_deleted_files_chunks_to_the_background_rounds(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync after a big file was deleted does not wait for the deletion of its chunks
    (on S3 a request each): finding more than COLLECT_FSYNC to collect, its round deletes
    none of them; the checkpointer's own rounds collect them soon after, at most COLLECT_MAX
    a round, and the store alone then reads what the fsync made durable."""
    import threading
    import time

    monkeypatch.setattr(checkpointer, "COLLECT_INTERVAL", 0.0)
    monkeypatch.setattr(checkpointer, "COLLECT_MAX", 10)
    monkeypatch.setattr(checkpointer, "COLLECT_FSYNC", 8)
    assert vault.fs is not None
    write(vault, b"big", os.urandom(40 * (64 << 10)))  # 40 chunks, each an object
    vault.sync()
    chunks = {n for n in store_files(home) if n.startswith(DATA_PREFIX)}
    assert len(chunks) >= 40
    vault.fs.unlink(ROOT_INO, b"big")
    deleted: list[tuple[str, str]] = []  # (name, thread)
    real_delete = vault.store.delete

    def delete(name: str) -> None:
        real_delete(name)
        deleted.append((name, threading.current_thread().name))

    monkeypatch.setattr(vault.store, "delete", delete)
    rounds: list[int] = []  # chunks deleted per round
    real_collect = vault.checkpointer._collect  # type: ignore[union-attr]

    def collect(*args: object, **kwargs: object) -> bool:
        before = len(deleted)
        left = real_collect(*args, **kwargs)  # type: ignore[arg-type]
        rounds.append(sum(n in chunks for n, _t in deleted[before:]))
        return left

    monkeypatch.setattr(vault.checkpointer, "_collect", collect)
    fs = vault.fs
    _node, fh = fs.create(ROOT_INO, b"small", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    fs.write(fh, 0, b"fsync'd")
    fs.fsync(fh)
    me = threading.current_thread().name
    assert not [n for n, t in deleted if t == me and n in chunks]  # (its round collected none)
    deadline = time.monotonic() + 30
    # (until the rounds' counts are in too: a round counts its deletions once it returns)
    while (chunks & store_files(home) or sum(rounds) < len({n for n, _t in deleted} & chunks)) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not chunks & store_files(home)  # all collected, by the background rounds
    assert max(rounds) <= 10 and sum(rounds) >= 40 and len(rounds) >= 4
    fs.release(fh)
    assert read_on_new_machine(home, monkeypatch, b"small") == b"fsync'd"


def test_chunks_a_snapshot_holds_do_not_stall_the_batched_collection(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks no file references but a snapshot holds stay recorded (and unreferenced); more
    of them than a round's batch must not keep the rounds from the chunks that may go: those
    are collected, and the rounds stop asking for more once only held ones are left."""
    import time

    from cryptfs.vault.snapshots import create_snapshot

    monkeypatch.setattr(checkpointer, "COLLECT_INTERVAL", 0.0)
    monkeypatch.setattr(checkpointer, "COLLECT_MAX", 10)
    monkeypatch.setattr(checkpointer, "COLLECT_FSYNC", 8)
    assert vault.fs is not None
    write(vault, b"kept", os.urandom(30 * (64 << 10)))  # 30 chunks the snapshot holds
    vault.sync()
    held = {n for n in store_files(home) if n.startswith(DATA_PREFIX)}
    create_snapshot(vault, "before")
    vault.fs.unlink(ROOT_INO, b"kept")
    vault.sync()
    write(vault, b"gone", os.urandom(20 * (64 << 10)))  # 20 chunks that may go
    vault.sync()
    freed = {n for n in store_files(home) if n.startswith(DATA_PREFIX)} - held
    assert len(freed) >= 20
    vault.fs.unlink(ROOT_INO, b"gone")
    vault.sync()
    deadline = time.monotonic() + 30
    while freed & store_files(home) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not freed & store_files(home)  # collected, past the held ones
    assert held <= store_files(home)  # the snapshot's stay
    before = newest(vault).name
    time.sleep(2.5)  # no round asks for another while only held chunks are left
    assert newest(vault).name == before


# -- kill -9 between the steps of a round ------------------------------------------------------
CHILD = r"""
import os, sys
from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.paths import VaultPaths
from cryptfs.vault import checkpointer
from cryptfs.vault.core import Vault
from crashpoints import die_after

step = sys.argv[1]
if step != "returned-head-lagging":  # every round writes the head file (its steps are hooked)
    checkpointer.HEAD_INTERVAL = 0.0
v = Vault.open(VaultPaths("unit"), b"pw")

def write(name, data):
    _node, fh = v.fs.create(ROOT_INO, name, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    v.fs.write(fh, 0, data)
    v.fs.release(fh)

write(b"a", b"A" * 5000)
v.sync()
write(b"z", b"Z" * 5000)  # (in a pack of its own: the collection deletes that)
v.sync()
write(b"b", b"B" * 5000)
v.fs.unlink(ROOT_INO, b"z")  # its chunk: garbage once the next round has shipped

if step == "store-synced":
    die_after(v.store, "sync")
elif step == "log-synced":
    die_after(v.meta, "sync")
elif step == "checkpoint-put":
    die_after(v.store, "put", when=lambda name, blob: name.startswith("checkpoints/"))
elif step == "checkpoint-synced":
    die_after(v.store, "sync", nth=2)
elif step == "head-staged":
    die_after(checkpointer, "fsync_path")
elif step == "head-renamed":
    die_after(checkpointer, "replace_private")
elif step == "collect-deleted":  # the round's collection: a delete not yet recorded
    checkpointer.COLLECT_INTERVAL = 0.0
    die_after(v.store, "delete", when=lambda name: name.startswith(("data/", "packs/")))
v.sync()
os._exit(9 if step.startswith("returned") else 0)
"""
STEPS = ["store-synced", "log-synced", "checkpoint-put", "checkpoint-synced", "head-staged",
         "head-renamed", "returned", "returned-head-lagging", "collect-deleted"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_between_the_steps_of_a_round(
    home: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The daemon dies (kill -9) after each durability step of an fsync's round: the vault
    opens again on this machine (the anchors agree: the head file never names a checkpoint
    the store lacks) with everything committed before, and a new machine restores from the
    store alone what the last completed fsync made durable, and the round's file once the
    fsync returned, or while the round's collection deletes what it freed (after its
    checkpoint is durable). Also after a round that left the head file naming the round
    before's checkpoint (a burst of fsyncs writes it once per HEAD_INTERVAL): the local
    ledger, which records every checkpoint, holds the bar meanwhile."""
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{home}/store"], b"pw", 64 << 10, os.getuid(), os.getgid())
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[1]}:{Path(__file__).parent}"}
    res = subprocess.run([sys.executable, "-c", CHILD, step], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 9, res.stderr
    ro = Vault.open(paths, b"pw", readonly=True)  # the store alone, as it was left
    try:
        if step == "returned-head-lagging":
            lagging = read_head(paths)
            assert lagging is not None and lagging.checkpoint < newest(ro).name
        out = home / "restored.db"
        materialize(ro.store, ro.codec, newest(ro), out)
        assert b"a" in names_in(out)
        if step in ("returned", "returned-head-lagging", "collect-deleted"):
            assert b"b" in names_in(out)
    finally:
        ro.close()
    v = Vault.open(paths, b"pw")
    try:
        assert v.fs is not None
        assert names_in(paths.db) >= {b"a", b"b"}
        head = read_head(paths)
        assert head is not None and head.checkpoint <= newest(v).name
    finally:
        v.close()
    assert read_on_new_machine(home, monkeypatch, b"b") == b"B" * 5000  # (after its close)


def test_a_store_rolled_back_past_a_lagging_head_file_is_refused(home: Path) -> None:
    """The head file lags behind the newest checkpoint in a burst of fsyncs (HEAD_INTERVAL);
    the local ledger records every checkpoint, so a store rolled back to the checkpoint the
    head file names (the newest one deleted) is still refused, as with a head file that
    named it."""
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{home}/store"], b"pw", 64 << 10, os.getuid(), os.getgid())
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[1]}:{Path(__file__).parent}"}
    res = subprocess.run([sys.executable, "-c", CHILD, "returned-head-lagging"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 9, res.stderr
    head = read_head(paths)
    cks = sorted(n for n in store_files(home) if n.startswith(CHECKPOINT_PREFIX))
    assert head is not None and head.checkpoint < cks[-1]
    (home / "store" / cks[-1]).unlink()  # the store as it was when the head file was written
    with pytest.raises(IntegrityError, match="rolled back"):
        Vault.open(paths, b"pw")
