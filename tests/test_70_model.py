"""Model-based test: random operation sequences on a cryptfs mount and on a local directory.

A Hypothesis :class:`RuleBasedStateMachine` applies the same operation (create, write at random
offsets across chunk boundaries, truncate, rename, link, unlink, mkdir, rmdir, symlink, chmod,
setxattr/removexattr, fsync, remount) to a fresh cryptfs mount and to a reference directory on
the local disk. The outcome must match (the same errno when the reference fails) and after every
step both trees must be identical: names, file types, modes, sizes, contents, link counts, which
names are hard links of each other, symlink targets and ``user.*`` xattrs (times and inode
numbers are ignored). Each example gets its own vault (chunk size 64 KiB, so writes of up to
300 KB cross chunk boundaries) and mount; ``remount`` is a rule, and at the end the vault is
unmounted and ``cryptfs verify`` must report it clean.

Runs a fixed (derandomized) set of examples that takes well under a minute. For a longer run::

    CRYPTFS_MODEL_EXAMPLES=200 CRYPTFS_MODEL_STEPS=80 pytest tests/test_70_model.py
"""

from __future__ import annotations

import errno
import inspect
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from mount_fixtures import VaultEnv, _mounted, force_unmount

CHUNK = 65536
EXAMPLES = int(os.environ.get("CRYPTFS_MODEL_EXAMPLES", "6"))
STEPS = int(os.environ.get("CRYPTFS_MODEL_STEPS", "30"))
# data made of one repeated byte: consecutive chunks with the same plaintext (deduplication)
PATTERN_DATA = os.environ.get("CRYPTFS_MODEL_PATTERN", "1") != "0"

NAMES = ["a", "b", "c"]
LEVEL1 = NAMES
LEVEL2 = [f"{x}/{y}" for x in NAMES for y in NAMES]
LEVEL3 = [f"{x}/{y}/{z}" for x in NAMES for y in NAMES for z in NAMES]
paths = st.one_of(st.sampled_from(LEVEL1), st.sampled_from(LEVEL2), st.sampled_from(LEVEL3))
# symlink targets are relative and never leave the tree (no "..", no absolute paths)
targets = st.one_of(paths, st.just("missing"), st.just("a/../b"))

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
xattr_values = st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"\0", b"v" * 1000]))
xattr_flags = st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE])


def make_data(kind: str, seed: int, size: int) -> bytes:
    if kind == "zeros":
        return bytes(size)
    if kind == "pattern":
        return bytes([1 + seed % 255]) * size
    return random.Random(seed).randbytes(size)


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
        self.clean = False  # True only after a step and its checks passed
        self.old_umask = os.umask(0o022)
        try:
            self.env.init("--chunk-size", str(CHUNK))
            self.env.mount(self.mnt)
            self.is_mounted = True
        except BaseException:
            self._cleanup()
            raise

    # -- plumbing ---------------------------------------------------------------------------
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
        options: list[st.SearchStrategy[str]] = []
        for kind in ("file", "dir", "link", "new"):
            if by_kind[kind]:
                weight = 4 if kind == prefer else 1
                options += [st.sampled_from(sorted(by_kind[kind]))] * weight
        options.append(paths)
        return st.one_of(options)

    def pick(self, data: st.DataObject, label: str, prefer: str = "any") -> str:
        return data.draw(self.path_strategy(prefer), label=label)

    def both(self, fn: Callable[[str], Any]) -> Outcome:
        """Apply ``fn(base)`` to the reference, then to the mount; the outcomes must match."""
        self.clean = False
        expected = outcome(fn, str(self.ref))
        got = outcome(fn, str(self.mnt))
        assert got == expected, f"reference gave {expected}, cryptfs gave {got}"
        label = f"{inspect.stack()[1].function}: {got[0] if got[0] == 'ok' else got[1]}"
        event(label)
        STATS[label] += 1
        return got

    # -- rules ------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**32))
    def populate(self, seed: int) -> None:
        """Start from a small tree: two files (one over several chunks) and a directory."""
        sizes_ = {"a": 3 * CHUNK + 123, "c/b": 1000}
        self.both(lambda base: os.mkdir(os.path.join(base, "c"), 0o755))
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
          append=st.booleans(), sync=st.booleans())
    def write(self, data: st.DataObject, offset: int, size: int, kind: str, seed: int,
              append: bool, sync: bool) -> None:
        path = self.pick(data, "path", "file")
        content = make_data(kind, seed, size)
        flags = os.O_WRONLY | (os.O_APPEND if append else 0)

        def op(base: str) -> int:
            fd = os.open(os.path.join(base, path), flags)
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

    @rule(data=st.data(), name=xattr_names, value=xattr_values, flags=xattr_flags,
          follow=st.booleans())
    def setxattr(self, data: st.DataObject, name: str, value: bytes, flags: int,
                 follow: bool) -> None:
        path = self.pick(data, "path")
        self.both(lambda base: os.setxattr(os.path.join(base, path), name, value, flags,
                                           follow_symlinks=follow))

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

    @rule()
    def remount(self) -> None:
        self.clean = False
        self.env.umount(self.mnt)
        self.is_mounted = False
        self.env.mount(self.mnt)
        self.is_mounted = True

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
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    report_multiple_bugs=False,
)


@pytest.mark.timeout(1800)
def test_model() -> None:
    if not shutil.which("fusermount3"):
        pytest.skip("fusermount3 not installed")
    STATS.clear()
    run_state_machine_as_test(CryptfsModel, settings=MODEL_SETTINGS)
    print("\noutcomes:", ", ".join(f"{k} x{v}" for k, v in sorted(STATS.items())))
