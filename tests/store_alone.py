"""Helpers of the in-process vault tests (test_83, test_84, test_86): which machine's local state
(XDG homes ``<home>/m<n>``) the process uses, a new vault in ``<home>/store`` opened
read-write, and reading its files from the store alone, as a new machine attaching it does."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfs.meta.sqlite import ROOT_INO
from cryptfs.paths import VaultPaths
from cryptfs.vault.core import Vault, create_vault


def use_machine(home: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """From now on the process is machine ``n`` (its XDG homes ``home/m<n>``)."""
    for k in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"XDG_{k}_HOME", str(home / f"m{n}" / k.lower()))


@contextlib.contextmanager
def new_vault(home: Path, chunk_size: int) -> Iterator[Vault]:
    """A vault created in ``home/store`` by the current machine, open read-write (closed, with
    its final checkpoint, when the block ends)."""
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{home}/store"], b"pw", chunk_size, os.getuid(), os.getgid())
    v = Vault.open(paths, b"pw")
    try:
        yield v
    finally:
        v.close()


def read_from_store_alone(home: Path, monkeypatch: pytest.MonkeyPatch, n: int,
                          names: list[bytes], chunk_size: int) -> dict[bytes, bytes]:
    """Attach the vault as machine ``n`` (fresh local state: restored from the store alone)
    and read the files ``names`` of its root on a read-only open (each read asks one byte more
    than the size); machine 1 again afterwards."""
    use_machine(home, monkeypatch, n)
    try:
        paths = VaultPaths("unit")
        _cfg, created = create_vault(paths, [f"file://{home}/store"], b"pw", chunk_size, 0, 0)
        assert not created
        v = Vault.open(paths, b"pw", readonly=True)
        try:
            assert v.fs is not None
            got = {}
            for name in names:
                node = v.fs.lookup(ROOT_INO, name)
                fh = v.fs.open(node.ino, os.O_RDONLY)
                try:
                    got[name] = v.fs.read(fh, 0, node.size + 1)
                finally:
                    v.fs.release(fh)
            return got
        finally:
            v.close()
    finally:
        use_machine(home, monkeypatch, 1)
