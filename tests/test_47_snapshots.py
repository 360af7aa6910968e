"""Snapshots (issue 17) through the CLI and real FUSE mounts on a local store: created while
the vault is mounted, each ``--at`` mount showing exactly its time beside the live mount,
history, restore (of a deleted file and of an old version) and proofs, gc and the vault's
collection keeping what snapshots hold, ``snapshot delete`` freeing exactly what ``snapshot
list`` said, tampered history refused or EIO; the retention policy with explicit times."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import time
from pathlib import Path

import pytest
from mount_fixtures import _MOUNTS, VaultEnv


def digest(root: Path) -> dict[str, tuple]:
    """Names, types, modes, sizes, contents and link targets of a tree."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode)
            else:
                out[rel] = ("f", st.st_mode, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def store_listing(env: VaultEnv) -> dict[str, int]:
    assert env.store_dir is not None
    return {str(p.relative_to(env.store_dir)): p.stat().st_size
            for p in env.store_dir.rglob("*") if p.is_file() and not p.name.startswith(".tmp.")}


def mount_at(env: VaultEnv, mountpoint: Path, spec: str) -> None:
    mountpoint.mkdir(exist_ok=True)
    env.cli("mount", "--at", spec, str(mountpoint))
    _MOUNTS.add(str(mountpoint))  # unmounted at teardown also if the test fails


def snapshots(env: VaultEnv) -> dict[str, dict]:
    res = env.cli("snapshot", "list", "--json")
    return {s["name"]: s for s in json.loads(res.stdout)["snapshots"]}


def test_history_tells_journaled_bytes_apart(local_env: VaultEnv) -> None:
    """A change of a few bytes fsync'd into a file that stays open is journaled (not a new
    chunk; with the local store, a record of the fsync log): history's "now" is another
    version than the snapshot's, though the size and the chunks are the same."""
    env = local_env
    live = env.root / "live"
    env.mount(live)
    (live / "db").write_bytes(b"a" * 8192)
    env.cli("snapshot", "create", "--name", "before")
    fd = os.open(live / "db", os.O_RDWR)
    try:
        os.pwrite(fd, b"changed", 100)
        os.fsync(fd)
        hist = json.loads(env.cli("history", "/db", "--json").stdout)["versions"]
    finally:
        os.close(fd)
    assert [(v["label"], v["size"]) for v in hist] == [("before", 8192), ("now", 8192)]
    assert hist[0]["version"] != hist[1]["version"]
    env.umount(live)


def test_snapshots_time_travel_history_and_proofs(local_env: VaultEnv) -> None:
    env = local_env
    rnd = random.Random(17)
    live = env.root / "live"
    env.mount(live)
    (live / "a.txt").write_bytes(b"version one\n")
    (live / "dir").mkdir()
    # only s1 will hold it: 3 whole chunks (a file's last, short chunk lies in a pack, which
    # can be shared: docs/FORMAT.md 4.3)
    (live / "dir" / "gone.bin").write_bytes(rnd.randbytes(3 << 18))
    os.symlink("a.txt", live / "link")
    t1 = digest(live)
    out = env.cli("snapshot", "create", "--name", "s1").stdout  # while mounted: via the daemon
    assert "s1" in out

    (live / "a.txt").write_bytes(b"version two, longer\n")
    os.unlink(live / "dir" / "gone.bin")
    (live / "c.bin").write_bytes(rnd.randbytes(300_000))
    os.chmod(live / "dir", 0o700)
    t2 = digest(live)
    env.cli("snapshot", "create", "--name", "s2")
    between = time.time()

    os.unlink(live / "a.txt")
    (live / "d.bin").write_bytes(rnd.randbytes(200_000))
    fd = os.open(live, os.O_RDONLY)
    os.fsync(fd)  # one more checkpoint
    os.close(fd)
    t3 = digest(live)
    assert len({json.dumps(t, sort_keys=True) for t in (t1, t2, t3)}) == 3

    # the past beside the live mount: s1 by name, s2 by a time after it
    m1, m2 = env.root / "m1", env.root / "m2"
    mount_at(env, m1, "s1")
    mount_at(env, m2, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(between + 1)))
    assert digest(m1) == t1
    assert digest(m2) == t2
    assert digest(live) == t3
    with pytest.raises(OSError) as ei:
        (m1 / "new").write_bytes(b"x")
    assert ei.value.errno == errno.EROFS
    env.umount(m1)
    env.umount(m2)

    # single files without mounting the past: versions, a deleted file, an old version
    hist_a = json.loads(env.cli("history", "/a.txt", "--json").stdout)["versions"]
    assert [(v["label"], v["kind"], v["size"]) for v in hist_a] == \
        [("s1", "file", 12), ("s2", "file", 20), ("now", "absent", 0)]
    assert hist_a[0]["version"] != hist_a[1]["version"]
    hist = json.loads(env.cli("history", "dir/gone.bin", "--json").stdout)["versions"]
    assert [v["kind"] for v in hist] == ["file", "absent", "absent"]
    env.cli("restore", "/a.txt", "--at", "s2")  # deleted since: through the live mount
    assert (live / "a.txt").read_bytes() == b"version two, longer\n"
    env.cli("restore", "/a.txt", "--at", "s1", "--to", "/a-v1.txt")
    assert (live / "a-v1.txt").read_bytes() == b"version one\n"

    # a proof verifies, with the vault and with the published key alone
    proof = json.loads(env.cli("prove", "/a.txt", "--at", "s1").stdout)
    assert proof["sha256"] == hashlib.sha256(b"version one\n").hexdigest()
    assert proof["size"] == 12 and proof["seq"] == hist_a[0]["seq"]
    good = env.root / "proof.json"
    good.write_text(json.dumps(proof))
    assert "valid" in env.cli("verify-proof", str(good)).stdout
    env.cli("verify-proof", str(good), "--public-key", proof["public_key"])
    # an edited one does not (the CLI once, every field in-process)
    bad = env.root / "bad.json"
    bad.write_text(json.dumps({**proof, "sha256": hashlib.sha256(b"other").hexdigest()}))
    res = env.cli("verify-proof", str(bad), check=False)
    assert res.returncode == 6 and "forged or edited" in res.stderr, res.stderr
    from cryptfs.admin.history import check_signature, parse_proof
    from cryptfs.errors import IntegrityError

    check_signature(parse_proof(good.read_bytes()), proof["public_key"])
    for field, value in proof.items():
        if field == "public_key":
            continue
        edited = value + 1 if isinstance(value, int) else \
            ("0" if value[:1] != "0" else "1") + value[1:]
        with pytest.raises(IntegrityError):
            check_signature(parse_proof(json.dumps({**proof, field: edited}).encode()),
                            proof["public_key"])
    env.umount(live)

    # restore into the unmounted vault: its next checkpoint ("now") holds s1's version
    env.cli("restore", "/a.txt", "--at", "s1")
    hist = json.loads(env.cli("history", "/a.txt", "--json").stdout)["versions"]
    assert hist[-1]["label"] == "now" and hist[-1]["version"] == hist_a[0]["version"]

    # gc (grace 0) keeps everything snapshots hold: the past still reads back exactly
    env.cli("gc", "--grace", "0")
    mount_at(env, m1, "s1")
    assert digest(m1) == t1
    env.umount(m1)

    # what s1 alone holds is what deleting it frees
    listed = snapshots(env)
    s1, s2 = listed["s1"], listed["s2"]
    assert s1["only_bytes"] >= 600_000 and s1["only_objects"] >= 3
    before = store_listing(env)
    env.cli("snapshot", "delete", "s1")
    env.cli("gc", "--grace", "0")
    after = store_listing(env)
    gone = set(before) - set(after)
    # the checkpoints written meanwhile rotate the live state's own image and checkpoints
    rotated = {n for n in gone if n.startswith(("meta/", "checkpoints/"))
               and n not in (s1["checkpoint"], s1["meta"])}
    freed = gone - rotated
    assert sum(before[n] for n in freed) == s1["only_bytes"]
    assert len(freed) == s1["only_objects"]
    assert not any(n.startswith("snapshots/") and s1["id"] in n for n in after)
    env.cli("verify", "--full")  # the ledger records the pins and their deletion: clean

    # tampering with s2's history: a chunk gives EIO, its metadata image refuses the mount
    assert env.store_dir is not None
    mount_at(env, m2, "s2")
    victim = _chunk_of(env, m2 / "c.bin")
    data = bytearray((env.store_dir / victim).read_bytes())
    data[40] ^= 1
    (env.store_dir / victim).write_bytes(bytes(data))
    with pytest.raises(OSError) as ei:
        (m2 / "c.bin").read_bytes()
    assert ei.value.errno == errno.EIO
    env.umount(m2)
    meta = env.store_dir / s2["meta"]
    data = bytearray(meta.read_bytes())
    data[60] ^= 1
    meta.write_bytes(bytes(data))
    res = env.cli("mount", "--at", "s2", str(m2), check=False)
    assert res.returncode == 6, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and s2["meta"] in res.stderr


def _chunk_of(env: VaultEnv, path: Path) -> str:
    """The store object holding the first chunk of ``path`` in the --at mount (read from that
    mount's own metadata database)."""
    import sqlite3

    at_root = env.data_dir / "at"
    db = max(at_root.glob("*/metadata.db"), key=lambda p: p.parent.stat().st_mtime_ns)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ino = path.stat().st_ino
        rows = con.execute("SELECT obj FROM blocks WHERE ino = ? ORDER BY idx", (ino,)).fetchall()
        if not rows:  # libfuse's inode numbers are its own: find the file by name instead
            rows = con.execute(
                "SELECT b.obj FROM blocks b JOIN dentries d ON d.ino = b.ino "
                "WHERE d.name = ? ORDER BY b.idx", (path.name.encode(),)).fetchall()
    finally:
        con.close()
    return str(rows[0][0])


def _t(text: str) -> int:
    import calendar

    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")) * 10**9


def test_retention_policy_with_explicit_times(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptfs.paths import VaultPaths
    from cryptfs.vault.checkpoints import checkpoint_objects, read_checkpoints
    from cryptfs.vault.core import Vault, create_vault
    from cryptfs.vault.snapshots import (
        apply_policy,
        create_snapshot,
        delete_snapshot,
        get_policy,
        recorded,
        retained,
        set_policy,
    )

    # the rule itself, restic's forget: the newest of each of the last n units that have one
    times = [_t(x) for x in ("2026-03-02 10:00", "2026-03-02 10:30", "2026-03-02 11:10",
                             "2026-03-03 09:00", "2026-03-03 09:40", "2026-03-04 08:00",
                             "2026-03-04 08:20", "2026-02-20 12:00", "2026-01-05 12:00")]
    assert retained(times, {"hourly": 2}) == {_t("2026-03-04 08:20"), _t("2026-03-03 09:40")}
    assert retained(times, {"hourly": 1, "daily": 4}) == {
        _t("2026-03-04 08:20"), _t("2026-03-03 09:40"), _t("2026-03-02 11:10"),
        _t("2026-02-20 12:00")}
    # 2026-03-02..04 are ISO week 10, 02-20 week 8, 01-05 week 2
    assert retained(times, {"weekly": 2}) == {_t("2026-03-04 08:20"), _t("2026-02-20 12:00")}
    assert retained(times, {"monthly": 5}) == {_t("2026-03-04 08:20"), _t("2026-02-20 12:00"),
                                               _t("2026-01-05 12:00")}
    assert retained(times, {}) == set()

    # applied at checkpoints of a real vault, with explicit clocks
    for k in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"XDG_{k}_HOME", str(tmp_path / k.lower()))
    paths = VaultPaths("unit")
    create_vault(paths, [f"file://{tmp_path}/store"], b"pw", 64 << 10, os.getuid(), os.getgid())
    v = Vault.open(paths, b"pw")
    try:
        manual = create_snapshot(v, "by-hand")
        assert set_policy(v, {"hourly": 2, "daily": 0}) == {"hourly": 2} == get_policy(v)

        def autos() -> list[str]:
            return sorted(s.name for s in (v.pins.snapshot(r.name) for r in recorded(v))
                          if s.name.startswith("auto-"))

        for when in ("2020-05-01 10:10", "2020-05-01 10:50", "2020-05-01 11:05",
                     "2020-05-01 12:30"):
            with v.checkpoints_held() as ck:
                apply_policy(v, ck, v.store.get(ck, 1 << 20), now=_t(when))
        assert autos() == ["auto-2020-05-01T11:05:00Z", "auto-2020-05-01T12:30:00Z"]
        v.sync()  # a real checkpoint at the real time: due, and 11:05 drops out
        now = autos()
        assert len(now) == 2 and now[0] == "auto-2020-05-01T12:30:00Z"
        assert now[1] > "auto-2026"
        assert manual.object in {r.name for r in recorded(v)}  # never touched by the policy

        # a pin the store lost: collection pauses (deletes nothing); deleting it by id resumes it
        set_policy(v, {})
        metas = lambda: {p.name for p in (tmp_path / "store" / "meta").iterdir()}  # noqa: E731
        (tmp_path / "store" / manual.object).unlink()
        v.pins.forget(manual.object)
        kept = metas()
        cks = {p.name for p in (tmp_path / "store" / "checkpoints").iterdir()}
        v.sync()
        assert kept <= metas()  # none deleted
        assert cks < {p.name for p in (tmp_path / "store" / "checkpoints").iterdir()}  # (nor
        # a checkpoint: the new one carries the changes inline, docs/FORMAT.md 6.1)
        delete_snapshot(v, manual.id[:8])
        # collected again: left are the images the automatic snapshots hold, and the current
        held = {o.name for r in recorded(v)
                for o in checkpoint_objects(v.pins.checkpoint(v.pins.snapshot(r.name)))}
        current = {o.name for o in checkpoint_objects(read_checkpoints(v.store, v.codec)[0][0])}
        assert {"meta/" + n for n in metas()} == held | current
    finally:
        v.close()
