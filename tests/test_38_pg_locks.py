"""File locks across machines on one PostgreSQL vault (issue 14).

The rules (:mod:`cryptfs.meta.locks`): conflicts, split and merge of an owner's ranges. The
engine (:class:`PgLocks` through :class:`PgMetaStore`, two stores with their own sessions as two
machines): owners on both machines, the kinds independent, a lock row sealed and bound, an
expired session's locks blocking nobody and going when it is reaped, a fenced machine getting
no lock, a release announced to every mount's watcher (a lock taken is not), ENOLCK while the
server is down and the locks kept once it is back.

Through real mounts (two machines, own XDG homes, one database): machine A's fcntl write lock on
a range makes B's F_SETLK on it fail with EAGAIN and F_GETLK report it, a range beside it is
B's; A's flock LOCK_EX makes B's LOCK_EX|LOCK_NB fail; B's blocking F_SETLKW and flock are
granted within a bound after A unlocks or closes; a signal ends B's wait with EINTR; a killed
machine's locks go when the live one cleans its session up; more waiters than libfuse's default
worker threads leave the mount usable; a mount stopped while a lock waits exits (its locks go).
A vault of one machine (SQLite) keeps the kernel's locks. The lockers are small helper
processes (python -c, fcntl) driven line by line; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv, force_unmount
from pg_fixtures import PgPlace
from test_39_pg_machines import machines_mounted

from cryptfs.meta import ROOT_INO, Inode
from cryptfs.meta.locks import F_RDLCK, F_UNLCK, F_WRLCK, FLOCK, OFFSET_MAX, POSIX, Held, apply
from cryptfs.meta.locks import conflict as conflict_of
from cryptfs.meta.postgres import (
    DbKeys,
    LocksUnavailable,
    PgMetaStore,
    PgSession,
    PgWatcher,
    _hash,
)

pytestmark = pytest.mark.timeout(120)

KEYS = DbKeys.derive(b"\5" * 32, b"vault-id-0000005")
BOUND = 6.0  # seconds a granted lock may take to reach a waiter on a loaded machine


# -- the rules ---------------------------------------------------------------------------------
def test_an_owners_ranges_split_convert_and_merge() -> None:
    own = apply([], F_WRLCK, 0, 99, 1)
    own = apply(own, F_UNLCK, 40, 59, 1)  # a hole in the middle: two ranges
    assert own == [Held(F_WRLCK, 0, 39, 1), Held(F_WRLCK, 60, 99, 1)]
    own = apply(own, F_RDLCK, 30, 69, 2)  # converted in the middle
    assert own == [Held(F_WRLCK, 0, 29, 1), Held(F_RDLCK, 30, 69, 2), Held(F_WRLCK, 70, 99, 1)]
    own = apply(own, F_WRLCK, 30, 69, 3)  # back: one range again
    assert own == [Held(F_WRLCK, 0, 99, 3)]
    own = apply(own, F_WRLCK, 100, OFFSET_MAX, 3)  # adjacent: merged, to the end of the file
    assert own == [Held(F_WRLCK, 0, OFFSET_MAX, 3)]
    assert apply(own, F_UNLCK, 0, OFFSET_MAX, 3) == []


def test_conflicts_need_an_overlap_and_a_write_lock() -> None:
    others = [Held(F_RDLCK, 0, 9, 7), Held(F_WRLCK, 20, 29, 8)]
    assert conflict_of(others, F_RDLCK, 0, 19) is None  # read beside read
    assert conflict_of(others, F_WRLCK, 5, 5) == others[0]
    assert conflict_of(others, F_RDLCK, 29, 40) == others[1]
    assert conflict_of(others, F_WRLCK, 10, 19) is None  # between them
    assert conflict_of(others, F_UNLCK, 0, OFFSET_MAX) is None


# -- the engine --------------------------------------------------------------------------------
@pytest.fixture
def two_machines(pg_place: PgPlace) -> Iterator[tuple[PgMetaStore, PgMetaStore,
                                                       PgSession, PgSession]]:
    a = PgMetaStore(pg_place.url, KEYS)
    b = PgMetaStore(pg_place.url, KEYS)
    sa = PgSession(pg_place.url, KEYS, 60)
    sb = PgSession(pg_place.url, KEYS, 60)
    try:
        with a.transaction():
            a.insert_inode(Inode(ROOT_INO, 0o40755, 0, 0, 0, 2, 0, 0, 0))
        sa.start()
        sb.start()
        a.attach(sa.id)
        b.attach(sb.id)
        yield a, b, sa, sb
    finally:
        a.close()
        b.close()
        sa.end()
        sb.end()


def test_locks_hold_across_two_machines_per_owner_and_kind(
    two_machines: tuple[PgMetaStore, PgMetaStore, PgSession, PgSession], pg_place: PgPlace,
) -> None:
    a, b, _sa, _sb = two_machines
    assert a.set_lock(5, 1, POSIX, F_WRLCK, 0, 99, 100) is None
    assert b.set_lock(5, 1, POSIX, F_WRLCK, 50, 50, 200) == Held(F_WRLCK, 0, 99, 100)
    assert b.test_lock(5, 1, POSIX, F_RDLCK, 0, 0) == Held(F_WRLCK, 0, 99, 100)
    assert b.set_lock(5, 1, POSIX, F_WRLCK, 100, 199, 200) is None  # beside it
    assert b.set_lock(6, 1, POSIX, F_WRLCK, 0, 99, 200) is None  # another file
    assert a.set_lock(5, 2, POSIX, F_RDLCK, 0, 0, 101) == Held(F_WRLCK, 0, 99, 100)  # owner 2
    assert a.test_lock(5, 1, POSIX, F_WRLCK, 0, 99) is None  # its own lock: no conflict
    assert b.set_lock(5, 1, FLOCK, F_WRLCK, 0, OFFSET_MAX, 0) is None  # flock: independent
    assert a.set_lock(5, 9, FLOCK, F_RDLCK, 0, OFFSET_MAX, 0) == Held(F_WRLCK, 0, OFFSET_MAX, 0)
    # unlocking a part of the range frees that part only
    assert a.set_lock(5, 1, POSIX, F_UNLCK, 0, 49, 100) is None
    assert b.set_lock(5, 1, POSIX, F_WRLCK, 0, 49, 200) is None
    assert b.test_lock(5, 1, POSIX, F_WRLCK, 50, 99) == Held(F_WRLCK, 50, 99, 100)
    # the database sees rows keyed by hashes, their contents sealed
    rows = pg_place.sql("SELECT v FROM locks")
    assert len(rows) == 4  # a: (5, 1); b: (5, 1), (6, 1) and its flock
    assert not any(b"posix" in bytes(v) or b"flock" in bytes(v) for (v,) in rows)  # type: ignore


def test_a_moved_lock_row_is_skipped_and_an_expired_sessions_locks_block_nobody(
    two_machines: tuple[PgMetaStore, PgMetaStore, PgSession, PgSession], pg_place: PgPlace,
) -> None:
    a, b, _sa, sb = two_machines
    assert b.set_lock(7, 1, POSIX, F_WRLCK, 0, 9, 200) is None
    assert b.set_lock(8, 1, POSIX, F_WRLCK, 20, 29, 200) is None
    # the operator moves b's lock on 8 to inode 7: it fails to open there and is skipped
    pg_place.sql(f"UPDATE locks SET ino = '\\x{_hash(KEYS, b'K', 7).hex()}' "
                 f"WHERE ino = '\\x{_hash(KEYS, b'K', 8).hex()}'")
    assert a.test_lock(8, 1, POSIX, F_WRLCK, 20, 29) is None
    assert a.test_lock(7, 1, POSIX, F_WRLCK, 20, 29) is None
    assert a.test_lock(7, 1, POSIX, F_WRLCK, 0, 29) == Held(F_WRLCK, 0, 9, 200)
    # b's session expires: its locks block nobody, then go when a live machine reaps it
    pg_place.sql("UPDATE sessions SET expires = now() - interval '1 second' "
                 f"WHERE k = '\\x{sb.k.hex()}'")
    assert a.set_lock(7, 1, POSIX, F_WRLCK, 0, 9, 100) is None
    with pytest.raises(LocksUnavailable) as e:  # a fenced machine gets no lock
        b.set_lock(9, 1, POSIX, F_WRLCK, 0, 9, 200)
    assert e.value.errno == errno.ENOLCK
    with a.transaction():
        dead, _gone = a.reap_sessions()
    assert dead == 1
    assert len(pg_place.sql("SELECT k FROM locks")) == 1  # a's only


def test_a_release_is_announced_to_every_watcher_and_a_lock_taken_is_not(
    two_machines: tuple[PgMetaStore, PgMetaStore, PgSession, PgSession], pg_place: PgPlace,
) -> None:
    """Waiting locks try again when a lock is released anywhere (PgWatcher's ``on_unlock``):
    an unlock, a downgrade, a session ended with locks are announced; a new lock is not."""
    a, b, _sa, sb = two_machines
    heard = threading.Semaphore(0)
    w = PgWatcher(pg_place.url, KEYS, a.sender, lambda _inos: None, heard.release)
    try:
        w.start()
        assert w.listening.wait(20)
        assert b.set_lock(5, 1, POSIX, F_WRLCK, 0, 9, 200) is None
        assert b.set_lock(6, 1, FLOCK, F_WRLCK, 0, OFFSET_MAX, 200) is None
        assert not heard.acquire(timeout=0.5)  # locks taken: nothing announced
        assert b.set_lock(5, 1, POSIX, F_RDLCK, 0, 9, 200) is None  # downgraded
        assert heard.acquire(timeout=BOUND)
        assert b.set_lock(5, 1, POSIX, F_UNLCK, 0, 9, 200) is None
        assert heard.acquire(timeout=BOUND)
        assert b.set_lock(5, 1, POSIX, F_UNLCK, 0, 9, 200) is None  # held nothing: silent
        assert not heard.acquire(timeout=0.5)
        sb.end()  # its flock goes with it
        assert heard.acquire(timeout=BOUND)
    finally:
        w.stop()


def test_locks_answer_enolck_while_the_server_is_down_and_work_once_it_is_back(
    two_machines: tuple[PgMetaStore, PgMetaStore, PgSession, PgSession], pg_place: PgPlace,
) -> None:
    a, b, _sa, _sb = two_machines
    assert a.set_lock(5, 1, POSIX, F_WRLCK, 0, 9, 100) is None
    pg_place.server.halt()
    try:
        start = time.monotonic()
        for call in (lambda: b.set_lock(5, 1, POSIX, F_WRLCK, 0, 9, 200),
                     lambda: b.test_lock(5, 1, POSIX, F_WRLCK, 0, 9)):
            with pytest.raises(LocksUnavailable) as e:
                call()
            assert e.value.errno == errno.ENOLCK
        assert time.monotonic() - start < BOUND
    finally:
        pg_place.server.start()
    # back: the first calls work (connections made again), a's lock held all along
    assert b.set_lock(5, 1, POSIX, F_WRLCK, 0, 9, 200) == Held(F_WRLCK, 0, 9, 100)
    assert a.set_lock(5, 1, POSIX, F_UNLCK, 0, 9, 100) is None
    assert b.set_lock(5, 1, POSIX, F_WRLCK, 0, 9, 200) is None


# -- through real mounts -----------------------------------------------------------------------
# A lock shell: opens argv[1], then answers one line per command read from stdin:
#   lk|lkw R|W|U START LEN   F_SETLK / F_SETLKW          -> ok | <errno name>
#   get R|W START LEN        F_GETLK                     -> U | <type> <start> <len> <pid>
#   flock SH|EX|UN [NB]                                  -> ok | <errno name>
#   close / open / openro    the descriptor (openro: read-only)
# SIGUSR1 during a blocking call ends it: "EINTR" (the handler raises, fcntl does not retry).
SHELL = r"""
import errno, fcntl, os, signal, struct, sys
class Interrupted(Exception):
    pass
def on_usr1(sig, frame):
    raise Interrupted()
signal.signal(signal.SIGUSR1, on_usr1)
T = {"R": fcntl.F_RDLCK, "W": fcntl.F_WRLCK, "U": fcntl.F_UNLCK}
N = {v: k for k, v in T.items()}
path = sys.argv[1]
fd = os.open(path, os.O_RDWR)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    w = line.split()
    try:
        if w[0] in ("lk", "lkw", "get"):
            cmd = {"lk": fcntl.F_SETLK, "lkw": fcntl.F_SETLKW, "get": fcntl.F_GETLK}[w[0]]
            arg = struct.pack("hh4xqqi4x", T[w[1]], 0, int(w[2]), int(w[3]), 0)
            res = fcntl.fcntl(fd, cmd, arg)
            t, _wh, start, ln, pid = struct.unpack("hh4xqqi4x", res)
            out = "ok" if w[0] != "get" else (
                "U" if t == fcntl.F_UNLCK else f"{N[t]} {start} {ln} {pid}")
        elif w[0] == "flock":
            op = {"SH": fcntl.LOCK_SH, "EX": fcntl.LOCK_EX, "UN": fcntl.LOCK_UN}[w[1]]
            fcntl.flock(fd, op | (fcntl.LOCK_NB if "NB" in w else 0))
            out = "ok"
        elif w[0] == "close":
            os.close(fd)
            out = "ok"
        elif w[0] in ("open", "openro"):
            fd = os.open(path, os.O_RDWR if w[0] == "open" else os.O_RDONLY)
            out = "ok"
        else:
            out = "bad command"
    except OSError as e:
        out = errno.errorcode[e.errno]
    except Interrupted:
        out = "EINTR"
    print(out, flush=True)
"""


class Locker:
    """One helper process holding ``path`` open, driven by :meth:`do`."""

    def __init__(self, path: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", SHELL, str(path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.answer(BOUND).split()
        assert ready[0] == "ready", ready
        self.pid = int(ready[1])

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def answer(self, timeout: float) -> str:
        """The next line, within ``timeout`` seconds ("" if none came)."""
        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        return self.p.stdout.readline().strip() if ready else ""

    def do(self, line: str) -> str:
        self.send(line)
        got = self.answer(BOUND)
        assert got, f"no answer to {line!r} within {BOUND}s"
        return got

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.p.kill()
        self.p.wait(10)


@contextlib.contextmanager
def lockers(*paths: Path) -> Iterator[list[Locker]]:
    made: list[Locker] = []
    try:
        for p in paths:
            made.append(Locker(p))
        yield made
    finally:
        for lk in made:
            lk.stop()


@pytest.fixture
def two_mounts(pg_place: PgPlace) -> Iterator[tuple[VaultEnv, Path, VaultEnv, Path]]:
    with machines_mounted(pg_place.url, "file://{root}/store", 2) as ((a, ma), (b, mb)):
        yield a, ma, b, mb


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + BOUND
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_fcntl_and_flock_locks_hold_across_two_machines(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path],
) -> None:
    _a, ma, _b, mb = two_mounts
    (ma / "f").write_bytes(b"x" * 1000)
    wait_for(mb / "f")
    with lockers(ma / "f", mb / "f", mb / "f") as (la, lb, lb2):
        assert la.do("lk W 0 100") == "ok"
        assert lb.do("lk W 50 10") == "EAGAIN"
        assert lb.do("lk R 0 1") == "EAGAIN"
        assert lb.do("get W 0 0") == f"W 0 100 {la.pid}"
        assert lb.do("lk W 100 100") == "ok"  # the range beside it
        assert la.do("get W 100 1") == f"W 100 100 {lb.pid}"
        assert lb2.do("lk W 100 1") == "EAGAIN"  # another owner on the same machine
        assert la.do("flock EX") == "ok"
        assert lb.do("flock EX NB") == "EAGAIN"  # (EWOULDBLOCK)
        assert lb2.do("flock SH NB") == "EAGAIN"
        assert lb.do("lk W 0 0") == "EAGAIN"  # flock and fcntl are independent: still a's
        # a blocking lock on b, granted once a unlocks
        lb.send("lkw W 0 100")
        assert lb.answer(0.5) == "", "granted while a holds it"
        t = time.monotonic()
        assert la.do("lk U 0 100") == "ok"
        assert lb.answer(BOUND) == "ok"
        print(f"F_SETLKW granted {time.monotonic() - t:.3f} s after the unlock")
        # a signal ends a blocked wait with EINTR
        lb2.send("lkw R 0 10")
        assert lb2.answer(0.5) == ""
        os.kill(lb2.pid, signal.SIGUSR1)
        assert lb2.answer(BOUND) == "EINTR"
        # a blocking flock on b, granted once a closes its descriptor (its last close)
        lb2.send("flock EX")
        assert lb2.answer(0.5) == ""
        t = time.monotonic()
        assert la.do("close") == "ok"
        assert lb2.answer(BOUND) == "ok"
        print(f"flock granted {time.monotonic() - t:.3f} s after the close")
        # b's POSIX locks go when b closes any descriptor of the file
        assert la.do("open") == "ok"
        assert la.do("lk W 0 1") == "EAGAIN"
        assert lb.do("close") == "ok"
        assert la.do("lk W 0 1000") == "ok"
        assert la.do("flock SH NB") == "EAGAIN"  # lb2's flock is still held
        # a read lock taken through a descriptor opened read-only goes at its close too (its
        # close is a flush: libfuse lets go of the engine's locks there)
        assert la.do("lk U 0 1000") == "ok"
        assert lb.do("openro") == "ok"
        assert lb.do("lk R 0 10") == "ok"
        assert la.do("lk W 0 10") == "EAGAIN"
        assert lb.do("close") == "ok"
        assert la.do("lk W 0 10") == "ok"


def test_a_killed_machines_locks_go_when_its_session_is_cleaned(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    _a, ma, b, mb = two_mounts
    (ma / "g").write_bytes(b"y" * 100)
    wait_for(mb / "g")
    with lockers(ma / "g", mb / "g") as (la, lb):
        assert lb.do("lk W 0 0") == "ok"
        assert lb.do("flock EX") == "ok"
        assert la.do("lk R 0 1") == "EAGAIN"
        assert len(pg_place.sql("SELECT k FROM locks")) == 2
        pid = int((b.data_dir / "mount.lock").read_text())
        os.kill(pid, signal.SIGKILL)
        lb.stop()
        force_unmount(str(mb))
        deadline = time.monotonic() + 30  # expiry (3 s) and a's next heartbeat (1 s)
        while la.do("lk R 0 1") != "ok":
            assert time.monotonic() < deadline, "the dead machine's lock stayed"
            time.sleep(0.2)
        assert la.do("flock EX NB") == "ok"
        while pg_place.sql("SELECT count(*) FROM sessions") != [(1,)]:
            assert time.monotonic() < deadline, "the dead session was not cleaned up"
            time.sleep(0.2)
        assert len(pg_place.sql("SELECT k FROM locks")) == 2  # a's two, b's gone



def test_many_waiting_locks_leave_the_mount_usable(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path],
) -> None:
    """More waiters than libfuse's default worker threads (10): the mount still answers."""
    _a, ma, _b, mb = two_mounts
    (ma / "h").write_bytes(b"z" * 100)
    wait_for(mb / "h")
    with lockers(ma / "h", *[mb / "h"] * 14) as (la, *waiters):
        assert la.do("lk W 0 100") == "ok"
        for w in waiters:
            w.send("lkw R 0 10")
        time.sleep(1)
        assert all(w.answer(0) == "" for w in waiters)  # all still waiting
        assert subprocess.run(["timeout", str(BOUND), "stat", str(mb / "h")],
                              capture_output=True).returncode == 0
        (mb / "other").write_text("still writable")
        assert la.do("lk U 0 100") == "ok"
        for w in waiters:  # read locks: all granted at once
            assert w.answer(BOUND) == "ok"


def test_a_vault_of_one_machine_keeps_the_kernels_locks(local_env: VaultEnv) -> None:
    """SQLite: the kernel's locks (no lock operation is registered: the SQLite engine has
    none) hold between processes of the machine, as before."""
    mp = local_env.root / "mnt"
    local_env.mount(mp)
    try:
        (mp / "f").write_bytes(b"x" * 10)
        with lockers(mp / "f", mp / "f") as (l1, l2):
            assert l1.do("lk W 0 5") == "ok"
            assert l2.do("lk W 0 1") == "EAGAIN"
            assert l2.do("get W 0 0") == f"W 0 5 {l1.pid}"
            assert l1.do("flock EX") == "ok"
            assert l2.do("flock SH NB") == "EAGAIN"
            l2.send("flock SH")
            assert l1.do("close") == "ok"
            assert l2.answer(BOUND) == "ok"
    finally:
        local_env.umount(mp)



def test_a_mount_stopped_while_a_lock_waits_exits(
    two_mounts: tuple[VaultEnv, Path, VaultEnv, Path], pg_place: PgPlace,
) -> None:
    """libfuse waits for its worker threads before the mount process ends: a lock waiting in
    one gives up when the FUSE session ends (here: the mount process told to stop)."""
    _a, ma, b, mb = two_mounts
    (ma / "w").write_bytes(b"w" * 10)
    wait_for(mb / "w")
    pid = int((b.data_dir / "mount.lock").read_text())
    with lockers(ma / "w", mb / "w") as (la, lb):
        assert la.do("lk W 0 10") == "ok"
        lb.send("lkw W 0 10")
        assert lb.answer(0.5) == ""
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and \
                "zombie" not in Path(f"/proc/{pid}/status").read_text():
            assert time.monotonic() < deadline, "the mount process still runs"
            time.sleep(0.1)
        assert lb.answer(BOUND) not in ("", "ok")  # the waiter failed
        assert pg_place.sql("SELECT count(*) FROM sessions") == [(1,)]  # b's went, with ...
        assert len(pg_place.sql("SELECT k FROM locks")) == 1  # ... its locks: a's is left
    force_unmount(str(mb))
