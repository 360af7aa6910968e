#!/usr/bin/env python3
"""A trivial passthrough FUSE filesystem: the baseline for `scripts/bench`.

It mirrors SRC at MNT with the same binding and mount options as cryptfs (mfusepy on libfuse 3,
multithreaded, nanosecond times, use_ino, default_permissions, 1 MiB writes, 1 s entry and
attribute timeouts), so that the difference between it and cryptfs is cryptfs's own work.

    python scripts/passthrough.py [--binding mfusepy|fusepy] SRC MNT

runs in the foreground until unmounted (`fusermount3 -u MNT`, or `fusermount -u` for fusepy).
`--binding fusepy` uses the original fusepy on libfuse 2 (with big_writes), for comparing bindings.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import stat
import sys
import time

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def load_binding(name: str):
    """Import the FUSE binding: mfusepy on libfuse 3, or fusepy on libfuse 2."""
    if name == "mfusepy":
        # mfusepy loads libfuse 2 whenever it is installed unless told otherwise.
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
        mod = importlib.import_module("mfusepy")
        if getattr(mod, "fuse_version_major", 3) != 3:
            raise SystemExit(f"passthrough: mfusepy loaded libfuse {mod.fuse_version_major}, not 3")
    elif name == "fusepy":
        os.environ.pop("FUSE_LIBRARY_NAME", None)
        mod = importlib.import_module("fuse")
    else:
        raise SystemExit(f"passthrough: unknown binding {name!r}")
    return mod


class PassthroughOps:
    """Operations mirroring a directory, using file descriptors and pread/pwrite."""

    use_ns = True

    def __init__(self, root: str, get_context) -> None:
        self.root = os.path.realpath(root)
        self._get_context = get_context
        self._euid = os.geteuid()

    # helpers
    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _own(self, full: str) -> None:
        """Give a new node to the calling user, as a real filesystem does."""
        if self._euid != 0:
            return
        uid, gid, _pid = self._get_context()
        if uid != self._euid or gid != os.getegid():
            os.lchown(full, uid, gid)

    @staticmethod
    def _stat_dict(st: os.stat_result) -> dict:
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_dev": st.st_dev,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_rdev": st.st_rdev,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    # metadata
    def getattr(self, path, fh=None):
        if fh is not None and path is None:
            return self._stat_dict(os.fstat(fh))
        return self._stat_dict(os.lstat(self._full(path)))

    def access(self, path, amode):
        if not os.access(self._full(path), amode, follow_symlinks=False):
            raise OSError(errno.EACCES, "access denied")
        return 0

    def readdir(self, path, fh):
        # Give each entry its inode number and type: with use_ino, a bare name would reach the
        # kernel with inode 0, and readdir(3) skips such entries.
        full = self._full(path)
        st = os.lstat(full)
        parent = st if path in ("/", "") else os.lstat(os.path.dirname(full.rstrip("/")))
        entries = [
            (".", {"st_ino": st.st_ino, "st_mode": st.st_mode}, 0),
            ("..", {"st_ino": parent.st_ino, "st_mode": parent.st_mode}, 0),
        ]
        with os.scandir(full) as it:
            for e in it:
                if e.is_symlink():
                    mode = stat.S_IFLNK
                elif e.is_dir(follow_symlinks=False):
                    mode = stat.S_IFDIR
                elif e.is_file(follow_symlinks=False):
                    mode = stat.S_IFREG
                else:
                    mode = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
                entries.append((e.name, {"st_ino": e.inode(), "st_mode": mode}, 0))
        return entries

    def readlink(self, path):
        return os.readlink(self._full(path))

    def statfs(self, path):
        sv = os.statvfs(self._full(path))
        keys = "bsize frsize blocks bfree bavail files ffree favail flag namemax".split()
        return {f"f_{k}": getattr(sv, f"f_{k}") for k in keys}

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.lchown(self._full(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        full = self._full(path)
        if times is None:
            os.utime(full, follow_symlinks=False)
            return 0
        atime, mtime = times
        if UTIME_OMIT in (atime, mtime) or UTIME_NOW in (atime, mtime):
            st = os.lstat(full)
            now = time.time_ns()
            atime = st.st_atime_ns if atime == UTIME_OMIT else now if atime == UTIME_NOW else atime
            mtime = st.st_mtime_ns if mtime == UTIME_OMIT else now if mtime == UTIME_NOW else mtime
        os.utime(full, ns=(int(atime), int(mtime)), follow_symlinks=False)
        return 0

    # namespace
    def mkdir(self, path, mode):
        full = self._full(path)
        os.mkdir(full, mode)
        self._own(full)
        return 0

    def rmdir(self, path):
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path):
        os.unlink(self._full(path))
        return 0

    def rename(self, old, new):
        os.rename(self._full(old), self._full(new))
        return 0

    def symlink(self, target, source):
        # Both bindings call symlink(link_path, link_contents).
        full = self._full(target)
        os.symlink(source, full)
        self._own(full)
        return 0

    def link(self, target, source):
        # Both bindings call link(new_path, existing_path).
        os.link(self._full(source), self._full(target))
        return 0

    # files
    def create(self, path, mode, fi=None):
        full = self._full(path)
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        self._own(full)
        return fd

    def open(self, path, flags):
        # The kernel handles O_APPEND positioning through the offsets it passes; drop flags
        # that make no sense on the backing descriptor.
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
        return os.open(self._full(path), flags)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def make_operations(binding, root: str):
    """A class deriving from the binding's Operations, so unimplemented calls stay unset."""
    cls = type("Passthrough", (PassthroughOps, binding.Operations), {})
    return cls(root, binding.fuse_get_context)


def mount_options(binding_name: str) -> dict:
    opts = {
        "foreground": True,
        "nothreads": False,
        "use_ino": True,
        "default_permissions": True,
        "entry_timeout": 1,
        "attr_timeout": 1,
        "fsname": "passthrough",
    }
    if binding_name == "fusepy":
        # libfuse 2 needs big_writes to receive more than 4 KiB per write; the kernel caps
        # libfuse 2 requests at 128 KiB.
        opts.update(big_writes=True, max_write=128 * 1024)
    # libfuse 3 has no max_write mount option in its high-level API; it always asks the kernel
    # for writes of up to 1 MiB (FUSE_MAX_MAX_PAGES pages) and enables big writes by itself.
    if os.geteuid() == 0:
        opts["allow_other"] = True
    return opts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binding", choices=("mfusepy", "fusepy"), default="mfusepy")
    ap.add_argument("src")
    ap.add_argument("mnt")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.src):
        ap.error(f"{args.src}: not a directory")
    binding = load_binding(args.binding)
    ops = make_operations(binding, args.src)
    binding.FUSE(ops, args.mnt, **mount_options(args.binding))
    return 0


if __name__ == "__main__":
    sys.exit(main())
