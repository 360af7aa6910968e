"""The fsync log (docs/FORMAT.md 6.7), in-process on real vaults (local store, real SQLite files)
and in child processes killed at chosen steps.

On a store that appends, an fsync whose commit only journaled (tests/test_84_journal.py) is one
record appended to the log of the newest checkpoint: no checkpoint, no chunk. The store alone
then holds the fsync'd state (a new machine reads it, the records applied over the
checkpoint); a power loss that takes the local database's last commits is repaired from the
log on the next read-write open; a record that fails authentication refuses both with one
line; a record cut short (an append never acknowledged) is left out; a full log, or any other
change, makes a checkpoint again, and the old log goes once that checkpoint is durable.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from store_alone import new_vault, read_from_store_alone, use_machine

from cryptfs.errors import IntegrityError
from cryptfs.fs import FileSystem
from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.paths import VaultPaths
from cryptfs.vault import fsynclog
from cryptfs.vault.checkpoints import read_checkpoints
from cryptfs.vault.core import Vault, create_vault
from cryptfs.vault.fsynclog import read_log

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 << 10


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    use_machine(tmp_path, monkeypatch, 1)
    return tmp_path


@pytest.fixture
def vault(home: Path) -> Iterator[Vault]:
    with new_vault(home, CHUNK) as v:
        yield v


def listing(home: Path, prefix: str) -> list[str]:
    d = home / "store" / prefix
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".tmp.")) \
        if d.is_dir() else []


def new_machine(home: Path, monkeypatch: pytest.MonkeyPatch, n: int, name: bytes) -> bytes:
    return read_from_store_alone(home, monkeypatch, n, [name], CHUNK)[name]


def sealed_file(vault: Vault, name: bytes, data: bytes) -> tuple[FileSystem, int]:
    """A new file holding ``data``, sealed and checkpointed (as after a close and an fsync),
    still open for writing."""
    fs = vault.fs
    assert fs is not None
    _node, fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    fs.write(fh, 0, data)
    fs.flush(fh)
    fs.fsync(fh)
    return fs, fh


def records_end(log: Path) -> int:
    """Where the records of a log file end (6.7: 4-byte aligned frames, then zeros)."""
    blob, at = log.read_bytes(), 0
    while at + 4 <= len(blob) and (n := int.from_bytes(blob[at:at + 4], "big")):
        at += 4 + n + (-(4 + n) % 4)
    return at


def write(model: bytearray, off: int, data: bytes) -> None:
    model.extend(bytes(max(0, off - len(model))))
    model[off:off + len(data)] = data


def test_fsyncs_that_only_journal_are_log_records_the_store_alone_reads(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(86)
    model = bytearray(rng.randbytes(CHUNK + 1000))
    fs, fh = sealed_file(vault, b"db", bytes(model))
    cks, data = listing(home, "checkpoints"), listing(home, "data")
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    seq = ck.seq
    for i in range(6):  # page-sized writes about the end of chunk 0, some past the file's
        off = rng.randrange(CHUNK - 8000, CHUNK + 12000)  # (within what the journal takes)
        chunk = rng.randbytes(rng.randrange(1, 4000))
        fs.write(fh, off, chunk)
        write(model, off, chunk)
        fs.fsync(fh)
        assert listing(home, "checkpoints") == cks and listing(home, "data") == data
        records = read_log(vault.store, vault.codec, ck)
        assert [r.slot for r in records] == [(seq, n) for n in range(i + 1)]
        assert new_machine(home, monkeypatch, 2 + i, b"db") == bytes(model)
    # a change of another kind: the next fsync is a checkpoint, and the log goes
    _node, other = fs.create(ROOT_INO, b"other", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    fs.release(other)
    fs.fsync(fh)
    assert listing(home, "checkpoints") != cks and listing(home, "logs") == []
    new = read_checkpoints(vault.store, vault.codec)[0][0].seq
    fs.write(fh, CHUNK - 100, b"after")
    write(model, CHUNK - 100, b"after")
    fs.fsync(fh)
    assert listing(home, "logs") == [f"{new:016d}"]
    assert new_machine(home, monkeypatch, 20, b"db") == bytes(model)
    fs.release(fh)


def test_a_page_rewritten_at_every_fsync_keeps_the_journal_bounded(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the log, a chunk is journaled until its rows would hold a whole chunk's bytes;
    then it is sealed and journaled again: the metadata stays bounded, and every fsync is a
    record, also those that sealed the chunk (its chunk map entry and the ledger entry of its
    object in the record: no checkpoint)."""
    fs, fh = sealed_file(vault, b"hot", b"h" * 20000)
    cks = set(listing(home, "checkpoints"))
    rounds = 40
    for i in range(rounds):
        fs.write(fh, 8192, b"%04d" % i * 1024)
        fs.fsync(fh)
        assert sum(len(r[4]) for r in vault.meta.journaled()) <= CHUNK
    assert set(listing(home, "checkpoints")) == cks
    records = read_log(vault.store, vault.codec, read_checkpoints(vault.store, vault.codec)[0][0])
    assert len(records) == rounds
    sealed = [r for r in records if r.blocks]
    assert len(sealed) >= rounds // (CHUNK // 4200) - 1
    assert all(r.entries and r.blocks[0][1] is not None and
               r.blocks[0][1].name in {e.name for e in r.entries} for r in sealed)
    want = b"h" * 8192 + b"%04d" % i * 1024 + b"h" * (20000 - 12288)
    assert new_machine(home, monkeypatch, 2, b"hot") == want
    fs.release(fh)


def test_a_truncate_to_the_files_size_changes_its_times_and_its_fsync_is_a_record(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite truncates its database to its size after each WAL checkpoint, then fsyncs it:
    the truncate changes the times alone (pending, as a write's), so the fsync that follows
    is a record, not a checkpoint; a truncate that changes the size is committed at once."""
    import time

    fs, fh = sealed_file(vault, b"db", b"p" * 9000)
    ino = fs.lookup(ROOT_INO, b"db").ino
    fs.write(fh, 4096, b"page" * 1024)
    cks = listing(home, "checkpoints")
    before = fs.getattr(ino).mtime_ns
    time.sleep(0.01)
    node = fs.truncate(ino, 9000, fh)
    assert node.size == 9000 and node.mtime_ns > before and node.ctime_ns == node.mtime_ns
    assert fs.getattr(ino).mtime_ns == node.mtime_ns
    fs.fsync(fh)
    assert listing(home, "checkpoints") == cks  # (a record: the truncate committed nothing)
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    (rec,) = read_log(vault.store, vault.codec, ck)
    assert rec.mtime_ns == node.mtime_ns and rec.size == 9000
    assert new_machine(home, monkeypatch, 2, b"db") == b"p" * 4096 + b"page" * 1024 + \
        b"p" * (9000 - 8192)
    assert fs.truncate(ino, 5000, fh).size == 5000
    with vault.fs.lock:
        assert vault.meta.get_inode(ino).size == 5000  # (committed at once)
    fs.release(fh)


def test_an_fsync_after_another_commit_makes_a_checkpoint(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync makes everything committed so far durable in the store: after another file
    was closed (committed, not in the log), a small change's fsync is a checkpoint,
    and the store alone reads both files."""
    fs, fh = sealed_file(vault, b"a", b"x" * 5000)
    fs.write(fh, 0, b"logged")
    fs.fsync(fh)  # a record
    cks = listing(home, "checkpoints")
    _node, other = fs.create(ROOT_INO, b"b", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    fs.write(other, 0, b"closed, not fsync'd")
    fs.release(other)
    fs.write(fh, 10, b"again")
    fs.fsync(fh)
    assert listing(home, "checkpoints") != cks
    got = read_from_store_alone(home, monkeypatch, 2, [b"a", b"b"], CHUNK)
    assert got == {b"a": b"logged" + b"xxxx" + b"again" + b"x" * 4985,
                   b"b": b"closed, not fsync'd"}
    fs.release(fh)


def test_ledger_entries_a_commit_writes_for_another_file_are_in_its_record(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of another file sealed in the background (a whole chunk written, not yet
    committed) queues its ledger entry; the next commit writes it, before the fsync's mark, and
    that fsync's record holds it (with the entries written since the checkpoint: its own):
    no checkpoint, and the store alone has the entry."""
    import time

    fs, fh = sealed_file(vault, b"a", b"x" * 5000)
    _node, other = fs.create(ROOT_INO, b"b", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    fs.write(fh, 0, b"logged")
    fs.fsync(fh)  # (a checkpoint: b's creation)
    fs.write(fh, 3, b"more")
    fs.fsync(fh)  # (a record)
    cks = listing(home, "checkpoints")
    assert len(read_log(vault.store, vault.codec,
                        read_checkpoints(vault.store, vault.codec)[0][0])) == 1
    fs.write(other, 0, os.urandom(CHUNK) + b"tail")  # (a whole chunk: sealed at once)
    deadline = time.monotonic() + 10
    while not vault._stored and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = [ref.name for ref in vault._stored]
    assert queued
    fs.write(fh, 10, b"again")
    fs.fsync(fh)
    assert listing(home, "checkpoints") == cks
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    first, second = read_log(vault.store, vault.codec, ck)
    assert [e.seq for e in first.entries + second.entries] == \
        list(range(ck.seq + 1, ck.seq + 1 + len(first.entries + second.entries)))
    assert set(queued) <= {e.name for e in second.entries} and second.blocks == []
    use_machine(home, monkeypatch, 2)
    try:
        _cfg, created = create_vault(VaultPaths("unit"), [f"file://{home}/store"], b"pw",
                                     CHUNK, 0, 0)
        assert not created
        alone = Vault.open(VaultPaths("unit"), b"pw", readonly=True)
        try:
            assert alone.ledger is not None
            put = {e.name for e in alone.ledger.entries() if e.op == "put"}
        finally:
            alone.close()
    finally:
        use_machine(home, monkeypatch, 1)
    assert set(queued) <= put
    fs.release(other)
    fs.release(fh)


def test_concurrent_fsyncs_read_back_from_the_store_alone(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads write and fsync two files at once: records and checkpoints interleave (a
    record is appended only in its turn, else the fsync is a checkpoint); afterwards the store
    alone reads each file as its last fsync left it."""
    import threading

    appended = []
    real = fsynclog.FsyncLog.append

    def counted(self: fsynclog.FsyncLog, logged: object) -> bool:
        ok = real(self, logged)  # type: ignore[arg-type]
        appended.append(ok)
        return ok

    monkeypatch.setattr(fsynclog.FsyncLog, "append", counted)
    handles = {name: sealed_file(vault, name, b"0" * 20000)[1] for name in (b"a", b"b")}
    models = {name: bytearray(b"0" * 20000) for name in handles}
    fs = vault.fs
    assert fs is not None
    failed: list[BaseException] = []

    def work(name: bytes) -> None:
        rng = random.Random(name)
        try:
            for _ in range(30):
                off, data = rng.randrange(0, 16000), rng.randbytes(rng.randrange(1, 3000))
                fs.write(handles[name], off, data)
                write(models[name], off, data)
                fs.fsync(handles[name])
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)

    threads = [threading.Thread(target=work, args=(name,)) for name in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failed and not any(t.is_alive() for t in threads)
    assert any(appended)  # (records, and checkpoints between them)
    got = read_from_store_alone(home, monkeypatch, 2, list(handles), CHUNK)
    assert got == {name: bytes(m) for name, m in models.items()}
    for fh in handles.values():
        fs.release(fh)


def test_a_checkpoint_asked_for_holds_what_the_log_held(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync with nothing new after a logged one writes nothing; a checkpoint asked for
    (as a snapshot, an unmount, ``verify --accept`` ask) is written although the log holds
    every commit, and holds them itself: the log goes, the store alone reads the data."""
    fs, fh = sealed_file(vault, b"f", b"x" * 5000)
    cks = listing(home, "checkpoints")
    fs.write(fh, 100, b"logged")
    fs.fsync(fh)
    fs.fsync(fh)
    assert listing(home, "checkpoints") == cks and len(listing(home, "logs")) == 1
    vault.sync()
    assert listing(home, "checkpoints") != cks and listing(home, "logs") == []
    assert new_machine(home, monkeypatch, 2, b"f") == b"x" * 100 + b"logged" + b"x" * 4894
    fs.release(fh)


def test_a_failed_append_is_cut_off_and_the_fsync_makes_a_checkpoint(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fails while a record is appended (its bytes written, the sync refused): the
    log is cut back to what it held, and the fsync is a checkpoint instead, which succeeds."""
    import errno

    from cryptfs.stores import local

    fs, fh = sealed_file(vault, b"f", b"x" * 5000)
    fs.write(fh, 0, b"first")
    fs.fsync(fh)  # the log's first record (a put)
    (name,) = listing(home, "logs")
    size = records_end(home / "store" / "logs" / name)
    cks = listing(home, "checkpoints")
    real = os.fdatasync
    failed = []

    def full(fd: int) -> None:
        if not failed:
            failed.append(records_end(home / "store" / "logs" / name))
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(local.os, "fdatasync", full)
    fs.write(fh, 10, b"second")
    fs.fsync(fh)
    monkeypatch.setattr(local.os, "fdatasync", real)
    assert failed and failed[0] > size  # (the record's bytes were written before the sync)
    assert listing(home, "checkpoints") != cks  # a checkpoint instead
    assert listing(home, "logs") == []  # (and the cut-back log went with the old checkpoint)
    assert new_machine(home, monkeypatch, 2, b"f") == b"first" + b"x" * 5 + b"second" + \
        b"x" * 4984
    fs.release(fh)


def test_an_append_that_fails_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append overwrites what the object holds from its offset (zeros written ahead) and
    grows it past its end; one that fails cuts the object off at its offset."""
    import errno

    from cryptfs.errors import StoreFull
    from cryptfs.stores import local

    store = local.LocalStore(tmp_path / "s", create=True)
    store.put("logs/0000000000000001", b"first record" + bytes(8))
    store.append("logs/0000000000000001", 12, b" and")
    assert store.get("logs/0000000000000001", 100) == b"first record and" + bytes(4)
    real = os.fdatasync

    def full(fd: int) -> None:
        monkeypatch.setattr(local.os, "fdatasync", real)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.os, "fdatasync", full)
    with pytest.raises(StoreFull):
        store.append("logs/0000000000000001", 16, b" a second")
    assert store.get("logs/0000000000000001", 100) == b"first record and"
    store.append("logs/0000000000000001", 16, b" a third, past the end")
    assert store.get("logs/0000000000000001", 100) == b"first record and a third, past the end"


def test_a_full_log_makes_a_checkpoint(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = bytearray(b"x" * 5000)
    fs, fh = sealed_file(vault, b"f", bytes(model))
    first = read_checkpoints(vault.store, vault.codec)[0][0].seq
    sizes, files = [], []
    for i in range(5):
        fs.write(fh, 100 * i, b"%d" % i * 80)
        write(model, 100 * i, b"%d" % i * 80)
        fs.fsync(fh)
        if i < 2:
            sizes.append(records_end(home / "store" / "logs" / f"{first:016d}"))
            files.append((home / "store" / "logs" / f"{first:016d}").stat().st_size)
        if i == 1:  # the log is full after its third record (the size of the second: the
            # first carries the ledger entries the checkpoint wrote after its head)
            monkeypatch.setattr(fsynclog, "LOG_TARGET", 2 * sizes[1] - sizes[0])
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    newest = ck.seq
    # the second record overwrote zeros the first wrote ahead: the file did not grow
    assert sizes[1] > sizes[0] and files[0] == files[1] > sizes[1]
    assert newest > first  # (the fourth fsync found the log full)
    assert listing(home, "logs") == [f"{newest:016d}"]
    assert len(read_log(vault.store, vault.codec, ck)) == 1
    assert new_machine(home, monkeypatch, 2, b"f") == bytes(model)
    fs.release(fh)


# -- a power loss, tampering, a torn append: child processes killed after their fsyncs ------------
CHILD = r"""
import os, sqlite3, sys
from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.paths import VaultPaths
from cryptfs.vault.core import Vault
from crashpoints import die_after

step, kind = sys.argv[1], sys.argv[2]
paths = VaultPaths("unit")
v = Vault.open(paths, b"pw")
fs = v.fs
_node, fh = fs.create(ROOT_INO, b"j", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
fs.write(fh, 0, b"o" * 150000)
fs.flush(fh)  # sealed, as a close seals
fs.fsync(fh)  # a checkpoint: the local database is durable up to here
with v.fs.lock:
    v.meta.commit()
    src = sqlite3.connect(paths.db)
    src.backup(sqlite3.connect(str(paths.db) + ".durable"))  # what a power loss leaves
    src.close()
fs.write(fh, 70000, b"n" * 3000)  # a few bytes of a full chunk...
fs.fsync(fh)  # ... the log's first record
fs.write(fh, 150000, b"e" * 500)  # and past the end
if kind == "seal":  # chunk 1 written whole: sealed, its record carries the chunk
    fs.write(fh, 65536, b"s" * 65536)
if step == "committed":  # the commit made, its record not appended
    die_after(fs, "flush")
elif step == "appended":
    die_after(v.store, "append")
fs.fsync(fh)  # the second record
os._exit(9)
"""
OLD = b"o" * 150000
MID = OLD[:70000] + b"n" * 3000 + OLD[73000:]
NEW = MID + b"e" * 500
SEALED = MID[:65536] + b"s" * 65536 + NEW[131072:]  # (the "seal" child's last fsync)


def crashed_child(home: Path, step: str, kind: str = "journal") -> VaultPaths:
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{home}/store"], b"pw", CHUNK, os.getuid(), os.getgid())
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[1]}:{Path(__file__).parent}"}
    res = subprocess.run([sys.executable, "-c", CHILD, step, kind], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 9, res.stderr
    return paths


def power_loss(paths: VaultPaths) -> None:
    """The local database as the disk held it at the last checkpoint (its later commits were
    never synced: a power loss takes them)."""
    for suffix in ("-wal", "-shm"):
        Path(str(paths.db) + suffix).unlink(missing_ok=True)
    os.replace(str(paths.db) + ".durable", paths.db)


def read_j(paths: VaultPaths, check: bool = False) -> tuple[bytes, list[str]]:
    """What this machine reads of ``j`` (and with ``check``, ``cryptfs verify`` finds no
    problem in the vault: ledger, objects and the log's records)."""
    from cryptfs.admin.verify import verify

    v = Vault.open(paths, b"pw")
    try:
        assert v.fs is not None
        fh = v.fs.open(v.fs.lookup(ROOT_INO, b"j").ino, os.O_RDONLY)
        try:
            got = v.fs.read(fh, 0, len(NEW) + 10), list(v.recovered)
        finally:
            v.fs.release(fh)
        if check:
            assert verify(v).problems == []
        return got
    finally:
        v.close()


@pytest.mark.parametrize("step", ["committed", "appended", "returned"])
def test_kill_between_the_steps_of_a_logged_fsync(
    home: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The daemon dies (kill -9) after the commit of a logged fsync, after its record's append,
    after the fsync returned: the store alone holds the state of the fsync before or (once the
    record is appended) of this one; this machine, its local database intact, reads this one."""
    paths = crashed_child(home, step)
    stored = new_machine(home, monkeypatch, 2, b"j")
    assert stored == (MID if step == "committed" else NEW)
    got, _ = read_j(paths)
    assert got == NEW
    assert new_machine(home, monkeypatch, 3, b"j") == NEW


@pytest.mark.parametrize("step", ["committed", "appended", "returned"])
def test_kill_between_the_steps_of_an_fsync_that_seals_a_chunk(
    home: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The same, where the last fsync also seals a chunk written whole (its record carries the
    chunk map entry and the ledger entries since the checkpoint, the object synced before the
    append): the store alone holds the state before or after it, this machine the one after,
    and the vault verifies clean."""
    paths = crashed_child(home, step, "seal")
    ro = Vault.open(paths, b"pw", readonly=True)
    try:
        records = read_log(ro.store, ro.codec, read_checkpoints(ro.store, ro.codec)[0][0])
    finally:
        ro.close()
    assert [bool(r.blocks) for r in records] == ([False] if step == "committed" else
                                                 [False, True])
    assert all(r.entries for r in records[1:])  # (the sealed chunk's, after the round's own)
    stored = new_machine(home, monkeypatch, 2, b"j")
    assert stored == (MID if step == "committed" else SEALED)
    got, _ = read_j(paths, check=True)
    assert got == SEALED
    assert new_machine(home, monkeypatch, 3, b"j") == SEALED


def test_a_power_loss_after_an_fsync_that_sealed_a_chunk_is_repaired_from_the_log(
    home: Path,
) -> None:
    """The local database lost both fsyncs' commits, the second of which sealed a chunk: the
    next read-write open applies both records (ledger entries, chunk map entry, journal rows)
    and reads what the fsyncs left; the ledger and every object then verify clean."""
    paths = crashed_child(home, "returned", "seal")
    power_loss(paths)
    got, recovered = read_j(paths, check=True)
    assert got == SEALED
    assert any("fsync log" in line for line in recovered), recovered
    got, recovered = read_j(paths, check=True)
    assert got == SEALED and recovered == []


def test_a_power_loss_is_repaired_from_the_log(home: Path) -> None:
    """The local database lost the commits of both logged fsyncs: a read-only open says so;
    the next read-write open applies them from the store's log (one line says so) and seals
    the chunks; an open after that has nothing to apply."""
    paths = crashed_child(home, "returned")
    power_loss(paths)
    ro = Vault.open(paths, b"pw", readonly=True)  # shows what it has, and says what it lacks
    try:
        assert [w for w in ro.warnings if "fsync log holds 2 fsyncs" in w], ro.warnings
    finally:
        ro.close()
    got, recovered = read_j(paths)
    assert got == NEW
    assert any("fsync log" in line for line in recovered), recovered
    assert any("sealed from the journal" in line for line in recovered), recovered
    got, recovered = read_j(paths)
    assert got == NEW and recovered == []
    ro = Vault.open(paths, b"pw", readonly=True)
    assert ro.warnings == []
    ro.close()


def test_a_tampered_record_is_refused_and_a_torn_one_left_out(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = crashed_child(home, "returned")
    (name,) = listing(home, "logs")
    log = home / "store" / "logs" / name
    blob = log.read_bytes()
    first = 4 + int.from_bytes(blob[:4], "big")
    first += -first % 4  # the second record starts here
    end = records_end(log)
    assert end < len(blob) and blob.count(0, end) == len(blob) - end  # (zeros written ahead)
    # torn by a power loss while the second record was written: its first bytes on the
    # disk, the rest still the zeros written ahead
    log.write_bytes(blob[:first + 100] + bytes(len(blob) - first - 100))
    assert new_machine(home, monkeypatch, 2, b"j") == MID
    # cut short (the file ends inside it)
    log.write_bytes(blob[:end - 7])
    assert new_machine(home, monkeypatch, 3, b"j") == MID
    # tampered: a byte of the second record changed; a byte of the first, another after it
    for n, at in ((4, first + 40), (5, 40)):
        log.write_bytes(blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:])
        with pytest.raises(IntegrityError) as e:
            new_machine(home, monkeypatch, n, b"j")
        assert "\n" not in str(e.value)
    power_loss(paths)  # (this machine needs the record too)
    with pytest.raises(IntegrityError) as e:
        read_j(paths)
    assert "\n" not in str(e.value)
    log.write_bytes(blob)  # the store mended: the record is applied
    assert read_j(paths)[0] == NEW


def test_verify_authenticates_every_record(vault: Vault, home: Path) -> None:
    from cryptfs.admin.verify import verify

    fs, fh = sealed_file(vault, b"f", b"x" * 5000)
    for i in range(2):
        fs.write(fh, 100 * i, b"logged")
        fs.fsync(fh)
    assert verify(vault).problems == []
    (name,) = listing(home, "logs")
    log = home / "store" / "logs" / name
    blob, at = log.read_bytes(), records_end(log) - 20
    log.write_bytes(blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:])
    problems = verify(vault).problems
    assert [(p.kind, p.object) for p in problems] == [("corrupt", f"logs/{name}")]
    assert f"logs/{name}/" in problems[0].message
    assert problems[0].message.endswith("/1 fails authentication")
    log.write_bytes(blob)
    fs.release(fh)


def test_a_log_left_under_a_checkpoints_number_is_never_read_over_it(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback (``verify --accept`` deleting newer checkpoints) can give a later checkpoint
    the number of one that had a log: a checkpoint deletes any log of its number before it is
    put (and records are bound to their checkpoint's ledger head besides: unit test below)."""
    fs, fh = sealed_file(vault, b"f", b"x" * 5000)
    fs.write(fh, 0, b"logged")
    fs.fsync(fh)
    (name,) = listing(home, "logs")
    stale = (home / "store" / "logs" / name).read_bytes()
    first = read_checkpoints(vault.store, vault.codec)[0][0].seq
    for seq in range(first + 1, first + 40):  # (the numbers the next checkpoints may take)
        (home / "store" / "logs" / f"{seq:016d}").write_bytes(stale)
    vault.sync()
    newest = read_checkpoints(vault.store, vault.codec)[0][0].seq
    assert newest > first and f"{newest:016d}" not in listing(home, "logs")
    assert new_machine(home, monkeypatch, 2, b"f") == b"logged" + b"x" * 4994
    fs.release(fh)


def test_record_order_and_place_are_bound() -> None:
    """A record sealed for one place opens at no other (another number, another log, the log
    of another checkpoint of the same number: a rollback's), and a record's plaintext
    round-trips."""
    from cryptfs.format.codec import Codec
    from cryptfs.fs.journal import Logged

    codec = Codec(os.urandom(32), os.urandom(16))
    rec = Logged((7, 2), 9, 70000, 5, 6, [(1, 0, 4464, b"sealed row"), (2, 3, 0, b"")], (0, 0))
    head = os.urandom(32)
    sealed = codec.seal_log_record(7, head, 2, fsynclog.encode(rec))
    assert fsynclog.decode((7, 2), codec.open_log_record(7, head, 2, sealed)) == rec
    for seq, h, n in ((7, head, 1), (7, head, 3), (8, head, 2), (7, os.urandom(32), 2)):
        with pytest.raises(IntegrityError):
            codec.open_log_record(seq, h, n, sealed)
    with pytest.raises(IntegrityError, match="malformed"):
        fsynclog.decode((7, 2), fsynclog.encode(rec) + b"x")


def test_a_record_that_seals_chunks_round_trips_and_one_of_version_4_still_reads() -> None:
    """A record with chunk map entries (a chunk, a hole) and ledger entries decodes to itself
    from the log of a version 5 checkpoint; a version 4 record (rows only: what a cryptfs
    before sealing records wrote) decodes from the log of a version 4 checkpoint, and each is
    malformed under the other version."""
    import struct

    from cryptfs.format.codec import ChunkRef
    from cryptfs.fs.journal import Logged
    from cryptfs.meta.ledger import GENESIS, Entry, entry_hash

    ref = ChunkRef("data/ab/" + "ab" * 32, 65616, os.urandom(32))
    h = entry_hash(1, 5, "put", ref.name, ref.size, ref.sha256, GENESIS)
    entry = Entry(1, 5, "put", ref.name, ref.size, ref.sha256, GENESIS, h)
    rec = Logged((7, 0), 9, 70000, 5, 6, [(1, 0, 4464, b"sealed row")], (0, 0),
                 [(0, ref), (2, None)], [entry])
    plain = fsynclog.encode(rec)
    assert fsynclog.decode((7, 0), plain, 5) == rec
    old = struct.pack(">QQqqI", 9, 70000, 5, 6, 1) + struct.pack(">QQII", 1, 0, 4464, 10) + \
        b"sealed row"
    assert fsynclog.decode((7, 0), old, 4) == Logged((7, 0), 9, 70000, 5, 6,
                                                     [(1, 0, 4464, b"sealed row")], (0, 0))
    for text, version in ((plain, 4), (old, 5)):
        with pytest.raises(IntegrityError, match="malformed"):
            fsynclog.decode((7, 0), text, version)


@pytest.mark.parametrize("version", [4, 5])
def test_a_log_written_by_a_writer_of_before_still_reads(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """A vault as a cryptfs before sealing records (version 4) or before zeros written ahead
    (version 5) left it: a checkpoint of that version followed by a log written by that
    writer's rules (its checkpoint version, records of version 4 holding rows only, frames
    end to end and appended, nothing after them; small writes: nothing sealed). A new machine
    reads the fsync'd bytes from the store alone with today's cryptfs."""
    import struct

    from cryptfs.fs.journal import Logged
    from cryptfs.vault import checkpointer

    def encode_v4(logged: Logged) -> bytes:  # (FORMAT.md 6.7, version 4)
        parts = [struct.pack(">QQqqI", logged.ino, logged.size, logged.mtime_ns,
                             logged.ctime_ns, len(logged.rows))]
        for idx, seq, off, sealed in logged.rows:
            parts += [struct.pack(">QQII", idx, seq, off, len(sealed)), sealed]
        return b"".join(parts)

    def append_before(self: fsynclog.FsyncLog, logged: Logged) -> bool:
        seq, n = logged.slot
        plain = encode_v4(logged) if version == 4 else fsynclog.encode(logged)
        sealed = self.codec.seal_log_record(seq, self.head, n, plain)
        frame = struct.pack(">I", len(sealed)) + sealed
        if n == 0:
            self.store.put(fsynclog.log_name(seq), frame)
            self.store.sync()
        else:
            self.store.append(fsynclog.log_name(seq), self._bytes, frame)
        self._next += 1
        self._bytes += len(frame)
        return True

    monkeypatch.setattr(checkpointer, "CHECKPOINT_VERSION", version)
    monkeypatch.setattr(fsynclog.FsyncLog, "append", append_before)
    model = bytearray(b"v" * 9000)
    fs, fh = sealed_file(vault, b"old", bytes(model))  # (a checkpoint of that version)
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    assert ck.version == version
    for i in range(3):
        fs.write(fh, 1000 * i, b"%d" % i * 301)
        write(model, 1000 * i, b"%d" % i * 301)
        fs.fsync(fh)
    blob, at = (home / "store" / "logs" / f"{ck.seq:016d}").read_bytes(), 0
    while at < len(blob):
        at += 4 + int.from_bytes(blob[at:at + 4], "big")
    assert at == len(blob)  # (frames end to end, nothing after them)
    records = read_log(vault.store, vault.codec, ck)
    assert len(records) == 3 and all(r.rows and not r.blocks for r in records)
    assert new_machine(home, monkeypatch, 2, b"old") == bytes(model)
    fs.release(fh)


def test_the_object_of_a_sealed_chunk_is_on_the_disk_before_its_record(
    vault: Vault, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync that seals a chunk is a record naming a new object: the object's file is
    synced before the record is appended and synced (else a power loss after the fsync could
    keep the record and lose the object it names)."""
    fs, fh = sealed_file(vault, b"s", b"x" * 5000)
    fs.write(fh, 10, b"first")
    fs.fsync(fh)  # (the log's first record: the seal's is appended to it)
    cks = listing(home, "checkpoints")
    events: list[tuple[str, str]] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def spy(kind: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            events.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)
        return call

    monkeypatch.setattr(os, "fsync", spy("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", spy("fdatasync", real_fdatasync))
    fs.write(fh, 0, random.Random(7).randbytes(CHUNK))  # chunk 0 written whole: sealed
    fs.fsync(fh)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    assert listing(home, "checkpoints") == cks  # a record, not a checkpoint
    ck = read_checkpoints(vault.store, vault.codec)[0][0]
    record = read_log(vault.store, vault.codec, ck)[-1]
    ((idx, ref),) = record.blocks
    assert idx == 0 and ref is not None
    obj = str(home / "store" / ref.name)
    log = str(home / "store" / "logs" / f"{ck.seq:016d}")
    assert ("fdatasync", log) in events  # (appended, then synced)
    assert ("fsync", obj) in events[:events.index(("fdatasync", log))]
    fs.release(fh)
