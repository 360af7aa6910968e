"""Snapshots (issue 17) beyond the local store and the SQLite engine: on S3 (the moto server)
and with the metadata in PostgreSQL, a snapshot created while mounted, then the files changed
and deleted, collection and ``gc --grace 0`` run: the ``--at`` mount still shows exactly the
snapshot's tree and bytes (so gc kept every object the snapshot holds), not the present
(with PostgreSQL it once showed the live database)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_fixtures import _MOUNTS, VaultEnv, _mounted, _tmp_root, force_unmount
from pg_fixtures import PgPlace
from test_47_snapshots import digest, mount_at


@pytest.fixture
def cleanup_root() -> Iterator[Path]:
    root = _tmp_root()
    try:
        yield root
    finally:
        for mp in [m for m in list(_MOUNTS) if m.startswith(str(root) + "/")]:
            if _mounted(mp):
                force_unmount(mp)
            _MOUNTS.discard(mp)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _snapshot_survives_change_and_gc(env: VaultEnv) -> None:
    rnd = random.Random(48)
    live, past = env.root / "live", env.root / "past"
    env.mount(live)
    (live / "dir").mkdir()
    (live / "dir" / "gone.bin").write_bytes(rnd.randbytes(300_000))  # only the snapshot keeps it
    (live / "kept.txt").write_bytes(b"before\n")
    then = digest(live)
    env.cli("snapshot", "create", "--name", "s1")
    os.unlink(live / "dir" / "gone.bin")
    (live / "kept.txt").write_bytes(b"after, longer\n")
    fd = os.open(live, os.O_RDONLY)
    os.fsync(fd)  # a checkpoint (PostgreSQL: asked for, at the latest the unmount's): its
    # collection runs with the snapshot present
    os.close(fd)
    assert digest(live) != then
    env.umount(live)
    env.cli("gc", "--grace", "0")
    mount_at(env, past, "s1")
    try:
        assert digest(past) == then
    finally:
        env.umount(past)


def test_snapshot_on_s3(cleanup_root: Path, s3_url: str) -> None:
    env = VaultEnv(cleanup_root, s3_url)
    env.init()
    _snapshot_survives_change_and_gc(env)


def test_snapshot_with_metadata_in_postgresql(cleanup_root: Path, pg_place: PgPlace) -> None:
    env = VaultEnv(cleanup_root, f"file://{cleanup_root}/store")
    env.init("--meta", pg_place.url)
    _snapshot_survives_change_and_gc(env)
    assert not env.db.exists()
    # prove (like history and restore) reads the snapshot too, not the live database
    proof = json.loads(env.cli("prove", "/kept.txt", "--at", "s1").stdout)
    assert proof["sha256"] == hashlib.sha256(b"before\n").hexdigest()
