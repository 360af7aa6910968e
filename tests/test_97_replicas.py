"""One vault over several stores (issue 7), through real mounts and the CLI.

Two buckets on the moto server, each reached through its own fault proxy (so one can be taken
down), and a local directory store. What the tests show:

* with one store down the mount keeps reading and writing; once it answers again the mount's
  background completion brings it level (also across a remount) and ``verify --full`` is clean
  and every copy is on both stores;
* a copy corrupted on one store is read from the other, reported, and repaired;
* a store removed leaves the vault readable from the rest;
* a store added later is back-filled (and can then carry the vault alone).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from mount_fixtures import VaultEnv, _mounted, force_unmount

pytestmark = [pytest.mark.timeout(360), pytest.mark.log_problems_expected]  # stores go down

CHUNK = 65536
NOCACHE = "cache_size=0"  # every read of a cold file goes to a store


@dataclass
class Rig:
    env: VaultEnv
    proxies: list[FaultProxy]
    buckets: list[str]
    urls: list[str]
    local: str
    mnt: Path
    client: Any

    def keys(self, bucket: str, prefix: str = "vault/data/") -> dict[str, bytes]:
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", ()):
                out[o["Key"]] = o["Size"]
        return out

    def store_ids(self) -> dict[str, str]:
        res = self.env.cli("store", "list", "--json", "--name", self.env.name)
        return {s["url"]: s["id"] for s in json.loads(res.stdout)["stores"]}

    def status(self) -> dict[str, Any]:
        res = self.env.cli("status", "--json", str(self.mnt))
        mounts = json.loads(res.stdout)["mounts"]
        assert mounts, res.stdout
        return mounts[0]  # type: ignore[no-any-return]

    def wait_level(self, timeout: float = 150) -> None:
        """Until the mount reports no pending copies on any store (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            pending = {s["id"]: s["pending_copies"] for s in doc.get("stores", ())}
            if pending and not any(pending.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"copies still pending after {timeout}s: {pending}")
            time.sleep(1.0)


@pytest.fixture
def rig(s3_server: Any, s3_client: Any) -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="cfs-replicas-", dir="/tmp"))
    os.chmod(root, 0o755)
    buckets = [f"cryptfs-rep-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    for b in buckets:
        s3_client.create_bucket(Bucket=b)
    proxies = [FaultProxy(s3_server.endpoint, seed=i).start() for i in range(2)]
    urls = [f"s3://{b}/vault?endpoint={p.endpoint}&timeout=4"
            for b, p in zip(buckets, proxies, strict=True)]
    env = VaultEnv(root, urls[0])
    mnt = root / "mnt"
    try:
        yield Rig(env, proxies, buckets, urls, f"file://{root}/local", mnt, s3_client)
    finally:
        for p in proxies:
            p.clear()
        try:
            if _mounted(str(mnt)):
                try:
                    env.cli("umount", str(mnt), timeout=90)
                except Exception:  # noqa: BLE001 - last resort below
                    try:
                        pid = int((env.data_dir / "mount.lock").read_text().strip())
                        os.kill(pid, signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
                force_unmount(str(mnt))
        finally:
            for p in proxies:
                p.stop()
            for b in buckets:
                try:
                    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=b):
                        for o in page.get("Contents", ()):
                            s3_client.delete_object(Bucket=b, Key=o["Key"])
                    s3_client.delete_bucket(Bucket=b)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            shutil.rmtree(root, ignore_errors=True)


def content(name: str, size: int) -> bytes:
    return random.Random(f"replicas/{name}").randbytes(size)


FILES = {"a.bin": 300_000, "b.bin": 70_000, "dir/c.txt": 5_000, "dir/d.bin": 1_000_000}


def write_files(mnt: Path, files: dict[str, int], tag: str) -> None:
    for rel, size in files.items():
        p = mnt / tag / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.write(content(tag + rel, size))
            f.flush()
            os.fsync(f.fileno())


def check_files(mnt: Path, files: dict[str, int], tag: str) -> None:
    for rel, size in files.items():
        assert (mnt / tag / rel).read_bytes() == content(tag + rel, size), rel


def verify_clean(env: VaultEnv) -> None:
    res = env.cli("verify", "--full", "--name", env.name, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify: clean" in res.stdout


def test_one_store_down_then_back_fills_in(rig: Rig) -> None:
    env = rig.env
    env.cli("init", *rig.urls, "--chunk-size", str(CHUNK))
    env.mount(rig.mnt, NOCACHE)
    write_files(rig.mnt, FILES, "one")
    env.umount(rig.mnt)
    a, b = rig.keys(rig.buckets[0]), rig.keys(rig.buckets[1])
    assert a and a == b  # every chunk on both stores

    rig.proxies[0].set_fault("down")  # store A is unreachable from here on
    env.mount(rig.mnt, NOCACHE)  # mounting needs only the quorum (one of two)
    check_files(rig.mnt, FILES, "one")  # cold reads come from B
    write_files(rig.mnt, FILES, "two")  # writes and fsync go on
    (rig.mnt / "two" / "dir" / "c.txt").rename(rig.mnt / "two" / "moved.txt")
    a_id = rig.store_ids()[rig.urls[0]]
    deadline = time.monotonic() + 20
    while True:  # the daemon publishes its status every few seconds
        down = {s["id"]: s for s in rig.status()["stores"]}[a_id]
        if (not down["up"] and down["pending_copies"] > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not down["up"] and down["pending_copies"] > 0, down
    env.umount(rig.mnt)  # pending copies for A stay recorded; unmount does not wait for A
    assert len(rig.keys(rig.buckets[1])) > len(rig.keys(rig.buckets[0]))

    rig.proxies[0].clear()  # A is back: the next mount completes the copies in the background
    env.mount(rig.mnt, NOCACHE)
    rig.wait_level()
    check_files(rig.mnt, {k: v for k, v in FILES.items() if k != "dir/c.txt"}, "two")
    env.umount(rig.mnt)
    assert rig.keys(rig.buckets[0]) == rig.keys(rig.buckets[1])
    verify_clean(env)
    assert "Traceback" not in env.log_text()


def test_corrupt_copy_is_read_from_the_other_store_and_repaired(rig: Rig) -> None:
    env = rig.env
    env.cli("init", *rig.urls, "--chunk-size", str(CHUNK))
    env.mount(rig.mnt, NOCACHE)
    write_files(rig.mnt, FILES, "x")
    env.umount(rig.mnt)
    keys = sorted(rig.keys(rig.buckets[0]))
    for bucket, key in ((rig.buckets[0], keys[0]), (rig.buckets[1], keys[-1])):
        body = bytearray(rig.client.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[len(body) // 2] ^= 0x40
        rig.client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    res = env.cli("verify", "--full", "--name", env.name, check=False)
    assert res.returncode == 6
    assert res.stdout.count("corrupt: the copy of object") == 2, res.stdout

    env.mount(rig.mnt, NOCACHE)
    check_files(rig.mnt, FILES, "x")  # each corrupt copy has a good twin on the other store
    env.umount(rig.mnt)
    log = env.log_text()
    assert "is corrupt; reading another" in log

    res = env.cli("repair", "--name", env.name)
    assert "every store is level" in res.stdout, res.stdout
    verify_clean(env)
    for bucket, key in ((rig.buckets[0], keys[0]), (rig.buckets[1], keys[-1])):
        good = rig.client.get_object(Bucket=rig.buckets[1] if bucket == rig.buckets[0]
                                     else rig.buckets[0], Key=key)["Body"].read()
        assert rig.client.get_object(Bucket=bucket, Key=key)["Body"].read() == good


def test_removed_store_leaves_the_vault_readable_from_the_rest(rig: Rig) -> None:
    env = rig.env
    env.cli("init", rig.urls[0], rig.urls[1], rig.local, "--chunk-size", str(CHUNK))
    ids = rig.store_ids()
    assert len(ids) == 3
    # no store learns another store's URL (bucket, endpoint, path) or its id in the clear
    p0, p1 = (p.endpoint for p in rig.proxies)
    others = {rig.buckets[0]: (rig.buckets[1], p1, rig.local, ids[rig.urls[1]]),
              rig.buckets[1]: (rig.buckets[0], p0, rig.local, ids[rig.urls[0]])}
    for bucket, secrets in others.items():
        for key in rig.keys(bucket, "vault/"):
            body = rig.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for text in secrets:
                assert text.encode() not in body, (bucket, key, text)
    env.mount(rig.mnt, NOCACHE)
    write_files(rig.mnt, FILES, "r")
    env.umount(rig.mnt)
    a_id = rig.store_ids()[rig.urls[0]]
    res = env.cli("store", "remove", a_id, "--name", env.name)
    assert "no longer used" in res.stdout
    assert rig.urls[0] not in rig.store_ids()
    rig.proxies[0].set_fault("down")  # the removed store is not even asked any more
    before = rig.proxies[0].requests
    env.mount(rig.mnt, NOCACHE)
    check_files(rig.mnt, FILES, "r")
    write_files(rig.mnt, {"new.bin": 200_000}, "r2")
    env.umount(rig.mnt)
    assert rig.proxies[0].requests == before
    verify_clean(env)
    res = env.cli("store", "remove", rig.store_ids()[rig.urls[1]], "--name", env.name)
    res = env.cli("store", "remove", rig.store_ids()[rig.local], "--name", env.name, check=False)
    assert res.returncode == 2 and "only store" in res.stderr


def test_added_store_is_back_filled_and_can_carry_the_vault(rig: Rig) -> None:
    env = rig.env
    env.cli("init", rig.local, "--chunk-size", str(CHUNK))  # one store to begin with
    env.mount(rig.mnt, NOCACHE)
    write_files(rig.mnt, FILES, "early")
    env.umount(rig.mnt)
    res = env.cli("store", "add", rig.urls[1], "--name", env.name)
    assert "every store is level" in res.stdout, res.stdout
    ids = rig.store_ids()
    assert len(ids) == 2 and all(ids.values())
    verify_clean(env)
    # the local store goes: the added bucket alone must carry the whole vault
    env.cli("store", "remove", ids[rig.local], "--name", env.name)
    shutil.rmtree(rig.local[len("file://"):])
    env.mount(rig.mnt, NOCACHE)
    check_files(rig.mnt, FILES, "early")
    env.umount(rig.mnt)
    verify_clean(env)
    log = env.cli("log", "-n", "400", "--name", env.name).stdout
    assert "store-add@" in log and "store-remove@" in log and "copy@" in log


def test_killed_during_an_outage_the_next_mount_completes_the_copies(rig: Rig) -> None:
    env = rig.env
    env.cli("init", *rig.urls, "--chunk-size", str(CHUNK))
    rig.proxies[0].set_fault("down")
    env.mount(rig.mnt, NOCACHE)
    write_files(rig.mnt, FILES, "k")  # fsync'd: on store B (the quorum), pending for A
    pid = int((env.data_dir / "mount.lock").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    force_unmount(str(rig.mnt))
    rig.proxies[0].clear()
    env.mount(rig.mnt, NOCACHE)  # crash recovery, then background completion
    rig.wait_level()
    check_files(rig.mnt, FILES, "k")
    env.umount(rig.mnt)
    assert rig.keys(rig.buckets[0]) == rig.keys(rig.buckets[1])
    verify_clean(env)
