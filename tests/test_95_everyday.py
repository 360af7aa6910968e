"""Everyday use (issue 6), through the real CLI and real FUSE mounts.

1. Passphrase sources: environment, --passphrase-file, -o passfile=, --extpass, the terminal
   prompt (driven through a pseudo-terminal).
2. The mount(8) helper: ``mount.cryptfs`` with a vault name, a store URL or nothing (the default
   vault); ``mount -t cryptfs`` and an fstab line with ``mount -a -T`` (through a temporary
   /sbin/mount.cryptfs symlink).
3. Key slots: a second passphrase, an RSA public key, removal, ``passwd``, the master key backup.
4. ``cryptfs status``: pending uploads that really are pending (S3 PUTs stalled by a proxy).
5. ``cryptfs gc``: exactly the unreferenced objects, dry run first.
6. ``cryptfs info``: a store's vault without a passphrase; ``--help`` of every command.
"""

from __future__ import annotations

import json
import os
import pty
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from mount_fixtures import _MOUNTS, CRYPTFS, PASSPHRASE, VaultEnv, _mounted, _tmp_root

pytestmark = [pytest.mark.timeout(120), pytest.mark.log_problems_expected]

BIN = Path(sys.executable).parent
MOUNT_HELPER = str(BIN / "mount.cryptfs")
SBIN_HELPER = Path("/sbin/mount.cryptfs")


# -- helpers ---------------------------------------------------------------------------------------
def _cleanup_mount(env: VaultEnv, mnt: Path) -> None:
    if _mounted(str(mnt)):
        try:
            env.umount(mnt)
        except Exception:  # noqa: BLE001 - last resort in VaultEnv.umount already ran
            pass
    _MOUNTS.discard(str(mnt))


def no_passphrase(env: VaultEnv, **extra: str) -> dict[str, str]:
    e = dict(env.env)
    e.pop("CRYPTFS_PASSPHRASE", None)
    e.update(extra)
    return e


def one_line_error(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cryptfs: ") and "Traceback" not in res.stderr, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def write_pass(env: VaultEnv, name: str, text: str) -> Path:
    p = env.root / name
    p.write_text(text + "\n")
    os.chmod(p, 0o600)
    return p


def mount_cli(env: VaultEnv, mnt: Path, *args: str, env_: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(exist_ok=True)
    res = env.cli("mount", "--name", env.name, str(mnt), *args, env=env_, check=check)
    if res.returncode == 0:
        _MOUNTS.add(str(mnt))
    return res


def run_on_pty(argv: list[str], env: dict[str, str], answers: list[tuple[bytes, bytes]],
               timeout: float = 60) -> tuple[int, bytes]:
    """Run ``argv`` with a pseudo-terminal as its controlling terminal and stdin/stdout/stderr;
    answer each prompt in ``answers`` (in order) when it appears. Returns (exit code, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    out = b""
    pos = 0
    todo = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"{argv} on a pty timed out; output so far: {out!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: every process with the terminal open has gone
                break
            if not data:
                break
            out += data
            while todo:
                at = out.find(todo[0][0], pos)
                if at < 0:
                    break
                pos = at + len(todo[0][0])
                os.write(fd, todo.pop(0)[1])
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert not todo, f"prompts never shown: {todo}; output: {out!r}"
    return os.waitstatus_to_exitcode(status), out


def status_of(env: VaultEnv, mnt: Path) -> dict[str, Any]:
    res = env.cli("status", str(mnt), "--json")
    docs = json.loads(res.stdout)["mounts"]
    assert len(docs) == 1, docs
    return docs[0]


# -- 1. passphrase sources -------------------------------------------------------------------------
def test_passphrase_sources_mount(local_env: VaultEnv) -> None:
    env = local_env
    mnt = env.root / "mnt"
    pf = write_pass(env, "pass", PASSPHRASE)
    bare = no_passphrase(env)
    extpass = f"{sys.executable} -c \"print('{PASSPHRASE}'); print('second line ignored')\""
    sources: dict[str, list[str]] = {
        "environment": [],
        "passphrase-file": ["--passphrase-file", str(pf)],
        "passfile-option": ["-o", f"passfile={pf}"],
        "extpass": ["--extpass", extpass],
        "extpass-option": ["-o", f'extpass="cat {pf}",nonempty'],
    }
    for i, (source, args) in enumerate(sources.items()):
        mount_cli(env, mnt, *args, env_=None if source == "environment" else bare)
        try:
            (mnt / f"by-{source}").write_text(source)
            for earlier in list(sources)[:i]:
                assert (mnt / f"by-{earlier}").read_text() == earlier
        finally:
            env.umount(mnt)

    # the terminal: the prompt appears on the controlling terminal and the answer mounts
    rc, out = run_on_pty([CRYPTFS, "mount", str(mnt)], bare,
                         [(b"Passphrase: ", PASSPHRASE.encode() + b"\n")])
    assert rc == 0, out
    _MOUNTS.add(str(mnt))
    try:
        assert PASSPHRASE.encode() not in out  # not echoed
        assert (mnt / "by-extpass").read_text() == "extpass"
    finally:
        env.umount(mnt)

    # failures: one line, the documented code, nothing mounted
    one_line_error(mount_cli(env, mnt, "--extpass", "false", env_=bare, check=False), 2,
                   "'false' exited with status 1")
    one_line_error(mount_cli(env, mnt, "--extpass", "/nonexistent/askpass", env_=bare,
                             check=False), 2, "not found")
    one_line_error(mount_cli(env, mnt, "--extpass", "echo wrong", env_=bare, check=False), 3,
                   "wrong passphrase")
    one_line_error(mount_cli(env, mnt, env_=bare, check=False), 2, "no passphrase given")
    one_line_error(mount_cli(env, mnt, "--passphrase-file", str(env.root / "nope"), env_=bare,
                             check=False), 2, "cannot read passphrase file")
    assert not _mounted(str(mnt))


# -- 2. mount(8) -----------------------------------------------------------------------------------
@pytest.fixture
def sbin_helper() -> Iterator[bool]:
    """/sbin/mount.cryptfs -> .venv/bin/mount.cryptfs for the test (removed afterwards); False
    if another, foreign helper is installed there."""
    created = False
    if SBIN_HELPER.is_symlink() or SBIN_HELPER.exists():
        ours = os.path.realpath(SBIN_HELPER) == os.path.realpath(MOUNT_HELPER)
        yield ours
        return
    try:
        SBIN_HELPER.symlink_to(MOUNT_HELPER)
        created = True
    except FileExistsError:
        pass
    try:
        yield os.path.realpath(SBIN_HELPER) == os.path.realpath(MOUNT_HELPER)
    finally:
        if created:
            SBIN_HELPER.unlink(missing_ok=True)


def helper(env: VaultEnv, *args: str, env_: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([MOUNT_HELPER, *args], env=env_ or env.env, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, (args, res.returncode, res.stderr)
    return res


def test_mount_helper_and_fstab(local_env: VaultEnv, sbin_helper: bool) -> None:
    env = local_env
    mnt = env.root / "mnt"
    mnt.mkdir()
    pf = write_pass(env, "pass", PASSPHRASE)
    bare = no_passphrase(env)

    def mounted_then_umount(check_file: str | None = None) -> None:
        _MOUNTS.add(str(mnt))
        try:
            assert _mounted(str(mnt))
            if check_file:
                assert (mnt / check_file).read_text() == "hello"
        finally:
            env.umount(mnt)

    # the short form: the default vault, passphrase from the environment
    helper(env, str(mnt))
    (mnt / "hello.txt").write_text("hello")
    mounted_then_umount()
    # SPEC = vault name, with fstab-only options that must be accepted and ignored
    helper(env, env.name, str(mnt), "-o",
           f"passfile={pf},defaults,nofail,noauto,_netdev,x-systemd.automount,x-foo=bar",
           env_=bare)
    mounted_then_umount("hello.txt")
    # SPEC = the store URL (with a trailing slash: compared normalised) or cryptfs:NAME
    helper(env, env.store_url + "/", str(mnt), "-o", f"passfile={pf}", env_=bare)
    mounted_then_umount("hello.txt")
    # -f is mount(8)'s "fake": checks, no mount
    helper(env, "-f", f"cryptfs:{env.name}", str(mnt))
    assert not _mounted(str(mnt))
    one_line_error(helper(env, "file:///nonexistent/store", str(mnt), check=False), 4,
                   "no vault on this machine uses the store")
    one_line_error(helper(env, env.name, str(mnt), "-o", "bogus_option", check=False), 2,
                   "unknown mount option 'bogus_option'")

    if not sbin_helper:
        pytest.skip("a foreign /sbin/mount.cryptfs is installed; mount(8) part not run")
    # mount(8) runs /sbin/mount.cryptfs with our environment (XDG_* name the vault's files)
    res = subprocess.run(["mount", "-t", "cryptfs", env.name, str(mnt), "-o", f"passfile={pf}"],
                         env=bare, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    mounted_then_umount("hello.txt")
    # an fstab line; cryptfs:NAME equals the mounted source, so mount -a is idempotent
    fstab = env.root / "fstab"
    fstab.write_text(f"# test fstab\ncryptfs:{env.name}  {mnt}  cryptfs  "
                     f"passfile={pf},nofail,_netdev,x-systemd.requires=network-online.target"
                     "  0  0\n")
    for _ in range(2):
        res = subprocess.run(["mount", "-a", "-T", str(fstab)], env=bare, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        _MOUNTS.add(str(mnt))
        assert _mounted(str(mnt))
    mounted_then_umount("hello.txt")


# -- 3. key slots ----------------------------------------------------------------------------------
def opens(env: VaultEnv, *args: str, env_: dict[str, str] | None = None) -> int:
    """Exit code of ``cryptfs log -n 1`` (unlocks the vault, reads the ledger) with ``args``."""
    return env.cli("log", "-n", "1", *args, env=env_ or no_passphrase(env), check=False).returncode


def test_key_slots(local_env: VaultEnv) -> None:
    env = local_env
    mnt = env.root / "mnt"
    data = random.Random(95).randbytes(300_000)
    mount_cli(env, mnt)
    try:
        (mnt / "data.bin").write_bytes(data)
    finally:
        env.umount(mnt)
    bare = no_passphrase(env)

    # a key pair: private 0600 PEM, public .pub
    key = env.root / "keys" / "laptop.pem"
    key.parent.mkdir()
    env.cli("key", "generate", str(key))
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert Path(f"{key}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    one_line_error(env.cli("key", "generate", str(key), check=False), 2, "already exists")

    second = write_pass(env, "second.pass", "second passphrase")
    env.cli("key", "add", "--passphrase", "--new-passphrase-file", str(second),
            "--label", "spare")
    env.cli("key", "add", "--public-key", f"{key}.pub", "--label", "laptop")
    slots = json.loads(env.cli("key", "list", "--json", env=bare).stdout)["slots"]
    assert [s["type"] for s in slots] == ["passphrase", "passphrase", "public-key"]
    first_id, second_id, pk_id = (s["id"] for s in slots)
    assert slots[1]["label"] == "spare" and slots[2]["label"] == "laptop"

    # the store's config and the local copy were both rewritten, identically
    store_cfg = json.loads((env.store_dir / "config").read_text())  # type: ignore[operator]
    local_cfg = json.loads((env.root / "config/cryptfs/vaults/default.json").read_text())["vault"]
    assert store_cfg == local_cfg and len(store_cfg["slots"]) == 3

    # each slot opens the vault
    assert opens(env, env_=env.env) == 0
    assert opens(env, "--passphrase-file", str(second)) == 0
    assert opens(env, "--key-file", str(key)) == 0
    mount_cli(env, mnt, "-o", f"keyfile={key}", env_=bare)
    try:
        assert (mnt / "data.bin").read_bytes() == data
    finally:
        env.umount(mnt)
    from Crypto.PublicKey import RSA

    other = env.root / "keys" / "other.pem"  # a key without a slot (small: only to be refused)
    other.write_bytes(RSA.generate(1024).export_key(pkcs=8))
    os.chmod(other, 0o600)
    one_line_error(env.cli("log", "--key-file", str(other), env=bare, check=False), 3,
                   "opens no key slot")

    # a removed slot no longer opens it
    env.cli("key", "remove", second_id, "--key-file", str(key), env=bare)
    one_line_error(env.cli("log", "--passphrase-file", str(second), env=bare, check=False), 3,
                   "wrong passphrase")

    # passwd on a terminal: the slot that opened the vault gets the new passphrase
    rc, out = run_on_pty(
        [CRYPTFS, "passwd"], bare,
        [(b"Passphrase: ", PASSPHRASE.encode() + b"\n"),
         (b"New passphrase: ", b"brand new\n"),
         (b"Repeat new passphrase: ", b"brand new\n")],
    )
    assert rc == 0, out
    assert f"key slot {first_id}".encode() in out
    assert opens(env, env_=env.env) == 3  # the old passphrase
    newpf = write_pass(env, "new.pass", "brand new")
    mount_cli(env, mnt, "--passphrase-file", str(newpf), env_=bare)
    try:
        assert (mnt / "data.bin").read_bytes() == data
    finally:
        env.umount(mnt)
    assert env.cli("verify", "--full", "--passphrase-file", str(newpf), env=bare).returncode == 0

    # removing the last slot is refused
    env.cli("key", "remove", pk_id, "--passphrase-file", str(newpf), env=bare)
    one_line_error(env.cli("key", "remove", first_id, "--passphrase-file", str(newpf), env=bare,
                           check=False), 2, "last one")
    one_line_error(env.cli("key", "remove", "00000000", "--passphrase-file", str(newpf),
                           env=bare, check=False), 2, "no key slot")
    assert [s["id"] for s in json.loads(env.cli("key", "list", "--json").stdout)["slots"]] == [
        first_id]
    assert opens(env, "--key-file", str(key)) == 3


def test_master_key_backup() -> None:
    root = _tmp_root()
    try:
        env = VaultEnv(root, f"file://{root}/store")
        res = env.cli("init", env.store_url, "--show-master-key")
        line = next(x for x in res.stdout.splitlines() if x.startswith("master key: "))
        mk = root / "master.key"
        mk.write_text(line + "\n")  # as copied from the screen, label included
        bare = no_passphrase(env)
        assert opens(env, "--master-key-file", str(mk)) == 0
        # with the master key a new slot can be made when every passphrase is lost
        newpf = write_pass(env, "new.pass", "recovered")
        env.cli("key", "add", "--passphrase", "--master-key-file", str(mk),
                "--new-passphrase-file", str(newpf), env=bare)
        assert opens(env, "--passphrase-file", str(newpf)) == 0
        wrong = root / "wrong.key"
        wrong.write_text("00" * 32)
        one_line_error(env.cli("log", "--master-key-file", str(wrong), env=bare, check=False),
                       3, "master key does not open")
        # no master key in the output of a plain init
        env2 = VaultEnv(root, f"file://{root}/store2", name="plain")
        out = env2.cli("init", env2.store_url, "--name", "plain")
        assert "master key" not in out.stdout + out.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- 4. status -------------------------------------------------------------------------------------
def test_status_reports_real_pending_uploads(s3_server: Any, s3_client: Any,
                                             s3_bucket: str) -> None:
    root = Path(_tmp_root())
    proxy = FaultProxy(s3_server.endpoint).start()
    env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={proxy.endpoint}")
    mnt = root / "mnt"
    try:
        env.init("--chunk-size", "65536")
        mount_cli(env, mnt)
        st = status_of(env, mnt)
        assert st["state"] == "mounted" and st["mountpoint"] == str(mnt)
        assert st["store"].startswith(f"s3://{s3_bucket}/vault")
        assert st["pending_objects"] == 0 and st["read_errors"] == 0
        assert st["ledger_seq"] >= 2 and st["checkpoint"].startswith("checkpoints/")

        proxy.set_fault("stall", methods={"PUT"})
        data = random.Random(4).randbytes(5 * 65536)
        (mnt / "five-chunks").write_bytes(data)  # close stages the chunks locally
        staging = env.data_dir / "staging"
        deadline = time.monotonic() + 15
        while True:
            st = status_of(env, mnt)
            if st["pending_objects"] >= 5:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.3)
        assert st["pending_bytes"] >= 5 * 65536
        staged = [p for p in staging.iterdir() if not p.name.endswith(".tmp")]
        assert len(staged) >= 5  # really pending: still in the staging area
        assert not [k for k in _bucket_keys(s3_client, s3_bucket) if k.startswith("vault/data/")]
        text = env.cli("status", str(mnt)).stdout
        assert f"{mnt}: vault 'default', mounted" in text
        assert f"pending uploads: {st['pending_objects']} objects" in text

        proxy.clear()
        deadline = time.monotonic() + 60
        while True:
            st = status_of(env, mnt)
            if st["pending_objects"] == 0 and st["pending_bytes"] == 0:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.5)
        keys = [k for k in _bucket_keys(s3_client, s3_bucket) if k.startswith("vault/data/")]
        assert len(keys) == 5
        assert st["upload_errors"] == 0 and st["read_errors"] == 0
        assert (mnt / "five-chunks").read_bytes() == data
        env.umount(mnt)
        assert not (env.data_dir / "status.json").exists()
        one_line_error(env.cli("status", str(mnt), check=False), 7, "not a cryptfs mount")
    finally:
        proxy.clear()
        if _mounted(str(mnt)):
            _cleanup_mount(env, mnt)
        proxy.stop()
        shutil.rmtree(root, ignore_errors=True)


def _bucket_keys(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", ())]


# -- 5. gc -----------------------------------------------------------------------------------------
def _store_names(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp.")}


def test_gc_deletes_exactly_the_unreferenced(local_env: VaultEnv) -> None:
    env = local_env
    store = env.store_dir
    assert store is not None
    mnt = env.root / "mnt"
    mount_cli(env, mnt)
    try:
        (mnt / "a").write_bytes(random.Random(1).randbytes(2_500_000))
        (mnt / "b").write_bytes(random.Random(2).randbytes(10_000))
        one_line_error(env.cli("gc", check=False), 8, "in use")  # not while mounted
    finally:
        env.umount(mnt)
    before = _store_names(store)
    chunks = sorted(n for n in before if n.startswith("data/"))
    assert len(chunks) >= 3
    rng = random.Random(5)
    copy = "data/{0}/{0}{1}".format(*(lambda h: (h[:2], h[2:]))(rng.randbytes(32).hex()))
    (store / copy).parent.mkdir(exist_ok=True)
    shutil.copyfile(store / chunks[0], store / copy)  # a valid sealed chunk under a new name
    (store / "unknown-object").write_bytes(b"not cryptfs")
    garbage = {copy, "unknown-object"}
    assert env.cli("verify", check=False).returncode == 6

    res = env.cli("gc", "--dry-run", "--grace", "0")
    listed = {ln.split()[2] for ln in res.stdout.splitlines() if ln.startswith("would delete ")}
    assert listed == garbage, res.stdout
    assert _store_names(store) == before | garbage
    res = env.cli("gc", "--dry-run")  # default grace: they are too new
    assert not [ln for ln in res.stdout.splitlines() if ln.startswith("would delete")]
    assert sum(ln.startswith("keeping ") for ln in res.stdout.splitlines()) == 2
    assert _store_names(store) == before | garbage

    res = env.cli("gc", "--grace", "0")
    assert "deleted 2 unreferenced objects" in res.stdout, res.stdout
    after = _store_names(store)
    assert not after & garbage
    assert {n for n in after if n.startswith("data/")} == set(chunks)
    log = env.cli("log", "-n", "20").stdout
    dels = {ln.split()[5] for ln in log.splitlines() if ln.split()[4] == "del"}
    assert garbage <= dels
    assert env.cli("verify", "--full").returncode == 0
    mount_cli(env, mnt)
    try:
        assert (mnt / "a").read_bytes() == random.Random(1).randbytes(2_500_000)
    finally:
        env.umount(mnt)


# -- 6. info and help ------------------------------------------------------------------------------
def test_info_without_passphrase(local_env: VaultEnv) -> None:
    env = local_env
    env.cli("key", "add", "--passphrase", env=dict(env.env, CRYPTFS_NEW_PASSPHRASE="two"))
    bare = no_passphrase(env)
    doc = json.loads(env.cli("info", env.store_url, "--json", env=bare).stdout)
    cfg = json.loads((env.store_dir / "config").read_text())  # type: ignore[operator]
    assert doc["vault_id"] == cfg["vault_id"] and doc["version"] == 1
    assert doc["chunk_size"] == cfg["chunk_size"]
    assert [(s["id"], s["type"]) for s in doc["slots"]] == [
        (s["id"], s["type"]) for s in cfg["slots"]]
    assert doc["configured_as"] == [env.name]
    text = env.cli("info", env.store_url, env=bare).stdout
    assert f"vault id:    {cfg['vault_id']}" in text and "key slots:   2" in text
    empty = env.root / "empty"
    empty.mkdir()
    one_line_error(env.cli("info", f"file://{empty}", env=bare, check=False), 4,
                   "holds no cryptfs vault")


def test_every_command_has_help_with_example(local_env: VaultEnv) -> None:
    commands = [["init"], ["mount"], ["umount"], ["status"], ["verify"], ["fsck"], ["gc"],
                ["log"], ["list"], ["info"], ["key"], ["key", "list"], ["key", "add"],
                ["key", "remove"], ["key", "generate"], ["passwd"]]
    for cmd in commands:
        res = local_env.cli(*cmd, "--help")
        assert "example" in res.stdout, (cmd, res.stdout)
    res = subprocess.run([MOUNT_HELPER, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "example" in res.stdout
    one_line_error(local_env.cli("gc", "--grace", "soon", check=False), 2, "--grace")


def test_gc_on_s3_uses_object_age(s3_server: Any, s3_client: Any, s3_bucket: str) -> None:
    root = Path(_tmp_root())
    env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={s3_server.endpoint}")
    try:
        env.init()
        s3_client.put_object(Bucket=s3_bucket, Key="vault/data/ab/" + "ab" * 32, Body=b"x" * 99)
        s3_client.put_object(Bucket=s3_bucket, Key="outside-the-prefix", Body=b"not ours")
        res = env.cli("gc", "--dry-run", "--grace", "3600")
        assert "keeping data/ab/" + "ab" * 32 + " (99 bytes, " in res.stdout, res.stdout
        res = env.cli("gc", "--grace", "0")
        assert "deleted 1 unreferenced objects (99 bytes)" in res.stdout, res.stdout
        keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
        assert "outside-the-prefix" in keys and "vault/data/ab/" + "ab" * 32 not in keys
        assert env.cli("verify").returncode == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
