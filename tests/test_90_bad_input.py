"""Bad input: each case gives one clear line on stderr, a documented exit code, no traceback,
and changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv, _tmp_root

# tampering, faults, crashes and refusals make the daemon log warnings and errors on purpose
pytestmark = pytest.mark.log_problems_expected


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in ("daemon.log",):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def one_line_error(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cryptfs: "), lines
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_empty_passphrase_at_init() -> None:
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/store", passphrase="")
    res = env.cli("init", env.store_url, check=False)
    one_line_error(res, 3, "passphrase")
    assert not (root / "store").exists() or not any((root / "store").iterdir())
    assert not (root / "config").exists()


def test_wrong_passphrase(local_env: VaultEnv) -> None:
    before = snapshot(local_env.root)
    bad = dict(local_env.env, CRYPTFS_PASSPHRASE="wrong")
    mnt = local_env.root / "mnt"
    mnt.mkdir()
    one_line_error(local_env.cli("mount", str(mnt), env=bad, check=False), 3, "wrong passphrase")
    one_line_error(local_env.cli("verify", env=bad, check=False), 3, "wrong passphrase")
    assert snapshot(local_env.root) == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing-field"])
def test_corrupt_local_config(local_env: VaultEnv, damage: str) -> None:
    cfg = local_env.root / "config" / "cryptfs" / "vaults" / "default.json"
    raw = cfg.read_text()
    cfg.write_text({"truncate": raw[: len(raw) // 2], "garbage": "\x00\x01 not json",
                    "missing-field": raw.replace('"chunk_size"', '"chunk_sighs"')}[damage])
    before = snapshot(local_env.root)
    mnt = local_env.root / "mnt"
    mnt.mkdir()
    one_line_error(local_env.cli("mount", str(mnt), check=False), 4, "corrupt")
    assert snapshot(local_env.root) == before
    assert not os.path.ismount(mnt)


def test_unknown_url_scheme() -> None:
    root = _tmp_root()
    env = VaultEnv(root, "ftp://example.org/x")
    one_line_error(env.cli("init", env.store_url, check=False), 2, "ftp")
    assert not (root / "config").exists()


def test_unreachable_endpoint() -> None:
    root = _tmp_root()
    env = VaultEnv(root, "s3://bucket/v?endpoint=http://127.0.0.1:9")  # nothing listens
    res = env.cli("init", env.store_url, check=False, timeout=60)
    one_line_error(res, 5)
    assert not (root / "config").exists()


def test_missing_bucket(s3_server, s3_client, s3_bucket: str) -> None:  # noqa: ANN001
    root = _tmp_root()
    env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={s3_server.endpoint}")
    env.init()
    for obj in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
        s3_client.delete_object(Bucket=s3_bucket, Key=obj["Key"])
    s3_client.delete_bucket(Bucket=s3_bucket)
    s3_client.create_bucket(Bucket=s3_bucket + "-other")  # keep the fixture's cleanup happy
    mnt = root / "mnt"
    mnt.mkdir()
    res = env.cli("mount", str(mnt), check=False, timeout=60)
    one_line_error(res, 5, s3_bucket)
    assert not os.path.ismount(mnt)
    s3_client.create_bucket(Bucket=s3_bucket)
    s3_client.delete_bucket(Bucket=s3_bucket + "-other")


def test_no_credentials(s3_server, s3_bucket: str) -> None:  # noqa: ANN001
    root = _tmp_root()
    env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={s3_server.endpoint}")
    bare = {k: v for k, v in env.env.items() if not k.startswith("AWS_")}
    bare.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
                AWS_EC2_METADATA_DISABLED="true")
    res = env.cli("init", env.store_url, env=bare, check=False, timeout=60)
    one_line_error(res, 5, "credentials")
    assert not (root / "config").exists()


def test_vault_name_that_does_not_exist(local_env: VaultEnv) -> None:
    mnt = local_env.root / "mnt"
    mnt.mkdir()
    one_line_error(local_env.cli("mount", "--name", "nope", str(mnt), check=False), 4,
                   "no vault named 'nope'")
    one_line_error(local_env.cli("verify", "--name", "nope", check=False), 4)


def test_mountpoint_missing_notdir_nonempty(local_env: VaultEnv) -> None:
    root = local_env.root
    one_line_error(local_env.cli("mount", str(root / "absent"), check=False), 7, "does not exist")
    (root / "file").write_text("x")
    one_line_error(local_env.cli("mount", str(root / "file"), check=False), 7, "not a directory")
    full = root / "full"
    full.mkdir()
    (full / "something").write_text("x")
    one_line_error(local_env.cli("mount", str(full), check=False), 7, "not empty")
    local_env.mount(full, "nonempty")  # allowed with -o nonempty
    try:
        assert os.listdir(full) == []
    finally:
        local_env.umount(full)
    assert (full / "something").read_text() == "x"


def test_mountpoint_already_mounted(local_env: VaultEnv) -> None:
    mnt = local_env.root / "mnt"
    local_env.mount(mnt)
    try:
        other = local_env.root / "mnt2"
        other.mkdir()
        res = local_env.cli("mount", str(mnt), check=False)
        one_line_error(res, 7, "already a mountpoint")
        res = local_env.cli("mount", str(other), check=False)  # same vault twice: refused
        one_line_error(res, 8, "in use")
        assert not os.path.ismount(other)
    finally:
        local_env.umount(mnt)


def test_corrupt_sqlite_file(local_env: VaultEnv) -> None:
    mnt = local_env.root / "mnt"
    local_env.mount(mnt)
    (mnt / "f").write_text("data")
    local_env.umount(mnt)
    db = local_env.db
    raw = bytearray(db.read_bytes())
    raw[100:4096] = os.urandom(4096 - 100)  # wreck the schema page
    db.write_bytes(bytes(raw))
    before = snapshot(local_env.root)
    res = local_env.cli("mount", str(mnt), check=False)
    one_line_error(res, 4, "corrupt")
    assert not os.path.ismount(mnt)
    assert snapshot(local_env.root) == before


def test_cache_dir_on_full_filesystem(s3_server, s3_bucket: str) -> None:  # noqa: ANN001
    """A full cache filesystem costs cache hits, never data: writes and reads still work."""
    root = _tmp_root()
    cache = root / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(cache)], check=True)
    try:
        env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={s3_server.endpoint}")
        env.init("--chunk-size", "65536")
        mnt = root / "mnt"
        env.mount(mnt)
        try:
            data = os.urandom(3 << 20)
            (mnt / "big").write_bytes(data)
            with open(mnt / "big", "rb") as f:
                os.fsync(f.fileno())
            assert (mnt / "big").read_bytes() == data
        finally:
            env.umount(mnt)
        env.mount(mnt)
        try:
            assert (mnt / "big").read_bytes() == data
        finally:
            env.umount(mnt)
        assert "Traceback" not in env.log_text()
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)
