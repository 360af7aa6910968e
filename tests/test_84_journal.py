"""The journal (docs/FORMAT.md 5.3), in-process on real vaults (local store, real SQLite files).

An fsync that changed few bytes of a chunk stores no chunk: those bytes go into the metadata,
sealed, and the checkpoint carries the metadata changes inline (its delta, 6.1); the chunk is
sealed later (at close). The store alone then holds the fsync'd state: a machine attaching
the vault from it reads exactly the bytes fsync'd, journal rows applied in place (read-only).
A read-write open seals the rows a crash left into chunks (also tests/test_80_crash.py); a
damaged row refuses it with one line. Changes too big for the
journal are sealed as before; truncation and hole punching after a journal round drop or
drop its rows; a random sequence of writes, truncations, punches and fsyncs reads back
from the store alone, after each fsync, as a model of the file says.

The store here does not append (as S3 does not): every fsync is a checkpoint round. Where the
store appends, an fsync that only journaled is a record of the fsync log instead
(tests/test_86_fsync_log.py).
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_alone import new_vault, read_from_store_alone, use_machine

from cryptfs.errors import IntegrityError, StoreError
from cryptfs.fs import FileSystem
from cryptfs.fs.base import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, JOURNAL_MAX
from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.paths import VaultPaths
from cryptfs.stores.local import LocalStore
from cryptfs.vault import checkpointer
from cryptfs.vault.checkpoints import CHECKPOINT_VERSION, read_checkpoints
from cryptfs.vault.core import Vault, create_vault
from cryptfs.vault.restore import materialize

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 << 10


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(LocalStore, "appendable", False)  # (rounds only: see above)
    use_machine(tmp_path, monkeypatch, 1)
    return tmp_path


@pytest.fixture
def vault(home: Path) -> Iterator[Vault]:
    with new_vault(home, CHUNK) as v:
        yield v


def new_file(vault: Vault, name: bytes) -> tuple[FileSystem, int]:
    """The vault's filesystem and a handle on a new file ``name`` in its root."""
    fs = vault.fs
    assert fs is not None
    _node, fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    return fs, fh


def data_objects(home: Path) -> set[str]:
    root = home / "store"
    return {str(p.relative_to(root)) for d in ("data", "packs") if (root / d).is_dir()
            for p in (root / d).rglob("*") if p.is_file()}


def new_machine(home: Path, monkeypatch: pytest.MonkeyPatch, n: int,
                names: list[bytes]) -> dict[bytes, bytes]:
    return read_from_store_alone(home, monkeypatch, n, names, CHUNK)


def test_fsync_journals_small_changes_and_the_store_alone_reads_them(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(84)
    model = bytearray(rng.randbytes(2 * CHUNK + 5000))
    fs, fh = new_file(vault, b"db")
    fs.write(fh, 0, bytes(model))
    fs.flush(fh)  # as a close does: all three chunks sealed (the last one packed)
    fs.fsync(fh)
    assert vault.meta.journaled() == []
    stored = data_objects(home)
    # a few bytes in the middle of chunk 1; an append to chunk 2 past a gap (zeros between)
    for off, data in ((CHUNK + 1000, b"m" * 100), (2 * CHUNK + 9000, b"a" * 3000)):
        fs.write(fh, off, data)
        model.extend(bytes(max(0, off - len(model))))
        model[off:off + len(data)] = data
    fs.fsync(fh)
    rows = {(idx, seq, off) for _ino, idx, seq, off, _data in vault.meta.journaled()}
    assert rows == {(1, 0, 1000), (2, 0, 5000)}  # each from its first changed byte
    assert data_objects(home) == stored  # the fsync stored no chunk
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    assert ck.version == CHECKPOINT_VERSION and ck.delta is not None  # the metadata changes inline
    raw = sqlite3.connect(vault.paths.db)
    try:  # the bytes are sealed in the local database too
        blobs = [bytes(r[0]) for r in raw.execute("SELECT data FROM journal")]
    finally:
        raw.close()
    assert blobs and not any(b"m" * 50 in b or b"a" * 50 in b for b in blobs)
    assert new_machine(home, monkeypatch, 2, [b"db"]) == {b"db": bytes(model)}
    # the close seals the chunks: the rows go
    fs.release(fh)
    assert vault.meta.journaled() == []
    vault.sync()
    assert new_machine(home, monkeypatch, 4, [b"db"]) == {b"db": bytes(model)}


def test_a_change_bigger_than_the_journal_takes_is_sealed(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, fh = new_file(vault, b"f")
    fs.write(fh, 0, bytes(CHUNK))
    fs.fsync(fh)
    stored = data_objects(home)
    # two changes JOURNAL_MAX apart: what lies between counts too
    fs.write(fh, 10, b"x")
    fs.write(fh, 10 + JOURNAL_MAX, b"y")
    fs.fsync(fh)
    assert vault.meta.journaled() == []
    assert data_objects(home) - stored  # a new chunk
    want = bytearray(CHUNK)
    want[10:11] = b"x"
    want[10 + JOURNAL_MAX:11 + JOURNAL_MAX] = b"y"
    fs.release(fh)
    assert new_machine(home, monkeypatch, 2, [b"f"]) == {b"f": bytes(want)}


def test_a_page_rewritten_at_every_fsync_keeps_the_journal_bounded(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same 4 KiB rewritten and fsync'd again and again (a database's header page): the
    span never grows, but the chunk's rows hold at most JOURNAL_MAX bytes in all; past that
    the chunk is sealed and its rows go. The store alone reads the last version."""
    fs, fh = new_file(vault, b"hot")
    fs.write(fh, 0, b"h" * 20000)
    fs.flush(fh)
    most = 0
    for i in range(3 * JOURNAL_MAX // 4096):
        fs.write(fh, 8192, b"%04d" % i * 1024)
        fs.fsync(fh)
        rows = vault.meta.journaled()
        assert sum(len(r[4]) for r in rows) <= JOURNAL_MAX
        most = max(most, len(rows))
    assert most >= JOURNAL_MAX // 4096 - 1  # (journaled until the bound, then sealed)
    want = b"h" * 8192 + b"%04d" % i * 1024 + b"h" * (20000 - 12288)
    assert new_machine(home, monkeypatch, 2, [b"hot"]) == {b"hot": want}
    fs.release(fh)


def test_truncation_and_punched_holes_after_a_journal_round(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = bytearray(random.Random(5).randbytes(3 * CHUNK))
    fs, fh = new_file(vault, b"t")
    fs.write(fh, 0, bytes(model))
    fs.fsync(fh)
    for off in (100, CHUNK + 100, 2 * CHUNK + 100):
        fs.write(fh, off, b"j" * 200)
        model[off:off + 200] = b"j" * 200
    fs.fsync(fh)
    node = fs.lookup(ROOT_INO, b"t")
    assert {idx for ino, idx, _q, _o, _d in vault.meta.journaled() if ino == node.ino} == {0, 1, 2}
    fs.truncate(node.ino, CHUNK + 50, fh)  # chunk 2 goes; a truncation seals the others
    del model[CHUNK + 50:]
    assert vault.meta.journaled() == []
    fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 50, 100)
    model[50:150] = bytes(100)
    fs.write(fh, 2 * CHUNK, b"e" * 10)  # grown again past a hole
    model.extend(bytes(2 * CHUNK - len(model)))
    model.extend(b"e" * 10)
    fs.fsync(fh)
    assert [(idx, seq, off) for _i, idx, seq, off, _d in vault.meta.journaled()] == [(2, 0, 0)]
    assert new_machine(home, monkeypatch, 2, [b"t"]) == {b"t": bytes(model)}
    fs.release(fh)


@pytest.mark.timeout(300)
def test_random_writes_read_back_from_the_store_after_each_fsync(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model of one file against the store alone: 6 rounds of random overwrites, appends
    past gaps, truncations and punched holes, each ended by an fsync; after each, a new
    machine reads the file from the store (read-only: journal rows applied in place)."""
    rng = random.Random(1984)
    model = bytearray()
    fs, fh = new_file(vault, b"r")
    ino = fs.lookup(ROOT_INO, b"r").ino
    journaled = 0
    for rnd in range(6):
        for _ in range(rng.randint(3, 8)):
            op = rng.random()
            if op < 0.6:  # a small write somewhere, or past the end
                off = rng.randint(0, len(model) + 2000)
                data = rng.randbytes(rng.randint(1, 3000))
                fs.write(fh, off, data)
                model.extend(bytes(max(0, off - len(model))))
                model[off:off + len(data)] = data
            elif op < 0.75:  # a big write
                off = rng.randint(0, len(model))
                data = rng.randbytes(rng.randint(CHUNK // 2, 2 * CHUNK))
                fs.write(fh, off, data)
                model[off:off + len(data)] = data
            elif op < 0.9 and model:  # a hole punched
                off = rng.randint(0, len(model) - 1)
                n = rng.randint(1, min(len(model) - off, CHUNK))
                fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
                model[off:off + n] = bytes(n)
            else:  # truncated, shorter or longer
                size = rng.randint(0, len(model) + CHUNK)
                fs.truncate(ino, size, fh)
                del model[size:]
                model.extend(bytes(size - len(model)))
        fs.fsync(fh)
        journaled += len(vault.meta.journaled())
        got = new_machine(home, monkeypatch, 10 + rnd, [b"r"])[b"r"]
        assert got == bytes(model), f"round {rnd}: the store alone reads other bytes"
    assert journaled  # the journal was used
    fs.release(fh)


def test_a_read_write_open_seals_what_a_crash_left_journaled(home: Path) -> None:
    """The rows a crash leaves in the local database (written here as an fsync writes them)
    are sealed into chunks by the next read-write open, in seq order over the chunk the map
    names and cut at the file's size; a row that fails authentication (the local database
    damaged) refuses the open with one line saying what to do."""
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{home}/store"], b"pw", CHUNK, os.getuid(), os.getgid())
    content = bytearray(random.Random(7).randbytes(2 * CHUNK + 100))
    v = Vault.open(paths, b"pw")
    try:
        fs, fh = new_file(v, b"c")
        fs.write(fh, 0, bytes(content))
        fs.release(fh)
        ino = fs.lookup(ROOT_INO, b"c").ino
        codec = v.codec
    finally:
        v.close()
    rows = [(1, 0, 10, b"X" * 50), (1, 1, 30, b"Y" * 10), (2, 0, 100, b"Z" * 30)]
    for idx, _seq, off, data in rows:
        at = idx * CHUNK + off
        content.extend(bytes(max(0, at - len(content))))
        content[at:at + len(data)] = data
    del content[2 * CHUNK + 120:]  # the size the fsync committed with its rows

    def crashed(rows: list[tuple[int, int, int, bytes]]) -> None:
        con = sqlite3.connect(paths.db)
        try:
            con.executemany("INSERT INTO journal (ino, idx, seq, off, data) VALUES (?, ?, ?, ?, ?)",
                            [(ino, i, q, o, d) for i, q, o, d in rows])
            con.execute("UPDATE inodes SET size = ? WHERE ino = ?", (2 * CHUNK + 120, ino))
            con.commit()
        finally:
            con.close()

    crashed([(i, q, o, codec.seal_journal(ino, i, q, o, d)) for i, q, o, d in rows])
    v = Vault.open(paths, b"pw")
    try:
        assert v.fs is not None
        assert any("sealed from the journal" in line for line in v.recovered)
        assert v.meta.journaled() == []
        fh = v.fs.open(ino, os.O_RDONLY)
        got = v.fs.read(fh, 0, len(content) + 10)
        v.fs.release(fh)
    finally:
        v.close()
    assert got == bytes(content)
    # a row sealed for another place (seq 1 sealed as seq 0) fails authentication
    crashed([(0, 0, 5, codec.seal_journal(ino, 0, 1, 5, b"moved"))])
    with pytest.raises(IntegrityError, match="metadata journal of inode") as e:
        Vault.open(paths, b"pw")
    assert e.value.hint is not None and "rebuild it from the store" in e.value.hint


# -- kill -9 between the steps of a journaled fsync's round ---------------------------------------
CHILD = r"""
import os, sys
from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.paths import VaultPaths
from cryptfs.vault import checkpointer
from cryptfs.vault.core import Vault
from crashpoints import die_after
from cryptfs.stores.local import LocalStore

LocalStore.appendable = False  # (rounds only)
step = sys.argv[1]
checkpointer.HEAD_INTERVAL = 0.0  # every round writes the head file
v = Vault.open(VaultPaths("unit"), b"pw")
fs = v.fs
_node, fh = fs.create(ROOT_INO, b"j", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
fs.write(fh, 0, b"o" * 150000)
fs.flush(fh)  # sealed, as a close seals
fs.fsync(fh)
fs.write(fh, 70000, b"n" * 3000)  # a few bytes of a full chunk, and past the end
fs.write(fh, 150000, b"e" * 500)

if step == "journaled":  # the rows committed, the round not begun
    die_after(v.chunks, "store_packs")
elif step == "log-synced":
    die_after(v.meta, "sync")
elif step == "checkpoint-put":
    die_after(v.store, "put", when=lambda name, blob: name.startswith("checkpoints/"))
elif step == "checkpoint-synced":
    die_after(v.store, "sync", nth=2)
fs.fsync(fh)
os._exit(9)
"""
JOURNAL_STEPS = ["journaled", "log-synced", "checkpoint-put", "checkpoint-synced", "returned"]


@pytest.mark.parametrize("step", JOURNAL_STEPS)
def test_kill_between_the_steps_of_a_journaled_round(
    home: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The daemon dies (kill -9) after each step of an fsync that journals (its rows
    committed; the local log synced; the checkpoint put; synced; the fsync returned): the
    store alone holds the state before the fsync or, once its checkpoint is there, after it
    (after it, once the fsync returned); this machine opens the vault again with the fsync's
    bytes, sealed from the journal, and a new machine then reads them from the store."""
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{home}/store"], b"pw", CHUNK, os.getuid(), os.getgid())
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[1]}:{Path(__file__).parent}"}
    res = subprocess.run([sys.executable, "-c", CHILD, step], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 9, res.stderr
    old = b"o" * 150000
    new = bytearray(old)
    new[70000:73000] = b"n" * 3000
    new += b"e" * 500
    stored = new_machine(home, monkeypatch, 2, [b"j"])[b"j"]
    assert stored in (old, bytes(new)), "the store alone holds neither state"
    if step == "returned":
        assert stored == bytes(new)
    v = Vault.open(paths, b"pw")
    try:
        assert v.fs is not None
        assert any("sealed from the journal" in line for line in v.recovered)
        assert v.meta.journaled() == []
        fh = v.fs.open(v.fs.lookup(ROOT_INO, b"j").ino, os.O_RDONLY)
        got = v.fs.read(fh, 0, len(new) + 10)
        v.fs.release(fh)
    finally:
        v.close()
    assert got == bytes(new)
    assert new_machine(home, monkeypatch, 3, [b"j"])[b"j"] == bytes(new)


def links(db: Path) -> set[bytes]:
    con = sqlite3.connect(db)
    try:
        return {bytes(r[0]) for r in con.execute("SELECT target FROM inodes WHERE target "
                                                 "IS NOT NULL")}
    finally:
        con.close()


def root_names(db: Path) -> set[bytes]:
    con = sqlite3.connect(db)
    try:
        return {bytes(r[0]) for r in con.execute("SELECT name FROM dentries WHERE parent = 1")}
    finally:
        con.close()


def test_the_delta_grows_into_a_segment_and_the_store_alone_restores_each(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints carry the pages changed since the chain's last segment inline until they
    pass DELTA_MAX; that round stores them all, merged, as one segment (those the delta before
    carried too). After every round the newest checkpoint restores the local metadata."""
    monkeypatch.setattr(checkpointer, "DELTA_MAX", 40 << 10)
    fs = vault.fs
    assert fs is not None
    vault.sync()  # the chain: a snapshot
    kinds = []
    for i in range(24):  # (a target of 3,000 bytes: each round's inode on pages of its own,
        # which later rounds do not change: a segment that left out what the delta before it
        # carried would lose them)
        fs.symlink(ROOT_INO, b"link %d" % i, b"%d/" % i + b"t" * 3000, 0, 0)
        vault.sync()
        ck = read_checkpoints(vault.store, vault.codec)[0][0]
        kinds.append((ck.delta is not None, len(ck.segments)))
        out = home / f"m{i}.db"
        materialize(vault.store, vault.codec, ck, out)
        assert links(out) == links(vault.paths.db), f"round {i}"
    folded = [b for a, b in zip(kinds, kinds[1:], strict=False)
              if a[0] and not b[0] and b[1] == a[1] + 1]
    assert folded, f"no delta went into a segment: {kinds}"
    assert sum(1 for d, _n in kinds if d) > len(folded)  # and most rounds stored none


def test_a_round_that_failed_after_its_put_never_reuses_its_checkpoint_name(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round whose checkpoint reached the store but that failed after (no ledger entry of
    its own) leaves the ledger head where it was: the next round must not write a checkpoint
    of that name again (it stores a segment, whose entry moves the head)."""
    fs = vault.fs
    assert fs is not None
    fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    vault.sync()
    real_put = vault.store.put
    failed: list[str] = []

    def put_then_fail(name: str, blob: bytes) -> None:
        real_put(name, blob)
        if name.startswith("checkpoints/"):
            failed.append(name)
            raise StoreError("the store went away after the put")

    fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0)
    monkeypatch.setattr(vault.store, "put", put_then_fail)
    with pytest.raises(StoreError):
        vault.sync()
    monkeypatch.setattr(vault.store, "put", real_put)
    was = (home / "store" / failed[0]).read_bytes()
    fs.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    vault.sync()
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    assert ck.name > failed[0]
    assert (home / "store" / failed[0]).read_bytes() == was
    out = home / "m.db"
    materialize(vault.store, vault.codec, ck, out)
    assert root_names(out) == {b"a", b"b", b"c"}
