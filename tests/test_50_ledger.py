"""The ledger and ``cryptfs verify``: every tamper scenario against a vault written through a
real mount, on the local store and on the moto S3 server.

A template vault per store kind is written once through a mount (three files, 64 KiB chunks);
each test works on a byte copy of it (local files and store objects; the chunk cache is not
copied, so reads after a tamper reach the store). Tampering happens while the vault is
unmounted, directly in the store or in the SQLite database, as an attacker with access to
either would do it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mount_fixtures import VaultEnv, _mounted

from cryptfs.meta.ledger import entry_hash

# tampering, faults, crashes and refusals make the daemon log warnings and errors on purpose
pytestmark = pytest.mark.log_problems_expected

CHUNK = 1 << 16
_rnd = random.Random(50)
FILES: dict[str, bytes] = {
    "docs/report.bin": _rnd.randbytes(3 * CHUNK + 3392),  # 4 chunks
    "docs/other.bin": _rnd.randbytes(3 * CHUNK + 3392),  # 4 chunks, same object sizes
    "notes.txt": b"meeting at noon\n",
}
REPORT = "/docs/report.bin"


def _tmp_root() -> Path:
    """A private root outside the 'cryptfs-test-' names that other test sessions sweep."""
    base = Path(tempfile.mkdtemp(prefix="cfs-ledger-", dir="/tmp"))
    os.chmod(base, 0o755)
    return base


# -- template vaults and their copies -------------------------------------------------------------
@pytest.fixture(scope="module")
def _templates() -> Iterator[dict[str, Any]]:
    made: dict[str, Any] = {}
    yield made
    for kind, env in made.items():
        if kind.startswith("_"):
            continue
        shutil.rmtree(env.root, ignore_errors=True)
    client, bucket = made.get("_s3_client"), made.get("_s3_bucket")
    if client is not None and bucket is not None:
        with contextlib.suppress(Exception):
            for key in _s3_keys(client, bucket, ""):
                client.delete_object(Bucket=bucket, Key=key)
            client.delete_bucket(Bucket=bucket)


def _s3_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", ()))
    return keys


def _write_template(env: VaultEnv) -> VaultEnv:
    env.init("--chunk-size", str(CHUNK))
    with mounted_at(env) as mnt:
        for rel, data in FILES.items():
            (mnt / rel).parent.mkdir(exist_ok=True)
            (mnt / rel).write_bytes(data)
    return env


def _template(kind: str, made: dict[str, Any], request: pytest.FixtureRequest) -> VaultEnv:
    if kind not in made:
        root = _tmp_root()
        try:
            if kind == "local":
                made[kind] = _write_template(VaultEnv(root, f"file://{root}/store"))
            else:
                server = request.getfixturevalue("s3_server")
                client = request.getfixturevalue("s3_client")
                bucket = f"cfs-ledger-{uuid.uuid4().hex[:16]}"
                client.create_bucket(Bucket=bucket)
                made["_s3_client"], made["_s3_bucket"] = client, bucket
                url = f"s3://{bucket}/vault?endpoint={server.endpoint}"
                made[kind] = _write_template(VaultEnv(root, url))
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    return made[kind]


@pytest.fixture
def vault(
    store_kind: str, _templates: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[VaultEnv]:
    """A copy of the template vault (unmounted), on its own store."""
    tpl = _template(store_kind, _templates, request)
    root = _tmp_root()
    try:
        for sub in ("config", "data"):
            shutil.copytree(tpl.root / sub, root / sub, symlinks=True)
        if store_kind == "local":
            assert tpl.store_dir is not None
            shutil.copytree(tpl.store_dir, root / "store", symlinks=True)
            url = f"file://{root}/store"
        else:
            client = request.getfixturevalue("s3_client")
            bucket = request.getfixturevalue("s3_bucket")
            url = request.getfixturevalue("s3_url")
            src = _templates["_s3_bucket"]
            for key in _s3_keys(client, src, "vault/"):
                client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src, "Key": key})
        cfg = root / "config" / "cryptfs" / "vaults" / f"{tpl.name}.json"
        body = json.loads(cfg.read_text())
        body["store"] = url
        cfg.write_text(json.dumps(body))
        yield VaultEnv(root, url)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


# -- helpers --------------------------------------------------------------------------------------
@contextlib.contextmanager
def mounted_at(env: VaultEnv, *opts: str) -> Iterator[Path]:
    mnt = env.root / "mnt"
    env.mount(mnt, *opts)
    try:
        yield mnt
    finally:
        if _mounted(str(mnt)):
            env.umount(mnt)


def drop_cache(env: VaultEnv) -> None:
    """Forget cached sealed chunks (S3), so the next read fetches from the store."""
    shutil.rmtree(env.root / "cache", ignore_errors=True)


def db(env: VaultEnv) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(env.db))


def chunk_objects(env: VaultEnv, path: str) -> list[str]:
    """The chunk objects of a file, in order, from the (unmounted) vault's database."""
    with db(env) as c:
        ino = 1
        for part in path.strip("/").split("/"):
            row = c.execute(
                "SELECT ino FROM dentries WHERE parent = ? AND name = ?", (ino, part.encode())
            ).fetchone()
            assert row is not None, f"{path}: no entry {part!r}"
            ino = row[0]
        return [
            r[0] for r in c.execute("SELECT obj FROM blocks WHERE ino = ? ORDER BY idx", (ino,))
        ]


def ledger_rows(env: VaultEnv) -> list[tuple[Any, ...]]:
    with db(env) as c:
        return c.execute(
            "SELECT seq, time_ns, op, name, size, sha256, prev, hash FROM ledger ORDER BY seq"
        ).fetchall()


def newest_checkpoint_seq(env: VaultEnv) -> int:
    with contextlib.closing(env.store()) as st:
        names = sorted(n for n, _ in st.list("checkpoints/"))
    return int(names[-1].rsplit("/", 1)[1])


def pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def assert_eio(path: Path, offset: int = 0, size: int = 1 << 20) -> None:
    with pytest.raises(OSError) as ei:
        pread(path, offset, size)
    assert ei.value.errno == errno.EIO, ei.value


def verify(env: VaultEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return env.cli("verify", *args, check=False)


def problems(res: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines of a ``verify`` run (everything but the 'verify: ...' lines)."""
    return [x for x in res.stdout.splitlines() if x and not x.startswith("verify:")]


def assert_problem(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A failed run (exit 6, summary with counts) with a problem line containing every needle;
    returns that line."""
    assert res.returncode == 6, (res.returncode, res.stdout, res.stderr)
    summary = res.stdout.strip().splitlines()[-1]
    assert re.match(r"verify: \d+ problem\(s\) - \d+ ledger entries", summary), summary
    hits = [x for x in problems(res) if all(n in x for n in needles)]
    assert hits, f"no problem line with {needles}:\n{res.stdout}"
    return hits[0]


def assert_clean(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert problems(res) == []
    assert res.stdout.strip().splitlines()[-1].startswith("verify: clean - ")


def assert_mount_refused(env: VaultEnv, *needles: str) -> str:
    """A read-write mount must fail with one line naming the reason and the accept command."""
    mnt = env.root / "mnt"
    mnt.mkdir(exist_ok=True)
    res = env.cli("mount", "--name", env.name, str(mnt), check=False)
    if _mounted(str(mnt)):
        env.umount(mnt)
        pytest.fail(f"the vault mounted read-write: {res.stderr}")
    assert res.returncode != 0, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "refusing to mount read-write" in lines[0]
    assert "cryptfs verify --accept" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def store_objects(env: VaultEnv) -> dict[str, bytes]:
    with contextlib.closing(env.store()) as st:
        return {n: st.get(n, 1 << 30) for n, _ in st.list("")}


def put_object(env: VaultEnv, name: str, data: bytes) -> None:
    with contextlib.closing(env.store()) as st:
        st.put(name, data)


def get_object(env: VaultEnv, name: str) -> bytes:
    with contextlib.closing(env.store()) as st:
        return st.get(name, 1 << 30)


def delete_object(env: VaultEnv, name: str) -> None:
    with contextlib.closing(env.store()) as st:
        st.delete(name)


# -- 1-4: objects in the store --------------------------------------------------------------------
def test_1_flipped_byte_fails_read_and_verify_names_file(vault: VaultEnv) -> None:
    obj = chunk_objects(vault, REPORT)[1]
    blob = bytearray(get_object(vault, obj))
    blob[100] ^= 0x01  # in the chunk's first segment (FORMAT.md 4), which the reads below touch
    put_object(vault, obj, bytes(blob))
    drop_cache(vault)
    with mounted_at(vault) as mnt:
        assert pread(mnt / "docs/report.bin", 0, CHUNK) == FILES["docs/report.bin"][:CHUNK]
        assert_eio(mnt / "docs/report.bin", CHUNK + 10, 100)
        with pytest.raises(OSError) as ei:
            (mnt / "docs/report.bin").read_bytes()
        assert ei.value.errno == errno.EIO
        assert (mnt / "docs/other.bin").read_bytes() == FILES["docs/other.bin"]
    assert REPORT in vault.log_text()
    res = verify(vault, "--full")
    line = assert_problem(res, "corrupt", obj, REPORT)
    assert "other.bin" not in line and len(problems(res)) == 1, res.stdout


def test_2_deleted_object_fails_read_and_verify_names_file(vault: VaultEnv) -> None:
    obj = chunk_objects(vault, REPORT)[2]
    delete_object(vault, obj)
    drop_cache(vault)
    with mounted_at(vault) as mnt:
        assert_eio(mnt / "docs/report.bin", 2 * CHUNK, 100)
        assert pread(mnt / "docs/report.bin", 0, 100) == FILES["docs/report.bin"][:100]
    res = verify(vault)  # a missing object shows in the listing, no download needed
    assert_problem(res, "missing", obj, REPORT)
    assert len(problems(res)) == 1, res.stdout


@pytest.mark.parametrize("store_kind", ["local"])
def test_verify_json_lists_the_problem(vault: VaultEnv) -> None:
    obj = chunk_objects(vault, REPORT)[0]
    delete_object(vault, obj)
    res = verify(vault, "--json")
    assert res.returncode == 6
    doc = json.loads(res.stdout)
    assert doc["clean"] is False
    assert [(p["kind"], p["object"], p["paths"]) for p in doc["problems"]] == [
        ("missing", obj, [REPORT])
    ]
    # 9 chunks, the metadata snapshot and the checkpoints: the recovery copy is checked too,
    # and the pack the files' last chunks lie in (docs/FORMAT.md 4.3)
    with contextlib.closing(vault.store()) as st:
        recovery = [n for n, _ in st.list("")
                    if n.startswith(("meta/", "checkpoints/", "packs/"))]
    assert doc["objects_checked"] == 9 + len(recovery) and doc["ledger_entries"] > 9


def test_3_swapped_object_fails_read_and_verify_names_file(vault: VaultEnv) -> None:
    victim = chunk_objects(vault, REPORT)[1]
    donor = chunk_objects(vault, "docs/other.bin")[1]
    donor_blob = get_object(vault, donor)
    assert len(donor_blob) == len(get_object(vault, victim))  # a same-size, valid object
    put_object(vault, victim, donor_blob)
    drop_cache(vault)
    with mounted_at(vault) as mnt:
        assert_eio(mnt / "docs/report.bin", CHUNK, 100)
        assert (mnt / "docs/other.bin").read_bytes() == FILES["docs/other.bin"]
    res = verify(vault, "--full")
    line = assert_problem(res, "corrupt", victim, REPORT)
    assert "other.bin" not in line and len(problems(res)) == 1, res.stdout


def test_4a_deleted_object_put_back_is_detected(vault: VaultEnv) -> None:
    """Write, snapshot the object, overwrite the file (the old object is collected), put the old
    bytes back under their name: verify reports the replay."""
    obj = chunk_objects(vault, REPORT)[0]
    old = get_object(vault, obj)
    with mounted_at(vault) as mnt:
        (mnt / "docs/report.bin").write_bytes(b"new contents\n")
    with contextlib.closing(vault.store()) as st:
        assert not st.exists(obj), "the overwritten chunk was not collected"
        st.put(obj, old)
    res = verify(vault)
    assert_problem(res, "replayed", obj, "deleted at ledger sequence")
    assert len(problems(res)) == 1, res.stdout


def test_4b_a_chunk_written_again_is_the_same_object_so_putting_the_first_back_changes_nothing(
    vault: VaultEnv,
) -> None:
    """The same chunk written twice (collected in between) is sealed twice to the same bytes:
    the nonce is derived from its name and padded length (FORMAT.md 4, convergent sealing), so
    putting the first version back changes nothing a read or ``verify --full`` sees. (An
    older cryptfs sealed with random nonces: such an authentic older sealing under the name
    holds the same plaintext, which test_20 checks still opens.)"""
    obj = chunk_objects(vault, REPORT)[0]
    old = get_object(vault, obj)
    data = FILES["docs/report.bin"]
    with mounted_at(vault) as mnt:
        f = mnt / "docs/report.bin"
        f.write_bytes(b"x")
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # a checkpoint: the old chunks are collected (by it or soon after)
        finally:
            os.close(fd)
        with contextlib.closing(vault.store()) as st:
            deadline = time.monotonic() + 30
            while st.exists(obj) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not st.exists(obj)
        f.write_bytes(data)
    assert chunk_objects(vault, REPORT)[0] == obj
    assert get_object(vault, obj) == old  # sealed again to the same bytes
    put_object(vault, obj, old)
    drop_cache(vault)
    with mounted_at(vault) as mnt:
        assert pread(mnt / "docs/report.bin", 0, 100) == data[:100]
        assert pread(mnt / "docs/report.bin", CHUNK, 100) == data[CHUNK : CHUNK + 100]
    assert_clean(verify(vault, "--full"))


# -- 5-6: the local ledger ------------------------------------------------------------------------
def test_5_edited_ledger_row_breaks_chain_at_its_sequence(vault: VaultEnv) -> None:
    obj = chunk_objects(vault, REPORT)[1]
    with db(vault) as c:
        (seq,) = c.execute(
            "SELECT seq FROM ledger WHERE name = ? AND op = 'put'", (obj,)
        ).fetchone()
        c.execute("UPDATE ledger SET size = size + 1 WHERE seq = ?", (seq,))
        c.commit()
    line = assert_problem(verify(vault), f"chain broken at sequence {seq} ", "modified")
    assert REPORT in line
    assert_mount_refused(vault, f"sequence {seq}")

    # an attacker who also rewrites every later hash keeps the chain consistent: the anchors
    # (local head file, store checkpoint; both MAC'd) still disagree with it
    prev = None
    with db(vault) as c:
        for seq_, t, op, name, size, sha, prev_, _h in ledger_rows(vault):
            if seq_ < seq:
                continue
            prev = prev_ if prev is None else prev
            h = entry_hash(seq_, t, op, name, size, sha, prev)
            c.execute("UPDATE ledger SET prev = ?, hash = ? WHERE seq = ?", (prev, h, seq_))
            prev = h
        c.commit()
    res = verify(vault)
    assert not [x for x in problems(res) if "chain broken" in x], res.stdout
    assert_problem(res, "disagree", "checkpoint")


def test_6_deleted_ledger_tail_detected_against_store_checkpoint(vault: VaultEnv) -> None:
    ck = newest_checkpoint_seq(vault)
    last = ledger_rows(vault)[-1][0]
    n = last - ck + 2  # the ledger now ends before the store's newest checkpoint
    with db(vault) as c:
        c.execute("DELETE FROM ledger WHERE seq > ?", (last - n,))
        c.commit()
    res = verify(vault)
    assert_problem(res, f"behind the store's checkpoint (sequence {ck})")
    assert_problem(res, "this machine saw sequence")  # the local head file agrees
    # without the local head file (a new machine, or the attacker removed it too)
    (vault.data_dir / "head.json").unlink()
    res = verify(vault)
    assert_problem(res, f"behind the store's checkpoint (sequence {ck})")
    assert_mount_refused(vault, f"sequence {ck}")


def test_6b_one_deleted_ledger_row_is_detected(vault: VaultEnv) -> None:
    """Even the entries written after the newest checkpoint (its own entry, collections) are
    anchored by the local head file."""
    with db(vault) as c:
        c.execute("DELETE FROM ledger WHERE seq = (SELECT MAX(seq) FROM ledger)")
        c.commit()
    assert_problem(verify(vault), "ledger entries were deleted")


# -- 7: the whole store rolled back ---------------------------------------------------------------
def snapshot_store(env: VaultEnv, dest: Path) -> dict[str, bytes] | None:
    if env.store_dir is not None:
        shutil.copytree(env.store_dir, dest, symlinks=True)
        return None
    return store_objects(env)


def restore_store(env: VaultEnv, dest: Path, objs: dict[str, bytes] | None) -> None:
    if env.store_dir is not None:
        shutil.rmtree(env.store_dir)
        shutil.copytree(dest, env.store_dir, symlinks=True)
        return
    assert objs is not None
    with contextlib.closing(env.store()) as st:
        for name, _ in list(st.list("")):
            if name not in objs:
                st.delete(name)
        for name, data in objs.items():
            st.put(name, data)


def test_7_store_rollback_refused_then_accepted(vault: VaultEnv, tmp_path: Path) -> None:
    saved = snapshot_store(vault, tmp_path / "old-store")
    new = random.Random(7).randbytes(CHUNK + 100)
    with mounted_at(vault) as mnt:
        (mnt / "new.bin").write_bytes(new)
        (mnt / "notes.txt").unlink()
        (mnt / "docs/other.bin").rename(mnt / "docs/renamed.bin")
    restore_store(vault, tmp_path / "old-store", saved)

    msg = assert_mount_refused(vault, "the store was rolled back")
    assert len(msg) < 400
    assert_problem(verify(vault), "the store was rolled back")
    with mounted_at(vault, "ro") as mnt:  # read-only is allowed, with the warning logged
        assert (mnt / "docs/report.bin").read_bytes() == FILES["docs/report.bin"]
    assert "rolled back" in vault.log_text()

    res = vault.cli("verify", "--accept", check=False)
    assert "accepted the current state" in res.stdout, res.stdout + res.stderr
    assert not [x for x in problems(res) if "rolled back" in x or "replayed" in x], res.stdout
    if vault.store_dir is None:
        # the chunks of new.bin were still in the local cache: uploaded again
        assert_clean(res)
        expect_new: bytes | None = new
    else:
        # new.bin's chunks are gone with the rollback: named, and nothing else
        assert {x.split(":")[0] for x in problems(res)} == {"missing"}, res.stdout
        assert all("/new.bin" in x for x in problems(res)), res.stdout
        assert "files with lost data: /new.bin\n" in res.stdout
        expect_new = None
    with mounted_at(vault) as mnt:
        assert (mnt / "docs/report.bin").read_bytes() == FILES["docs/report.bin"]
        assert (mnt / "docs/renamed.bin").read_bytes() == FILES["docs/other.bin"]
        assert not (mnt / "notes.txt").exists()
        if expect_new is None:
            assert_eio(mnt / "new.bin")
            (mnt / "new.bin").unlink()  # the user gives up the lost file
        else:
            assert (mnt / "new.bin").read_bytes() == new
    assert_clean(verify(vault, "--full"))


# -- 8: a forged checkpoint -----------------------------------------------------------------------
def test_8_forged_checkpoints_are_rejected(vault: VaultEnv) -> None:
    from cryptfs.format.codec import Codec
    from cryptfs.format.layout import checkpoint_name
    from cryptfs.meta.ledger import head_mac

    ck = newest_checkpoint_seq(vault)
    genuine_name = checkpoint_name(ck)
    genuine = get_object(vault, genuine_name)
    # (a) a genuine checkpoint copied to a newer name; (b) one built under another key
    replayed, foreign = checkpoint_name(ck + 50), checkpoint_name(ck + 100)
    put_object(vault, replayed, genuine)
    with open(vault.root / "config" / "cryptfs" / "vaults" / "default.json") as f:
        vault_id = bytes.fromhex(json.load(f)["vault"]["vault_id"])
    evil = Codec(os.urandom(32), vault_id)
    head = os.urandom(32)
    body = {
        "seq": ck + 100,
        "hash": head.hex(),
        "mac": head_mac(evil.ledger_key, ck + 100, head).hex(),
        "time_ns": time.time_ns(),
        "meta": {"name": "meta/" + "0" * 32, "size": 1, "sha256": "00" * 32},
        "tail": [],
    }
    put_object(vault, foreign, evil.seal_blob(b"checkpoint", foreign, json.dumps(body).encode()))

    res = verify(vault)
    for name in (replayed, foreign):
        assert_problem(res, f"checkpoint {name}: rejected")
    assert len(problems(res)) == 2, res.stdout
    assert_mount_refused(vault, "rejected")

    # a new machine restores from the newest authentic checkpoint, not from a forged one
    shutil.rmtree(vault.data_dir)
    drop_cache(vault)
    res = verify(vault, "--full")
    assert len(problems(res)) == 2 and all("rejected" in x for x in problems(res)), res.stdout
    with db(vault) as c:  # garbage collection keeps the newest checkpoints it knows
        known = {r[0] for r in c.execute("SELECT name FROM objects")}
    assert genuine_name in known and not known & {replayed, foreign}
    res = vault.cli("verify", "--accept", check=False)  # removes the forged objects
    assert_clean(res)
    assert "lost" not in res.stdout


# -- 9: clean -------------------------------------------------------------------------------------
def test_9_clean_vault_verifies_clean(vault: VaultEnv) -> None:
    assert_clean(verify(vault))
    res = verify(vault, "--full")
    assert_clean(res)
    with contextlib.closing(vault.store()) as st:  # and the snapshot and checkpoints
        n = 9 + sum(1 for x, _ in st.list("")
                    if x.startswith(("meta/", "checkpoints/", "packs/")))
    assert re.search(rf"{n} objects checked, {n} downloaded and authenticated", res.stdout), \
        res.stdout


@pytest.mark.parametrize("store_kind", ["local"])
def test_log_prints_newest_entries(vault: VaultEnv) -> None:
    res = vault.cli("log", "-n", "5")
    lines = res.stdout.splitlines()
    assert len(lines) == 5, res.stdout
    seqs = [int(x.split()[0]) for x in lines]
    last = ledger_rows(vault)[-1][0]
    assert seqs == list(range(last, last - 5, -1))
    assert all(re.search(r" (put|del|accept) +\S+ \(\d+ bytes\)$", x) for x in lines), lines


# -- scale ----------------------------------------------------------------------------------------
def test_verify_full_on_2000_chunks() -> None:
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/store")
    try:
        env.init("--chunk-size", "4096")
        data = random.Random(2000).randbytes(8704 << 10)  # 8.5 MiB: 2176 chunks
        with mounted_at(env) as mnt:
            (mnt / "big.bin").write_bytes(data)
        t0 = time.monotonic()
        res = env.cli("verify", "--full", check=False)
        elapsed = time.monotonic() - t0
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print(f"\n$ cryptfs verify --full\n{res.stdout}{res.stderr}(elapsed {elapsed:.1f} s)")
    assert_clean(res)
    m = re.search(r"(\d+) objects checked, (\d+) downloaded", res.stdout)
    assert m and int(m.group(1)) >= 2000 and int(m.group(2)) == int(m.group(1)), res.stdout
