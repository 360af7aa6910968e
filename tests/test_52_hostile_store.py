"""A hostile store: each attack of issue 12 as its own test, on the local store and on the moto S3
server, asserting the defended outcome. Tampering happens directly in the store (and, where the
attacker is local, in this machine's files), as someone with write access to them would do it.

Works on copies of the template vault of test_50 (three files, 64 KiB chunks).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import test_50_ledger
from mount_fixtures import VaultEnv, _mounted, _tmp_root
from test_50_ledger import (
    CHUNK,
    FILES,
    REPORT,
    assert_clean,
    assert_eio,
    assert_mount_refused,
    assert_problem,
    chunk_objects,
    delete_object,
    drop_cache,
    get_object,
    mounted_at,
    put_object,
    restore_store,
    snapshot_store,
    verify,
)
from test_88_lease import second_machine

pytestmark = [pytest.mark.log_problems_expected, pytest.mark.timeout(300)]

# the template vault fixtures of test_50: ``vault`` is a copy of a vault with three files
_templates = test_50_ledger._templates
vault = test_50_ledger.vault

HUGE = 2_200_000_000  # bigger than 2^31: the size that made the AEAD panic


def plant_oversized(env: VaultEnv, name: str, size: int, s3_size: int = 6 << 20) -> None:
    """Put an object of ``size`` bytes at ``name``: a sparse file on the local store (costs no
    disk), on S3 a real object of ``s3_size`` bytes (still far over every bound it is read
    with, and small enough for the moto server)."""
    if env.store_dir is not None:
        path = env.store_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
            f.seek(size - 1)
            f.write(b"\1")
    else:
        put_object(env, name, random.Random(size).randbytes(s3_size))


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def daemon_pid(env: VaultEnv) -> int:
    return int((env.data_dir / "mount.lock").read_text())


def no_traceback(*texts: str) -> None:
    for t in texts:
        assert "Traceback" not in t and "PanicException" not in t, t


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    no_traceback(stderr)
    return lines[0]


# -- unbounded reads ------------------------------------------------------------------------------
def test_oversized_chunk_is_eio_and_costs_no_memory(vault: VaultEnv) -> None:
    obj = chunk_objects(vault, REPORT)[1]
    plant_oversized(vault, obj, 1 << 30, s3_size=48 << 20)
    drop_cache(vault)
    with mounted_at(vault) as mnt:
        pid = daemon_pid(vault)
        assert (mnt / "docs/other.bin").read_bytes() == FILES["docs/other.bin"]  # warm up
        before = vm_hwm_kib(pid)
        assert_eio(mnt / "docs/report.bin", CHUNK + 10, 100)
        grown = vm_hwm_kib(pid) - before
        assert grown < 8 << 10, f"the daemon's peak RSS grew by {grown} KiB"
        assert (mnt / "notes.txt").read_bytes() == FILES["notes.txt"]  # still serving
    assert "more than the" in vault.log_text()
    assert_problem(verify(vault), "changed", obj, REPORT)


def test_oversized_checkpoint_is_one_line_not_a_crash(vault: VaultEnv) -> None:
    name = "checkpoints/9999999999999999"
    plant_oversized(vault, name, HUGE, s3_size=(64 << 20) + 1)
    res = verify(vault)
    no_traceback(res.stdout, res.stderr)
    line = assert_problem(res, name, "more than the")
    assert "rejected" in line
    assert_mount_refused(vault, name)


def test_oversized_snapshot_is_detected(vault: VaultEnv) -> None:
    with contextlib.closing(vault.store()) as st:
        snap = next(n for n, _ in st.list("meta/"))
    plant_oversized(vault, snap, 1 << 30, s3_size=8 << 20)
    res = verify(vault, "--full")
    no_traceback(res.stdout, res.stderr)
    assert_problem(res, "changed", snap)
    # a new machine restoring from this store refuses with one line
    shutil.rmtree(vault.data_dir)
    mnt = vault.root / "mnt"
    mnt.mkdir(exist_ok=True)
    res = vault.cli("mount", str(mnt), check=False)
    assert not _mounted(str(mnt))
    assert res.returncode == 6 and "more than the" in one_line(res.stderr), res.stderr


# -- the lease ------------------------------------------------------------------------------------
@pytest.mark.parametrize("planted", ["garbage", "huge"])
def test_planted_lease_does_not_let_a_second_writer_in(
        store_kind: str, planted: str, request: pytest.FixtureRequest) -> None:
    root = _tmp_root()
    url = f"file://{root}/store" if store_kind == "local" else request.getfixturevalue("s3_url")
    env = VaultEnv(root, url, extra_env={"CRYPTFS_LEASE_SECONDS": "3"})
    env.init()
    other = second_machine(env)
    mnt, mnt2 = root / "mnt", other.root / "mnt"
    mnt2.mkdir()
    env.mount(mnt)
    try:
        if planted == "garbage":
            put_object(env, "lease", os.urandom(300))
        else:
            plant_oversized(env, "lease", HUGE)
        res = other.cli("mount", str(mnt2), check=False)  # before the holder rewrote it
        assert res.returncode == 8, res.stderr
        assert not _mounted(str(mnt2))
        one_line(res.stderr)
        time.sleep(3)  # the holder's heartbeat (every second) puts its own lease back
        (mnt / "still-writing").write_text("the holder keeps the vault")
        os.sync()
        res = other.cli("mount", str(mnt2), check=False)
        assert res.returncode == 8 and "the vault is mounted on" in res.stderr, res.stderr
        assert not _mounted(str(mnt2))
        with contextlib.closing(env.store()) as st:
            assert len(st.get("lease", 4096)) < 4096  # an authentic lease again
    finally:
        env.umount(mnt)
    log = env.log_text()
    assert "lease object fails authentication" in log or "more than the" in log, log
    assert "stops writing" not in log and "read-only now" not in log, log
    other.mount(mnt2)  # released at unmount: the other machine may mount now
    try:
        assert (mnt2 / "still-writing").read_text() == "the holder keeps the vault"
    finally:
        other.umount(mnt2)


def test_forged_lease_is_reported_and_is_no_takeover(vault: VaultEnv) -> None:
    put_object(vault, "lease", os.urandom(300))
    assert_problem(verify(vault), "lease", "fails authentication")
    (vault.root / "mnt").mkdir()
    res = vault.cli("mount", str(vault.root / "mnt"), check=False)  # counts as held a while
    assert res.returncode == 8 and "fails authentication" in one_line(res.stderr)


# -- verify covers the recovery objects -----------------------------------------------------------
def _snapshot_name(env: VaultEnv) -> str:
    with contextlib.closing(env.store()) as st:
        names = [n for n, _ in st.list("meta/")]
    assert len(names) == 1, names
    return names[0]


def _flip(env: VaultEnv, name: str) -> None:
    blob = bytearray(get_object(env, name))
    blob[len(blob) // 2] ^= 0x10
    put_object(env, name, bytes(blob))


@pytest.mark.parametrize("damage", ["flipped snapshot", "deleted snapshot",
                                    "flipped older checkpoint", "edited config"])
def test_verify_full_vouches_for_the_recovery_copy(vault: VaultEnv, damage: str) -> None:
    with contextlib.closing(vault.store()) as st:
        cks = sorted(n for n, _ in st.list("checkpoints/"))
    if damage == "flipped snapshot":
        name = _snapshot_name(vault)
        _flip(vault, name)
        assert_problem(verify(vault, "--full"), "corrupt", name)
    elif damage == "deleted snapshot":
        name = _snapshot_name(vault)
        delete_object(vault, name)
        assert_problem(verify(vault), "missing", name)
    elif damage == "flipped older checkpoint":
        assert len(cks) >= 2, cks
        _flip(vault, cks[0])
        assert_problem(verify(vault, "--full"), cks[0])
    else:
        cfg = json.loads(get_object(vault, "config"))
        cfg["chunk_size"] = cfg["chunk_size"] * 2
        put_object(vault, "config", json.dumps(cfg).encode())
        assert_problem(verify(vault, "--full"), "config", "fails authentication")
        assert_mount_refused(vault, "fails authentication")
        res = vault.cli("verify", "--accept", check=False)
        assert "wrote this machine's vault config" in res.stdout, res.stdout + res.stderr
        assert_clean(verify(vault, "--full"))


@pytest.mark.parametrize("store_kind", ["local"])
def test_foreign_objects_are_listed_and_collected(vault: VaultEnv) -> None:
    for name in ("tmp/planted", "lease-x", "notes"):
        put_object(vault, name, b"not ours")
    res = verify(vault)
    for name in ("tmp/planted", "lease-x", "notes"):
        assert_problem(res, "unknown", name)
    out = vault.cli("gc", "--grace", "0").stdout
    assert "deleted 3 unreferenced objects" in out, out
    assert_clean(verify(vault, "--full"))


def test_gc_keeps_store_id_of_several_stores() -> None:
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/a")
    env.cli("init", f"file://{root}/a", f"file://{root}/b")
    with mounted_at(env) as mnt:
        (mnt / "f").write_bytes(os.urandom(100_000))
    env.cli("gc", "--grace", "0")
    for s in ("a", "b"):
        assert (root / s / "store-id").exists()
    assert_clean(verify(env, "--full"))
    (root / "b" / "store-id").unlink()
    assert_problem(verify(env), "store-id", "has none")
    env.cli("repair")
    assert_clean(verify(env))
    shutil.rmtree(root, ignore_errors=True)


# -- config rollback ------------------------------------------------------------------------------
def test_config_rollback_is_refused(store_kind: str, request: pytest.FixtureRequest) -> None:
    root = _tmp_root()
    url = f"file://{root}/store" if store_kind == "local" else request.getfixturevalue("s3_url")
    env = VaultEnv(root, url)
    env.init()
    old_config = get_object(env, "config")
    assert json.loads(old_config)["generation"] == 1
    env.cli("passwd", env=dict(env.env, CRYPTFS_NEW_PASSPHRASE="the new one"))
    new = VaultEnv(root, url, passphrase="the new one")
    assert json.loads(get_object(env, "config"))["generation"] == 2
    with mounted_at(new) as mnt:  # records generation 2 in the ledger
        (mnt / "f").write_text("after the passphrase change")
    put_object(env, "config", old_config)  # the store puts the revoked passphrase back

    line = assert_mount_refused(new, "generation 1", "generation 2")
    assert "rolled back" in line
    res = env.cli("mount", str(root / "mnt"), check=False)  # the revoked passphrase
    assert res.returncode == 3 and one_line(res.stderr) == "cryptfs: wrong passphrase"
    assert_problem(verify(new), "config", "rolled back")

    # a new machine that knows only the store and the revoked passphrase: the ledger restored
    # from the store remembers generation 2
    fresh = VaultEnv(_tmp_root(), url)
    fresh.cli("init", url)
    assert_mount_refused(fresh, "generation 1", "generation 2")

    res = new.cli("verify", "--accept", check=False)
    assert "wrote this machine's vault config (generation 2)" in res.stdout, res.stdout
    assert_clean(verify(new))
    res = env.cli("mount", str(root / "mnt"), check=False)
    assert res.returncode == 3, res.stderr
    with mounted_at(new) as mnt:
        assert (mnt / "f").read_text() == "after the passphrase change"
    for e in (env, fresh):
        shutil.rmtree(e.root, ignore_errors=True)


# -- rollback anchored by the local ledger --------------------------------------------------------
@pytest.mark.parametrize("head_file", ["deleted", "older copy"])
def test_rollback_detected_without_the_head_file(vault: VaultEnv, tmp_path: Path,
                                                 head_file: str) -> None:
    saved = snapshot_store(vault, tmp_path / "old-store")
    old_head = (vault.data_dir / "head.json").read_bytes()
    with mounted_at(vault) as mnt:
        (mnt / "later.bin").write_bytes(b"written after the copy")
    restore_store(vault, tmp_path / "old-store", saved)
    if head_file == "deleted":
        (vault.data_dir / "head.json").unlink()
    else:
        (vault.data_dir / "head.json").write_bytes(old_head)
    assert_mount_refused(vault, "the store was rolled back")
    assert_problem(verify(vault), "rolled back")
