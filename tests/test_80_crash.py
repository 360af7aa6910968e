"""Crash consistency: ``kill -9`` the mount daemon while writers run, then check what survived.

What the durability contract (``cryptfs/fs/base.py``) promises after the daemon dies:

* a metadata operation (create, rename) that returned is committed;
* a file whose ``close`` returned has its complete data after the next mount; a file being
  written holds a prefix of what was written (at least up to its last completed close), never
  bytes nobody wrote;
* everything committed before an ``fsync`` started is in the *store* once the fsync returned:
  a new machine that has nothing but the store sees it;
* staged data that was not yet uploaded is uploaded at the next mount; ``cryptfs verify`` is
  clean after the remount and an unmount.

The writers are subprocesses (this file run as a script) that log each event to a local file
*after* the operation returned, with a CLOCK_MONOTONIC timestamp; file contents derive from a
seed and the file's name, so every state a file may be in is known.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 65536
SEED = 20240611
CREATE_COMMIT_SLACK_NS = 1_000_000_000  # fs.COMMIT_DELAY (0.1 s) plus scheduling slack
# writer kinds: how a file is written, whether it is fsynced ("edit-fsync": one file edited in
# place, a small overwrite or append at a time, each fsync'd, as a database does: its fsyncs
# journal the bytes, docs/FORMAT.md 5.3)
KINDS = ["whole-fsync", "whole", "append", "rename-fsync", "edit-fsync"]
WRITER_MAX_SECONDS = 30.0
WRITER_MAX_BYTES = 24 << 20


# --------------------------------------------------------------------------------------------
# what the writers write (shared by the writer processes and the checks)
# --------------------------------------------------------------------------------------------


def content_of(seed: int, writer: int, index: int) -> bytes:
    rng = random.Random(f"{seed}/{writer}/{index}")
    size = rng.choice([rng.randint(1, 300 * 1024), rng.randint(1, 5000), CHUNK, 2 * CHUNK + 1,
                       rng.randint(CHUNK, 4 * CHUNK)])
    return rng.randbytes(size)


def cuts_of(content: bytes) -> list[int]:
    """Sizes after each close of an "append" file: created empty, then three appends."""
    n = len(content)
    return [0, n // 3, 2 * n // 3, n]


def pieces(content: bytes, rng: random.Random) -> list[bytes]:
    """Split into 1-4 writes of random sizes (so writes straddle chunk boundaries)."""
    bounds = sorted(rng.sample(range(1, len(content)), min(3, len(content) - 1)))
    bounds = [0, *bounds[: rng.randint(0, 3)], len(content)]
    return [content[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def edit_of(seed: int, writer: int, k: int, length: int) -> tuple[int, bytes]:
    """Edit ``k`` (k >= 1) of an "edit-fsync" file of ``length`` bytes: (offset, bytes)."""
    rng = random.Random(f"{seed}/{writer}/edit/{k}")
    data = rng.randbytes(rng.randint(1, 3000))
    return (rng.randrange(length) if rng.random() < 0.7 else length), data


def edit_states(seed: int, writer: int, upto: int) -> Iterator[bytes]:
    """The contents of an "edit-fsync" file after its edits 0 (its first content) to ``upto``."""
    state = bytearray(random.Random(f"{seed}/{writer}/edit/0").randbytes(2 * CHUNK + 500))
    yield bytes(state)
    for k in range(1, upto + 1):
        off, data = edit_of(seed, writer, k, len(state))
        state[off:off + len(data)] = data
        yield bytes(state)


def _edit_writer(mnt: str, idx: int, seed: int, log: Any, write_all: Any) -> None:
    """An "edit-fsync" writer: ``w<idx>/db`` written, then edited in place; each state
    fsync'd, its number logged."""
    name = f"w{idx}/db"
    fd = os.open(os.path.join(mnt, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    log("created", name)
    try:
        first = next(edit_states(seed, idx, 0))
        write_all(fd, first)
        length = len(first)
        deadline = time.monotonic() + WRITER_MAX_SECONDS
        k = 0
        while True:
            log("fsync-start", name, k)
            os.fsync(fd)
            log("fsynced", name, k)
            k += 1
            if time.monotonic() > deadline:
                break
            off, data = edit_of(seed, idx, k, length)
            os.pwrite(fd, data, off)
            length = max(length, off + len(data))
    finally:
        os.close(fd)


def writer_main(argv: list[str]) -> int:
    """``test_80_crash.py --writer MNT LOG INDEX KIND SEED``: write files until the mount dies
    (or a time/byte limit), logging "<event> <name> <k> <monotonic ns>" after each step."""
    mnt, log_path, idx_s, kind, seed_s = argv
    idx, seed = int(idx_s), int(seed_s)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rng = random.Random(f"pieces/{seed}/{idx}")

    def log(event: str, name: str = "-", k: int = 0) -> None:
        os.write(log_fd, f"{event} {name} {k} {time.monotonic_ns()}\n".encode())

    def write_all(fd: int, data: bytes) -> None:
        for part in pieces(data, rng):
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]

    log("ready")
    if kind == "edit-fsync":
        try:
            _edit_writer(mnt, idx, seed, log, write_all)
        except OSError as e:  # the mount died under us
            log("error", errno.errorcode.get(e.errno or 0, str(e.errno)))
        log("done", "-", 0)
        return 0
    deadline = time.monotonic() + WRITER_MAX_SECONDS
    written = 0
    j = 0
    try:
        while time.monotonic() < deadline and written < WRITER_MAX_BYTES:
            data = content_of(seed, idx, j)
            name = f"w{idx}/f{j:04d}"
            path = os.path.join(mnt, name)
            if kind in ("whole", "whole-fsync"):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                log("created", name)
                try:
                    write_all(fd, data)
                    if kind == "whole-fsync":
                        log("fsync-start", name)
                        os.fsync(fd)
                        log("fsynced", name)
                finally:
                    os.close(fd)
                log("closed", name)
            elif kind == "append":
                cuts = cuts_of(data)
                for k in range(1, len(cuts)):
                    flags = os.O_CREAT | os.O_WRONLY | os.O_APPEND | (os.O_EXCL if k == 1 else 0)
                    fd = os.open(path, flags, 0o644)
                    if k == 1:
                        log("created", name)
                    try:
                        write_all(fd, data[cuts[k - 1]:cuts[k]])
                    finally:
                        os.close(fd)
                    log("closed", name, k)
            elif kind == "rename-fsync":
                tmp = f"w{idx}/t{j:04d}"
                fd = os.open(os.path.join(mnt, tmp), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                log("created", tmp)
                try:
                    write_all(fd, data)
                    log("fsync-start", tmp)
                    os.fsync(fd)
                    log("fsynced", tmp)
                finally:
                    os.close(fd)
                log("closed", tmp)
                os.rename(os.path.join(mnt, tmp), path)
                log("renamed", name)
            else:
                raise SystemExit(f"unknown writer kind {kind}")
            written += len(data)
            j += 1
    except OSError as e:  # the mount died under us
        log("error", errno.errorcode.get(e.errno or 0, str(e.errno)))
    log("done", "-", j)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--writer":
    sys.exit(writer_main(sys.argv[2:]))


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------

import pytest  # noqa: E402  (the writer processes above need only the standard library)

# crashes make the daemon log warnings and errors on purpose
pytestmark = pytest.mark.log_problems_expected
from mount_fixtures import VaultEnv, _mounted, force_unmount  # noqa: E402


def _new_root(prefix: str) -> Path:
    # not "cryptfs-test-": other pytest sessions on this machine kill processes matching that
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    return root


@dataclass
class Event:
    what: str
    name: str
    k: int
    t: int


@dataclass
class WriterLog:
    index: int
    kind: str
    events: list[Event] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, index: int, kind: str) -> WriterLog:
        wl = cls(index, kind)
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:  # each line is one write(2) of an O_APPEND file: never torn
                wl.events.append(Event(parts[0], parts[1], int(parts[2]), int(parts[3])))
        return wl

    def logged(self, what: str, name: str, before: float) -> list[Event]:
        return [e for e in self.events if e.what == what and e.name == name and e.t <= before]


def fsync_cutoff(logs: list[WriterLog]) -> float:
    """The latest start of an fsync that returned: everything logged before it is in the store."""
    best = float("-inf")
    for wl in logs:
        for e in wl.events:
            if e.what == "fsynced":
                starts = [s.t for s in wl.logged("fsync-start", e.name, e.t)]
                if starts:
                    best = max(best, max(starts))
    return best


def tails(logs: list[WriterLog]) -> str:
    """The last events of each writer, for failure messages."""
    out = ["", "last events of the writers:"]
    for wl in logs:
        last = " | ".join(f"{e.what} {e.name} {e.k}" for e in wl.events[-4:])
        out.append(f"  w{wl.index} ({wl.kind}): {last}")
    return "\n".join(out)


def read_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for d in sorted(root.iterdir()):
        if d.is_dir():
            for f in sorted(d.iterdir()):
                out[f"{d.name}/{f.name}"] = f.read_bytes()
        else:
            out[d.name] = d.read_bytes()
    return out


def check_tree(tree: dict[str, bytes], logs: list[WriterLog], seed: int,
               before: float, created_before: float | None = None) -> list[str]:
    """Problems with ``tree`` given what the writers logged up to time ``before`` (events after
    it, and operations that returned without being logged, may or may not be reflected). A
    file must exist if its create was logged before ``created_before`` (default ``before``):
    a create is committed with the file's close or within the commit delay.

    Each writer writes a file sequentially, so what may be on disk after a crash is a *prefix*
    of the file's content: at least up to its last close logged before ``before`` (more may
    have been committed: a close that returned unlogged, or an early commit of buffered data),
    at most what the writer had written. Anything else (other bytes, zeros, a longer file) is
    garbage. A file renamed into place was complete before the rename, so the final name holds
    the complete content or nothing."""
    problems: list[str] = []
    seen: set[str] = set()
    if created_before is None:
        created_before = before

    def describe(data: bytes | None) -> str:
        if data is None:
            return "absent"
        return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}"

    def prefix_problem(got: bytes | None, full: bytes, low: int, high: int,
                       must_exist: bool) -> str | None:
        if got is None:
            return "its create returned before the crash, but it is gone" if must_exist else None
        if got != full[:len(got)]:
            first = next(i for i in range(len(got)) if i >= len(full) or got[i] != full[i])
            return f"garbage: not a prefix of what was written (differs from byte {first})"
        if not low <= len(got) <= high:
            return f"expected between {low} and {high} bytes of its {len(full)}"
        return None

    for wl in logs:
        if wl.kind == "edit-fsync":  # one file: one of its states from the last fsync'd on
            name = f"w{wl.index}/db"
            seen.add(name)
            got = tree.get(name)
            done = max((e.k for e in wl.logged("fsynced", name, before)), default=-1)
            started = max((e.k for e in wl.events if e.what == "fsync-start"), default=-1)
            if got is None:
                if wl.logged("created", name, created_before):
                    problems.append(f"{name} ({wl.kind}): its create returned before the "
                                    "crash, but it is gone")
                continue
            if not (done < 0 and got == b"") and not any(
                    k >= done and state == got
                    for k, state in enumerate(edit_states(seed, wl.index, max(started, 0)))):
                problems.append(f"{name} ({wl.kind}): {describe(got)} is none of its states "
                                f"from {done} (the last fsync'd) to {started}")
            continue
        top = max((e.k for e in wl.events if e.what == "done"), default=None)
        names = [e.name for e in wl.events if e.what in ("created", "renamed")]
        last = max((int(n.split("/")[1][1:]) for n in names), default=-1)
        upto = (top if top is not None else last + 1) + 1  # the one in flight, if any
        for j in range(upto):
            full = content_of(seed, wl.index, j)
            name = f"w{wl.index}/f{j:04d}"
            got = tree.get(name)
            seen.add(name)
            msg: str | None = None
            if wl.kind in ("whole", "whole-fsync"):
                done = wl.logged("closed", name, before) or wl.logged("fsynced", name, before)
                created = bool(wl.logged("created", name, created_before))
                msg = prefix_problem(got, full, len(full) if done else 0, len(full), created)
            elif wl.kind == "append":
                cuts = cuts_of(full)
                done_k = max((e.k for e in wl.logged("closed", name, before)), default=0)
                all_k = max((e.k for e in wl.events if e.what == "closed" and e.name == name),
                            default=0)
                created = bool(wl.logged("created", name, created_before))
                msg = prefix_problem(got, full, cuts[done_k], cuts[min(all_k + 1, 3)], created)
            elif wl.kind == "rename-fsync":
                tmp = f"w{wl.index}/t{j:04d}"
                seen.add(tmp)
                got_tmp = tree.get(tmp)
                renamed = wl.logged("renamed", name, before)
                tmp_done = wl.logged("fsynced", tmp, before) or wl.logged("closed", tmp, before)
                tmp_created = bool(wl.logged("created", tmp, created_before))
                if got is not None and got != full:
                    msg = "renamed into place after a complete write, but its content differs"
                elif renamed and got is None:
                    msg = "its rename returned before the crash, but it is gone"
                elif got is not None and got_tmp is not None:
                    msg = f"both the temporary name and the final name exist ({tmp})"
                elif got is None:
                    tmp_msg = prefix_problem(got_tmp, full, len(full) if tmp_done else 0,
                                             len(full), tmp_created)
                    if tmp_msg:
                        problems.append(f"{tmp} ({wl.kind}): {tmp_msg}; it is "
                                        f"{describe(got_tmp)}")
            if msg:
                problems.append(f"{name} ({wl.kind}): {msg}; it is {describe(got)}")
    for name in sorted(set(tree) - seen):
        problems.append(f"{name}: a name no writer created ({describe(tree[name])})")
    return problems


def _pid_of_daemon(env: VaultEnv) -> int:
    return int((env.data_dir / "mount.lock").read_text().strip())


PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def reaping_daemons() -> Iterator[list[int]]:
    """Make this process the reaper of the daemons it starts (``cryptfs mount`` forks them and
    exits), so a killed daemon can be reaped: an unreaped zombie still "exists" for kill(pid, 0)
    and its lease would count as held (where PID 1 does not reap, e.g. in some containers).
    Yields a list to put daemon pids in; they are reaped at the end."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pids: list[int] = []
    try:
        yield pids
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def mount(env: VaultEnv, mnt: Path, pids: list[int], *opts: str) -> None:
    env.mount(mnt, *opts)
    pids.append(_pid_of_daemon(env))


def _wait_released(env: VaultEnv, timeout: float = 20.0) -> None:
    """Wait until the daemon's lock on mount.lock is gone (it died or finished)."""
    fd = os.open(env.data_dir / "mount.lock", os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the daemon still holds its lock after {timeout} s"
                    ) from None
                time.sleep(0.05)
    finally:
        os.close(fd)


def kill_daemon(env: VaultEnv, mnt: Path) -> None:
    """kill -9 the daemon serving ``mnt``, reap it, detach the dead mount."""
    pid = _pid_of_daemon(env)
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)  # our child through reaping_daemons()
    except ChildProcessError:
        pass
    _wait_released(env)
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)
    assert not _mounted(str(mnt))


@pytest.fixture
def crash_env(request: pytest.FixtureRequest, store_kind: str
              ) -> Iterator[tuple[VaultEnv, list[int]]]:
    """A fresh vault (64 KiB chunks) and the list of its daemons' pids; unmounts at the end."""
    root = _new_root("cfs-crash-")
    url = f"file://{root}/store" if store_kind == "local" else request.getfixturevalue("s3_url")
    env = VaultEnv(root, url)
    env.init("--chunk-size", str(CHUNK))
    try:
        with reaping_daemons() as pids:
            yield env, pids
    finally:
        for mp in (root / "mnt", root / "newmachine" / "mnt"):
            if _mounted(str(mp)):
                force_unmount(str(mp))
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _start_writers(mnt: Path, logdir: Path, seed: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(len(KINDS)):
        (mnt / f"w{i}").mkdir()
    fd = os.open(mnt, os.O_RDONLY)  # the directories reach the store
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for i, kind in enumerate(KINDS):
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--writer", str(mnt), str(logdir / f"w{i}.log"), str(i),
             kind, str(seed)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 30
    for i in range(len(KINDS)):
        log = logdir / f"w{i}.log"
        while not (log.exists() and log.read_text().startswith("ready")):
            if time.monotonic() > deadline:
                raise AssertionError("the writers did not start within 30 s")
            time.sleep(0.02)
    return procs


def _stop_writers(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> list[str]:
    """Wait for the writers (they stop when the mount dies); kill stragglers. Their stderr."""
    errs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            _out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _out, err = p.communicate()
            errs.append(f"writer {p.pid} hung and was killed")
        if err:
            errs.append(err.decode(errors="replace"))
    return errs


def assert_verifies(env: VaultEnv) -> None:
    """``cryptfs verify`` must be clean. On failure, say whether ``cryptfs gc --grace 0`` (which
    deletes the objects nothing references) would have made it clean."""
    res = env.cli("verify", check=False)
    if res.returncode == 0:
        return
    gc = env.cli("gc", "--grace", "0", check=False)
    again = env.cli("verify", check=False)
    raise AssertionError(
        f"verify after the crash exited {res.returncode}:\n{res.stdout}{res.stderr}"
        f"(after 'cryptfs gc --grace 0' [exit {gc.returncode}] verify exits {again.returncode}"
        f"{': ' + again.stdout.strip() if again.returncode else ''})"
    )


def _store_only_view(env: VaultEnv, root: Path) -> dict[str, bytes]:
    """Attach the vault on a "new machine" (fresh XDG dirs) from the store alone, read-only."""
    (root / "newmachine").mkdir(exist_ok=True)
    other = VaultEnv(root / "newmachine", env.store_url)
    other.init()  # attaches the existing vault
    mnt2 = root / "newmachine" / "mnt"
    other.mount(mnt2, "ro")
    try:
        return read_tree(mnt2)
    finally:
        other.umount(mnt2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kill_after", [0.2, 0.8, 2.0])
def test_kill_during_writes(crash_env: tuple[VaultEnv, list[int]], kill_after: float) -> None:
    env, pids = crash_env
    mnt = env.root / "mnt"
    logdir = env.root / "logs"
    logdir.mkdir()
    mount(env, mnt, pids)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = _start_writers(mnt, logdir, SEED)
        time.sleep(kill_after)
        killed_ns = time.monotonic_ns()
        kill_daemon(env, mnt)
    finally:
        if _mounted(str(mnt)):
            force_unmount(str(mnt))
        errs = _stop_writers(procs)
    assert not errs, "writer trouble:\n" + "\n".join(errs)
    logs = [WriterLog.read(logdir / f"w{i}.log", i, k) for i, k in enumerate(KINDS)]
    files = sum(1 for wl in logs for e in wl.events if e.what == "created")
    fsyncs = sum(1 for wl in logs for e in wl.events if e.what == "fsynced")
    print(f"\nkilled after {kill_after} s: {files} files created, {fsyncs} fsyncs returned")

    # a new machine with only the store sees everything committed before the last fsync began
    cutoff = fsync_cutoff(logs)
    problems = check_tree(_store_only_view(env, env.root), logs, SEED, cutoff)
    assert not problems, (
        "from the store alone, after the crash:\n" + "\n".join(problems) + tails(logs)
    )

    # this machine, remounted: everything whose close returned
    mount(env, mnt, pids)
    try:
        tree = read_tree(mnt)
    finally:
        env.umount(mnt)
    # a file created but not closed is committed within the commit delay (0.1 s; 1 s of
    # slack for a loaded machine)
    problems = check_tree(tree, logs, SEED, float("inf"), killed_ns - CREATE_COMMIT_SLACK_NS)
    assert not problems, "after the crash and a remount:\n" + "\n".join(problems) + tails(logs)
    assert_verifies(env)


# --------------------------------------------------------------------------------------------
# the simplest case, deterministic: close, then kill
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_kill_after_close(crash_env: tuple[VaultEnv, list[int]]) -> None:
    """mkdir, a file written and closed, a file created and written but still open; kill -9.
    After a remount the directory exists and the closed file is complete (metadata operations
    and close commit); the open file exists (its create was committed within the commit delay)
    and holds a prefix of what was written. The vault verifies clean afterwards."""
    env, pids = crash_env
    mnt = env.root / "mnt"
    closed = random.Random(1).randbytes(2 * CHUNK + 77)
    unclosed = random.Random(2).randbytes(CHUNK + 5)
    mount(env, mnt, pids)
    try:
        (mnt / "d").mkdir()
        with open(mnt / "closed", "wb") as f:
            f.write(closed)
        open_file = open(mnt / "open", "wb")
        open_file.write(unclosed)  # chunk 0 is sealed and stored, nothing is committed
        open_file.flush()  # (Python's buffer, not a FUSE flush)
        time.sleep(CREATE_COMMIT_SLACK_NS / 1e9)  # its create is committed by then
        kill_daemon(env, mnt)
        with contextlib.suppress(OSError):
            open_file.close()
    finally:
        if _mounted(str(mnt)):
            force_unmount(str(mnt))

    mount(env, mnt, pids)
    try:
        names = sorted(os.listdir(mnt))
        got = (mnt / "closed").read_bytes() if (mnt / "closed").exists() else None
        got_open = (mnt / "open").read_bytes() if (mnt / "open").exists() else None
    finally:
        env.umount(mnt)
    assert names == ["closed", "d", "open"], f"after kill -9 and a remount the root holds {names}"
    assert got == closed, "the closed file lost data"
    assert got_open is not None and got_open == unclosed[: len(got_open)], "garbage in 'open'"
    assert_verifies(env)


# --------------------------------------------------------------------------------------------
# the journal (docs/FORMAT.md 5.3): fsync'd bytes not sealed into a chunk when the mount died
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_kill_after_a_journaled_fsync(crash_env: tuple[VaultEnv, list[int]]) -> None:
    """A closed file changed a little (a few bytes of a full chunk, an append to the last) and
    fsync'd: the fsync journals the bytes instead of sealing the chunks again. Then changed
    again without an fsync, and kill -9. The remount seals the journaled bytes into chunks
    (the local database keeps no journal row), the file holds exactly what was fsync'd, the
    vault verifies clean, and a machine with the store alone reads the same."""
    import sqlite3

    env, pids = crash_env
    mnt = env.root / "mnt"
    content = bytearray(random.Random(3).randbytes(2 * CHUNK + 100))
    mount(env, mnt, pids)
    try:
        (mnt / "db").write_bytes(content)
        fd = os.open(mnt / "db", os.O_RDWR)
        try:
            os.pwrite(fd, b"J" * 300, CHUNK + 10)
            os.pwrite(fd, b"T" * 500, 2 * CHUNK + 100)
            os.fsync(fd)
            content[CHUNK + 10:CHUNK + 310] = b"J" * 300
            content += b"T" * 500
            con = sqlite3.connect(env.db)
            try:
                rows = con.execute("SELECT idx, seq, off FROM journal ORDER BY idx").fetchall()
            finally:
                con.close()
            assert rows == [(1, 0, 10), (2, 0, 100)], f"the fsync journaled {rows}"
            os.pwrite(fd, b"L" * 300, CHUNK + 10)  # not fsync'd: lost with the daemon
            kill_daemon(env, mnt)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    finally:
        if _mounted(str(mnt)):
            force_unmount(str(mnt))

    mount(env, mnt, pids)
    try:
        got = (mnt / "db").read_bytes()
        con = sqlite3.connect(env.db)
        try:
            left = con.execute("SELECT count(*) FROM journal").fetchone()[0]
        finally:
            con.close()
    finally:
        env.umount(mnt)
    assert got == bytes(content), "the remount does not read what was fsync'd"
    assert left == 0, "journal rows left after the remount sealed them"
    assert "sealed from the journal" in env.log_text()
    assert_verifies(env)
    assert _store_only_view(env, env.root)["db"] == bytes(content)


# --------------------------------------------------------------------------------------------
# staged data left by a crash is uploaded at the next mount
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("uploads", ["blocked", "racing"])
def test_staged_data_uploaded_after_kill(
    s3_server: Any, s3_client: Any, s3_bucket: str, uploads: str
) -> None:
    """S3: write and close (no fsync), kill -9 at once, remount and unmount; then a machine with
    nothing but the store has the file. ``blocked``: the store answers 500 to every PUT until
    the kill, so the data is certainly still staged; ``racing``: the kill races the uploads."""
    from faultproxy import FaultProxy

    root = _new_root("cfs-staged-")
    mnt = root / "mnt"
    content = random.Random(7).randbytes(3 * CHUNK + 1000)
    try:
        with FaultProxy(s3_server.endpoint) as proxy, reaping_daemons() as pids:
            env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={proxy.endpoint}")
            env.init("--chunk-size", str(CHUNK))
            mount(env, mnt, pids)
            if uploads == "blocked":
                proxy.set_fault("error500", methods={"PUT"})
            with open(mnt / "f", "wb") as f:
                f.write(content)
            if uploads == "blocked":
                staged = [p for p in (env.data_dir / "staging").iterdir()
                          if not p.name.endswith(".tmp")]
                assert len(staged) == 4, f"expected 4 staged chunks, found {staged}"
                listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="vault/data/")
                assert listed.get("KeyCount", 0) == 0, "a chunk reached the store despite 500s"
            kill_daemon(env, mnt)
            proxy.clear()

            mount(env, mnt, pids)  # resumes the staged uploads
            try:
                # FAILS (bug: close did not commit, see test_kill_after_close)
                assert (mnt / "f").exists(), "the closed file is gone after kill -9"
                assert (mnt / "f").read_bytes() == content
            finally:
                env.umount(mnt)  # waits until everything is stored, writes a checkpoint
            left = sorted(p.name for p in (env.data_dir / "staging").iterdir())
            assert not left, f"staged files left after a clean unmount: {left}"

            # the store alone: drop all local state and the cache, then mount again
            subprocess.run(["rm", "-rf", str(env.data_dir), str(root / "cache")], check=True)
            mount(env, mnt, pids)
            try:
                got = (mnt / "f").read_bytes() if (mnt / "f").exists() else None
            finally:
                env.umount(mnt)
            assert got == content, (
                f"from the store alone the file has {None if got is None else len(got)} bytes, "
                f"expected {len(content)}"
            )
            assert_verifies(env)
    finally:
        if _mounted(str(mnt)):
            force_unmount(str(mnt))
        subprocess.run(["rm", "-rf", str(root)], check=False)
