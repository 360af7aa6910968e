"""Where a vault's local files live (XDG base directories).

- ``$XDG_CONFIG_HOME/cryptfs/vaults/NAME.json``: store URL and a copy of the vault config (0600)
- ``$XDG_DATA_HOME/cryptfs/vaults/NAME/``: metadata database, last-seen ledger head, staged
  uploads, the mount lock
- ``$XDG_DATA_HOME/cryptfs/stores/NAME/``: the embedded local store of ``cryptfs init`` without
  a URL
- ``$XDG_CACHE_HOME/cryptfs/vaults/NAME/``: cached sealed chunks (safe to delete)

cryptfs owns the three ``cryptfs`` directories and everything below them. Every directory it
creates there is 0700 (as are missing XDG base directories it has to create, as the XDG spec
asks), and one it finds open to other users (made by an older version, or by hand) is tightened
to 0700 the next time the vault is used: vault names, the sizes of databases and caches and the
times of their changes are nobody else's business.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptfs.errors import UsageError

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _xdg(var: str, default: str) -> Path:
    v = os.environ.get(var)
    if v and os.path.isabs(v):
        return Path(v)
    return Path.home() / default


def config_home() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "cryptfs"


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "cryptfs"


def cache_home() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "cryptfs"


@dataclass(frozen=True)
class VaultPaths:
    name: str

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise UsageError(
                f"invalid vault name {self.name!r}", hint="use letters, digits, '.', '_' and '-'"
            )

    @property
    def config_file(self) -> Path:
        return config_home() / "vaults" / f"{self.name}.json"

    @property
    def data_dir(self) -> Path:
        return data_home() / "vaults" / self.name

    @property
    def db(self) -> Path:
        return self.data_dir / "metadata.db"

    @property
    def head(self) -> Path:
        return self.data_dir / "head.json"

    @property
    def staging(self) -> Path:
        return self.data_dir / "staging"

    @property
    def lock(self) -> Path:
        return self.data_dir / "mount.lock"

    @property
    def cache_dir(self) -> Path:
        return cache_home() / "vaults" / self.name

    @property
    def default_store(self) -> Path:
        return data_home() / "stores" / self.name

    @property
    def mount_name(self) -> str:
        """What a mount of it shows as its source, after ``cryptfs:``."""
        return self.name


@dataclass(frozen=True)
class PastPaths(VaultPaths):
    """A read-only mount of a vault's past (``cryptfs mount --at``): the vault's own config,
    and local state of its own (``vaults/NAME/at/SUB``), so it never touches the live
    metadata, lock, staging area or cache."""

    sub: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not NAME_RE.match(self.sub):
            raise UsageError(f"invalid past mount {self.sub!r}")

    @property
    def data_dir(self) -> Path:
        return data_home() / "vaults" / self.name / "at" / self.sub

    @property
    def cache_dir(self) -> Path:
        return cache_home() / "vaults" / self.name / "at" / self.sub

    @property
    def mount_name(self) -> str:
        return f"{self.name}@{self.sub}"


def paths_for_mount(source: str) -> VaultPaths:
    """The local paths of the mount whose source is ``cryptfs:SOURCE``."""
    name, at, sub = source.partition("@")
    return PastPaths(name, sub) if at else VaultPaths(name)


def _own_roots() -> list[Path]:
    return [config_home(), data_home(), cache_home()]


def _is_ours(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _tighten(path: Path, st: os.stat_result) -> None:
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass  # a read-only filesystem: the files inside are 0600 all the same


def private_dir(path: Path) -> Path:
    """Make sure directory ``path`` exists: missing components are created 0700; existing ones
    inside cryptfs's own trees that others can read are tightened to 0700. Returns ``path``."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    for q in reversed(missing):
        try:
            os.mkdir(q, 0o700)
        except FileExistsError:
            continue
        os.chmod(q, 0o700)  # the umask may have taken bits away
    roots = _own_roots()
    for q in [path, *path.parents]:
        if q not in missing and _is_ours(q, roots):
            _tighten(q, os.stat(q))
    return path


def tighten_private_dirs(paths: VaultPaths) -> None:
    """Tighten to 0700 the directories of cryptfs (and of this vault) that exist and are open
    to others; creates nothing."""
    roots = _own_roots()
    dirs = [*roots, roots[0] / "vaults", roots[1] / "vaults", roots[1] / "stores",
            roots[2] / "vaults", paths.data_dir, paths.cache_dir, paths.default_store]
    for d in dirs:
        try:
            _tighten(d, os.stat(d))
        except OSError:
            continue


def list_vaults() -> list[str]:
    d = config_home() / "vaults"
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: temp file (0600), fsync, rename, fsync dir."""
    replace_private(stage_private(path, data), path)


def stage_private(path: Path, data: bytes, durable: bool = True) -> Path:
    """The first half of :func:`write_private`: a temp file beside ``path`` holding ``data``,
    durable (fsynced). Returns its path, for :func:`replace_private`. ``durable`` False: not
    fsynced; the caller fsyncs it (:func:`fsync_path`) before the rename, after the fsyncs of
    other files it writes meanwhile (then one journal commit may cover them all)."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def replace_private(tmp: Path, path: Path, durable: bool = True) -> None:
    """The second half of :func:`write_private`: rename ``tmp`` over ``path``, durably (with
    ``durable`` False the caller fsyncs the directory later: :func:`fsync_path`)."""
    os.rename(tmp, path)
    if durable:
        fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Filesystems where an fsync of a file also makes durable the name it was created or renamed to
# since it was created (the local store's objects: written, renamed into place, then fsynced):
# ext4 and xfs commit their one journal (log) in order, so the commit an fsync waits for holds
# every earlier change to names; ext4 without a journal syncs, at the first fsync of a new
# file, the directory its name is in (ext4_sync_parent). There a directory needs no fsync of
# its own for the files put in it. (Not btrfs: its fsync logs one inode's names.)
_NAMES_WITH_FILE = {0xEF53, 0x58465342}  # ext2/3/4 (the ext4 driver), xfs
_fs_types: dict[int, int | None] = {}


def names_durable_with_files(path: Path) -> bool:
    """Whether on the filesystem of directory ``path`` an fsync of any file makes the names
    changed before it durable too (see _NAMES_WITH_FILE); False where that cannot be told
    (then fsync the directory, as POSIX asks)."""
    dev = os.stat(path).st_dev
    if dev not in _fs_types:
        _fs_types[dev] = _fs_type(path)
    return _fs_types[dev] in _NAMES_WITH_FILE


def _fs_type(path: Path) -> int | None:
    """statfs(2)'s f_type (the first field, a long), or None."""
    if _libc is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF


def machine_id() -> str:
    """This host's identity for lease and session records: /etc/machine-id, else the host
    name."""
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()
