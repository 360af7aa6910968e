"""Model-based test: random operation sequences on a cryptfs mount and on a local directory.

A Hypothesis :class:`RuleBasedStateMachine` applies the same operation (create, write at random
offsets across chunk boundaries, truncate, rename, link, unlink, mkdir, rmdir, symlink, chmod,
setxattr/removexattr, fsync) to a fresh cryptfs mount and to a reference directory on the local
disk, and sometimes remounts (cleanly, or after ``kill -9`` of the daemon: every operation had
returned and every file was closed, so the durability contract says nothing may be lost).

The outcome of each operation must match (the same errno when the reference fails), and after
every step both trees must be identical: names, file types, modes, sizes, contents, link
counts, which names are hard links of each other, symlink targets and ``user.*`` xattrs (times
and inode numbers are ignored). Each example gets its own vault (chunk size 64 KiB, so writes
of up to 300 KB cross chunk boundaries) and mount; at the end the vault is unmounted and
``cryptfs verify`` must report it clean.

Runs a fixed (derandomized) set of examples that takes under a minute. For a longer run, and
for other random sequences than the fixed ones::

    CRYPTFS_MODEL_EXAMPLES=200 CRYPTFS_MODEL_STEPS=80 pytest -s tests/test_70_model.py
    CRYPTFS_MODEL_RANDOM=1 pytest tests/test_70_model.py --hypothesis-seed=12345

``CRYPTFS_MODEL_PATTERN=0`` leaves out data made of one repeated byte (identical chunks). With
``-s`` the outcome counts per rule are printed. A failure is shrunk and printed as a sequence of
steps (``Draw n (path)`` lines name the paths); shrinking remounts many times and can take a
few minutes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mount_fixtures import VaultEnv, _mounted, force_unmount

CHUNK = 65536
EXAMPLES = int(os.environ.get("CRYPTFS_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("CRYPTFS_MODEL_STEPS", "50"))
# data made of one repeated byte: consecutive chunks with the same plaintext (deduplication)
PATTERN_DATA = os.environ.get("CRYPTFS_MODEL_PATTERN", "1") != "0"

MAX_REMOUNTS = 4  # per example (remounts and kills): one costs as much as ~50 other steps
PR_SET_CHILD_SUBREAPER = 36
DAEMONS: list[int] = []  # pids of the mount daemons started, reaped at the end

NAMES = ["a", "b", "c"]
LEVEL1 = NAMES
LEVEL2 = [f"{x}/{y}" for x in NAMES for y in NAMES]
# symlink targets are relative and never leave the tree (no "..", no absolute paths)
targets = st.sampled_from(LEVEL1 + LEVEL2 + ["missing", "a/../b", "c/b/b"])

_AROUND_CHUNKS = [k * CHUNK + d for k in range(6) for d in (-1, 0, 1) if k * CHUNK + d >= 0]
offsets = st.one_of(st.integers(0, 400_000), st.sampled_from(_AROUND_CHUNKS))
sizes = st.one_of(
    st.integers(0, 300 * 1024),
    st.sampled_from([0, 1, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 300 * 1024]),
)
lengths = st.one_of(st.integers(0, 400_000), st.sampled_from(_AROUND_CHUNKS))
modes = st.integers(0, 0o7777)
kinds = st.sampled_from(["random", "pattern", "zeros"] if PATTERN_DATA else ["random", "zeros"])
xattr_names = st.sampled_from(["user.a", "user.b", "user.long." + "x" * 100])
# ext4 (the reference) keeps all xattrs of an inode in one 4 KiB block: stay well below
xattr_values = st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"\0", b"v" * 1000]))
xattr_flags = st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE])


def make_data(kind: str, seed: int, size: int) -> bytes:
    if kind == "zeros":
        return bytes(size)
    if kind == "pattern":
        return bytes([1 + seed % 255]) * size
    return random.Random(seed).randbytes(size)


def _user_xattrs_supported(directory: str) -> bool:
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        try:
            os.setxattr(f.name, "user.probe", b"1")
            return True
        except OSError:
            return False


# the reference lives in /tmp: a tmpfs before Linux 6.6 has no user.* xattrs
XATTRS_ON_REFERENCE = _user_xattrs_supported("/tmp")


def _new_root(prefix: str) -> Path:
    # not "cryptfs-test-": other pytest sessions on this machine kill processes matching that
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    return root


Outcome = tuple[str, Any]
STATS: Counter[str] = Counter()  # outcomes per rule, printed at the end (pytest -s)


def outcome(fn: Callable[[str], Any], base: str) -> Outcome:
    try:
        return ("ok", fn(base))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, e.errno))


def snapshot(root: str) -> tuple[dict[str, tuple[Any, ...]], set[frozenset[str]]]:
    """Everything the model compares: one record per name, and the hard-link groups."""
    entries: dict[str, tuple[Any, ...]] = {}
    by_inode: dict[int, set[str]] = {}

    def xattrs(p: str, st_mode: int) -> tuple[tuple[str, bytes], ...]:
        if stat.S_ISLNK(st_mode):  # user.* xattrs are not allowed on symlinks
            return ()
        names = sorted(n for n in os.listxattr(p, follow_symlinks=False) if n.startswith("user."))
        return tuple((n, os.getxattr(p, n, follow_symlinks=False)) for n in names)

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(full)):
            r = f"{rel}/{name}" if rel else name
            p = os.path.join(root, r)
            s = os.lstat(p)
            fmt = stat.S_IFMT(s.st_mode)
            rec: tuple[Any, ...] = (stat.filemode(s.st_mode), oct(s.st_mode), s.st_nlink)
            if fmt == stat.S_IFREG:
                with open(p, "rb") as f:
                    data = f.read()
                rec += (s.st_size, len(data), data)
                by_inode.setdefault(s.st_ino, set()).add(r)
            elif fmt == stat.S_IFLNK:
                rec += (s.st_size, os.readlink(p))
                by_inode.setdefault(s.st_ino, set()).add(r)
            rec += (xattrs(p, s.st_mode),)
            entries[r] = rec
            if fmt == stat.S_IFDIR:
                walk(r)

    walk("")
    groups = {frozenset(g) for g in by_inode.values() if len(g) > 1}
    return entries, groups


def describe_diff(ref: dict[str, tuple[Any, ...]], mnt: dict[str, tuple[Any, ...]]) -> str:
    lines = []
    for name in sorted(set(ref) | set(mnt)):
        a, b = ref.get(name), mnt.get(name)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{name}: reference {'missing' if a is None else a[:3]}, "
                         f"cryptfs {'missing' if b is None else b[:3]}")
            continue
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x == y:
                continue
            if isinstance(x, bytes) and isinstance(y, bytes) and max(len(x), len(y)) > 64:
                first = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]),
                             min(len(x), len(y)))
                lines.append(f"{name}: field {i}: contents differ from byte {first} "
                             f"(reference {len(x)} bytes, cryptfs {len(y)} bytes; "
                             f"reference {x[first:first + 8]!r}, cryptfs {y[first:first + 8]!r})")
            else:
                lines.append(f"{name}: field {i}: reference {x!r}, cryptfs {y!r}")
    return "\n".join(lines)


class CryptfsModel(RuleBasedStateMachine):
    """One fresh vault and mount per example, compared with a reference directory."""

    def __init__(self) -> None:
        super().__init__()
        self.root = _new_root("cfs-model-")
        self.ref = self.root / "ref"
        self.ref.mkdir()
        self.mnt = self.root / "mnt"
        self.env = VaultEnv(self.root, f"file://{self.root}/store")
        self.is_mounted = False
        self.remounts = 0
        self.clean = False  # True only after a step and its checks passed
        self.old_umask = os.umask(0o022)
        try:
            self.env.init("--chunk-size", str(CHUNK))
            self.mount()
        except BaseException:
            self._cleanup()
            raise

    # -- plumbing ---------------------------------------------------------------------------
    def mount(self) -> None:
        self.env.mount(self.mnt)
        self.is_mounted = True
        DAEMONS.append(self.daemon_pid())

    def daemon_pid(self) -> int:
        return int((self.env.data_dir / "mount.lock").read_text().strip())

    def _cleanup(self) -> None:
        os.umask(self.old_umask)
        if self.is_mounted or _mounted(str(self.mnt)):
            try:
                self.env.umount(self.mnt)
            except BaseException:
                force_unmount(str(self.mnt))
            self.is_mounted = False
        subprocess.run(["rm", "-rf", str(self.root)], check=False)

    def teardown(self) -> None:
        try:
            if self.clean and self.is_mounted:
                self.env.umount(self.mnt)
                self.is_mounted = False
                res = self.env.cli("verify", check=False)
                assert res.returncode == 0, (
                    f"cryptfs verify after the run exited {res.returncode}:\n{res.stdout}"
                    f"{res.stderr}"
                )
        finally:
            self._cleanup()

    def path_strategy(self, prefer: str = "any") -> st.SearchStrategy[str]:
        """Names that exist in the reference (files, directories, symlinks), new names in
        existing directories, and sometimes any path (for the error cases); ``prefer`` ("file",
        "dir", "new") weights one kind."""
        by_kind: dict[str, list[str]] = {"file": [], "dir": [], "link": []}
        dirs = [""]
        todo = [""]
        while todo:
            rel = todo.pop()
            for name in sorted(os.listdir(self.ref / rel)):
                r = f"{rel}/{name}" if rel else name
                m = os.lstat(self.ref / r).st_mode
                kind = "dir" if stat.S_ISDIR(m) else "link" if stat.S_ISLNK(m) else "file"
                by_kind[kind].append(r)
                if kind == "dir":
                    todo.append(r)
                    dirs.append(r)
        existing = {p for v in by_kind.values() for p in v}
        fresh = [f"{d}/{n}" if d else n for d in dirs if d.count("/") < 2 for n in NAMES]
        by_kind["new"] = [p for p in fresh if p not in existing]
        # one flat list, weighted by repetition: Hypothesis draws an index into it
        flat: list[str] = []
        for kind in ("file", "dir", "link", "new"):
            flat += sorted(by_kind[kind]) * (4 if kind == prefer else 1)
        flat += ["a/b", "b/c/a", "missing"]  # wherever these exist, they fail the same way
        return st.sampled_from(flat)

    def pick(self, data: st.DataObject, label: str, prefer: str = "any") -> str:
        return data.draw(self.path_strategy(prefer), label=label)

    def both(self, fn: Callable[[str], Any]) -> Outcome:
        """Apply ``fn(base)`` to the reference, then to the mount; the outcomes must match."""
        self.clean = False
        expected = outcome(fn, str(self.ref))
        got = outcome(fn, str(self.mnt))
        assert got == expected, f"reference gave {expected}, cryptfs gave {got}"
        rule_name = sys._getframe(1).f_code.co_name
        label = f"{rule_name}: {got[0] if got[0] == 'ok' else got[1]}"
        event(label)
        STATS[label] += 1
        return got

    # -- rules ------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**32))
    def populate(self, seed: int) -> None:
        """Start from a small tree: files of several chunks, one chunk, less, none; two levels
        of directories."""
        sizes_ = {"a": 3 * CHUNK + 123, "b": CHUNK, "c/a": 1000, "c/c": 0, "c/b/b": 5 * CHUNK}
        self.both(lambda base: os.mkdir(os.path.join(base, "c"), 0o755))
        self.both(lambda base: os.mkdir(os.path.join(base, "c/b"), 0o700))
        for name, size in sizes_.items():
            content = make_data("random", seed, size)

            def op(base: str, name: str = name, content: bytes = content) -> None:
                with open(os.path.join(base, name), "wb") as f:
                    f.write(content)

            self.both(op)

    @rule(data=st.data(), mode=modes, excl=st.booleans(), trunc=st.booleans())
    def create(self, data: st.DataObject, mode: int, excl: bool, trunc: bool) -> None:
        path = self.pick(data, "path", "new")
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)

        def op(base: str) -> None:
            os.close(os.open(os.path.join(base, path), flags, mode))

        self.both(op)

    @rule(data=st.data(), offset=offsets, size=sizes, kind=kinds, seed=st.integers(0, 2**32),
          append=st.booleans(), sync=st.booleans(), creat=st.booleans())
    def write(self, data: st.DataObject, offset: int, size: int, kind: str, seed: int,
              append: bool, sync: bool, creat: bool) -> None:
        path = self.pick(data, "path", "file")
        content = make_data(kind, seed, size)
        flags = os.O_WRONLY | (os.O_APPEND if append else 0) | (os.O_CREAT if creat else 0)

        def op(base: str) -> int:
            fd = os.open(os.path.join(base, path), flags, 0o644)
            try:
                n = os.write(fd, content) if append else os.pwrite(fd, content, offset)
                if sync:
                    os.fsync(fd)
                return n
            finally:
                os.close(fd)

        self.both(op)

    @rule(data=st.data(), length=lengths)
    def truncate(self, data: st.DataObject, length: int) -> None:
        path = self.pick(data, "path", "file")
        self.both(lambda base: os.truncate(os.path.join(base, path), length))

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        src, dst = self.pick(data, "src"), self.pick(data, "dst", "new")
        self.both(lambda base: os.rename(os.path.join(base, src), os.path.join(base, dst)))

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        src, dst = self.pick(data, "src", "file"), self.pick(data, "dst", "new")
        self.both(lambda base: os.link(os.path.join(base, src), os.path.join(base, dst),
                                       follow_symlinks=False))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.pick(data, "path", "file")
        self.both(lambda base: os.unlink(os.path.join(base, path)))

    @rule(data=st.data(), mode=modes)
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        path = self.pick(data, "path", "new")
        self.both(lambda base: os.mkdir(os.path.join(base, path), mode))

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.pick(data, "path", "dir")
        self.both(lambda base: os.rmdir(os.path.join(base, path)))

    @rule(data=st.data(), dest=targets)
    def symlink(self, data: st.DataObject, dest: str) -> None:
        path = self.pick(data, "path", "new")
        self.both(lambda base: os.symlink(dest, os.path.join(base, path)))

    @rule(data=st.data(), mode=modes)
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.pick(data, "path")
        self.both(lambda base: os.chmod(os.path.join(base, path), mode))

    @precondition(lambda self: XATTRS_ON_REFERENCE)
    @rule(data=st.data(), name=xattr_names, value=xattr_values, flags=xattr_flags,
          follow=st.booleans())
    def setxattr(self, data: st.DataObject, name: str, value: bytes, flags: int,
                 follow: bool) -> None:
        path = self.pick(data, "path")
        self.both(lambda base: os.setxattr(os.path.join(base, path), name, value, flags,
                                           follow_symlinks=follow))

    @precondition(lambda self: XATTRS_ON_REFERENCE)
    @rule(data=st.data(), name=xattr_names)
    def removexattr(self, data: st.DataObject, name: str) -> None:
        path = self.pick(data, "path")
        self.both(lambda base: os.removexattr(os.path.join(base, path), name,
                                              follow_symlinks=False))

    @rule(data=st.data())
    def fsync(self, data: st.DataObject) -> None:
        path = data.draw(st.one_of(st.just(""), self.path_strategy("file")), label="path")
        def op(base: str) -> None:
            fd = os.open(os.path.join(base, path) if path else base, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self.both(op)

    @precondition(lambda self: self.remounts < MAX_REMOUNTS)
    @rule()
    def remount(self) -> None:
        self.remounts += 1
        self.clean = False
        self.env.umount(self.mnt)
        self.is_mounted = False
        self.mount()

    @precondition(lambda self: self.remounts < MAX_REMOUNTS)
    @rule()
    def kill9_remount(self) -> None:
        """kill -9 the daemon and mount again. Every operation so far has returned and every
        file was closed, so by the durability contract nothing may be lost: the trees must
        still match."""
        self.remounts += 1
        self.clean = False
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # our child thanks to reaping_daemons(): no zombie holds the lease
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True, timeout=30)
        self.is_mounted = False
        self.mount()

    # -- the check after every step ---------------------------------------------------------
    @invariant()
    def trees_match(self) -> None:
        self.clean = False
        ref_entries, ref_groups = snapshot(str(self.ref))
        mnt_entries, mnt_groups = snapshot(str(self.mnt))
        assert mnt_entries == ref_entries, (
            "cryptfs and the reference differ:\n" + describe_diff(ref_entries, mnt_entries)
        )
        assert mnt_groups == ref_groups, (
            f"hard-link groups differ: reference {sorted(map(sorted, ref_groups))}, "
            f"cryptfs {sorted(map(sorted, mnt_groups))}"
        )
        self.clean = True


MODEL_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    derandomize=not os.environ.get("CRYPTFS_MODEL_RANDOM"),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    report_multiple_bugs=False,
)


@contextlib.contextmanager
def reaping_daemons() -> Iterator[None]:
    """Become the reaper of the mount daemons started meanwhile (``cryptfs mount`` forks them
    and exits), so that a daemon killed by ``kill9_remount`` is reaped at once: an unreaped
    zombie passes kill(pid, 0) and its mount lease would count as held for a minute (where
    PID 1 does not reap, as in some containers). The other daemons are reaped at the end."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    DAEMONS.clear()
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        deadline = time.monotonic() + 10
        for pid in DAEMONS:
            while True:
                try:
                    done, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break  # reaped already, or not our child
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # still finishing its unmount


@pytest.mark.timeout(1800)  # a failure is shrunk: many more mounts than a passing run
def test_model() -> None:
    if not shutil.which("fusermount3"):
        pytest.skip("fusermount3 not installed")
    STATS.clear()
    with reaping_daemons():
        run_state_machine_as_test(CryptfsModel, settings=MODEL_SETTINGS)
    print("\noutcomes:", ", ".join(f"{k} x{v}" for k, v in sorted(STATS.items())))
