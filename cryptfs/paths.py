"""Where a vault's local files live (XDG base directories).

- ``$XDG_CONFIG_HOME/cryptfs/vaults/NAME.json``: store URL and a copy of the vault config (0600)
- ``$XDG_DATA_HOME/cryptfs/vaults/NAME/``: metadata database, last-seen ledger head, staged
  uploads, the mount lock
- ``$XDG_DATA_HOME/cryptfs/stores/NAME/``: the embedded local store of ``cryptfs init`` without
  a URL
- ``$XDG_CACHE_HOME/cryptfs/vaults/NAME/``: cached sealed chunks (safe to delete)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptfs.errors import UsageError

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


def list_vaults() -> list[str]:
    d = config_home() / "vaults"
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: temp file (0600), fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
