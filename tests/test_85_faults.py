"""A mounted S3 vault behind a fault-injecting proxy: what users see when the store misbehaves.

Every vault here stores its chunks in the moto server through a :class:`FaultProxy`
(``s3://<bucket>/vault?endpoint=<proxy>``) and is mounted with the real ``cryptfs`` CLI. The
durability contract (``cryptfs/fs/base.py``) and the S3 store contract (``cryptfs/stores/s3.py``)
say:

* transient store failures (500, 503 SlowDown, connection resets, truncated bodies) are retried:
  writers never see them (close and fsync succeed), readers get the right bytes;
* close stages data locally: it succeeds while the store is down, and the data reaches the store
  once it is back; a machine with nothing but the store then has it;
* a read the store cannot serve within its timeout fails with EIO in bounded time, the mount stays
  responsive meanwhile, and the same read succeeds once the store is back;
* fsync returns only once the data is in the store.

Every test is bounded in time (pytest-timeout) and in the number of requests the proxy sees.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from mount_fixtures import VaultEnv, _mounted, force_unmount

from cryptfs.chunks.chunkstore import FAILED_FETCH_MEMORY

pytestmark = [pytest.mark.timeout(120), pytest.mark.log_problems_expected]  # faults: on purpose

CHUNK = 65536  # small chunks: many objects, so many requests for the faults to hit
MAX_REQUESTS = 3000  # per test: retries must stay bounded
STORE_TIMEOUT = 30.0  # S3Store's default timeout


@dataclass
class Rig:
    env: VaultEnv
    proxy: FaultProxy
    mnt: Path
    bucket: str

    @property
    def chunk_cache(self) -> Path:
        return self.env.root / "cache" / "cryptfs" / "vaults" / self.env.name / "chunks"

    @property
    def staging(self) -> Path:
        return self.env.data_dir / "staging"


def _daemon_pid(env: VaultEnv) -> int | None:
    try:
        return int((env.data_dir / "mount.lock").read_text().strip())
    except (OSError, ValueError):
        return None


def _umount(env: VaultEnv, mnt: Path, timeout: float = 90) -> None:
    """``cryptfs umount`` (which waits until everything is stored)."""
    try:
        env.cli("umount", str(mnt), timeout=timeout)
    finally:
        force_unmount(str(mnt))


@pytest.fixture
def rig(s3_server: Any, s3_bucket: str) -> Iterator[Rig]:
    """An initialised vault (64 KiB chunks) whose store is reached through a fault proxy."""
    # not "cryptfs-test-": other pytest sessions on this machine kill processes matching that
    root = Path(tempfile.mkdtemp(prefix="cfs-faults-", dir="/tmp"))
    os.chmod(root, 0o755)
    proxy = FaultProxy(s3_server.endpoint).start()
    # timeout=10: each store call, retries included, gives up after 10 s (default 30 s)
    env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={proxy.endpoint}&timeout=10")
    mnt = root / "mnt"
    try:
        env.init("--chunk-size", str(CHUNK))  # through the proxy, no faults yet
        yield Rig(env, proxy, mnt, s3_bucket)
    finally:
        proxy.clear()
        try:
            if _mounted(str(mnt)):
                try:
                    _umount(env, mnt, timeout=60)
                except Exception:  # noqa: BLE001 - last resort below
                    pid = _daemon_pid(env)
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    force_unmount(str(mnt))
        finally:
            proxy.stop()
            shutil.rmtree(root, ignore_errors=True)


def content(name: str, size: int) -> bytes:
    return random.Random(f"faults/{name}").randbytes(size)


def chunks_of(size: int) -> int:
    return -(-size // CHUNK)


def objects_of(size: int) -> int:
    """The chunk objects of their own a file of ``size`` bytes stores on S3: its whole chunks
    (its last, partial chunk goes into a pack: docs/FORMAT.md 4.3)."""
    return size // CHUNK


def write_file(path: Path, data: bytes, fsync: bool) -> float:
    """Write ``data`` in uneven pieces, optionally fsync, close; returns the time close took.
    Any failure of write, fsync or close raises."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        step = 100_003
        while view:
            n = os.write(fd, view[:step])
            view = view[n:]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    start = time.monotonic()
    os.close(fd)
    return time.monotonic() - start


def drop_chunk_cache(rig: Rig) -> int:
    """Delete the cached sealed chunks of the running mount, so reads go to the store."""
    n = 0
    for f in rig.chunk_cache.iterdir():
        f.unlink(missing_ok=True)
        n += 1
    return n


def data_objects(s3_client: Any, bucket: str, prefix: str = "vault/data/") -> int:
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return int(listed.get("KeyCount", 0))


def checkpoints(s3_client: Any, bucket: str) -> set[str]:
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="vault/checkpoints/")
    return {o["Key"] for o in listed.get("Contents", ())}


def verify_full(env: VaultEnv) -> None:
    res = env.cli("verify", "--full", check=False, timeout=90)
    assert res.returncode == 0, f"verify --full exited {res.returncode}:\n{res.stdout}{res.stderr}"


def assert_bounded(proxy: FaultProxy) -> None:
    assert proxy.requests < MAX_REQUESTS, f"{proxy.requests} requests: retries unbounded?"


FILES = {"a": 1_200_000, "b": 900_000, "c": 3 * CHUNK, "d": 5000, "e": 700_001}  # ~2.9 MB


# -- 1, 2: transient errors and resets ---------------------------------------------------------


@pytest.mark.timeout(100)
@pytest.mark.parametrize("kind", ["error500", "slowdown503", "reset"])
def test_transient_faults_invisible_to_writers_and_readers(rig: Rig, kind: str) -> None:
    """30% of requests fail (500, 503 SlowDown, or connection reset): writes, fsyncs, closes and
    reads (from the store) all succeed; after clearing, umount completes and verify is clean."""
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    env.mount(mnt)
    files = {name: content(name, size) for name, size in FILES.items()}
    proxy.set_fault(kind, fraction=0.3)
    for i, (name, data) in enumerate(files.items()):
        # every other file fsynced; the last one too, so everything is in the store after it
        write_file(mnt / name, data, fsync=i % 2 == 0 or name == "e")
    assert drop_chunk_cache(rig) >= sum(chunks_of(len(d)) for d in files.values()) - 2
    before = proxy.requests
    for name, data in files.items():
        got = (mnt / name).read_bytes()
        assert got == data, f"{name}: read {len(got)} bytes, wrong content"
    assert proxy.requests - before >= sum(chunks_of(len(d)) for d in files.values()) // 2, (
        "the reads did not go to the store")
    assert proxy.faults[kind] >= 10, f"only {proxy.faults[kind]} faults injected"
    proxy.clear()
    start = time.monotonic()
    _umount(env, mnt)
    assert time.monotonic() - start < 30
    verify_full(env)
    assert_bounded(proxy)


# -- 3: truncated bodies ------------------------------------------------------------------------


@pytest.mark.timeout(100)
def test_truncated_get_bodies_never_give_wrong_data(rig: Rig) -> None:
    """30% of the GET bodies are cut short (full Content-Length, half the bytes): every read
    returns the right bytes (retried) or fails with EIO, never wrong data; verify --full under
    the same fault reports no corruption."""
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    env.mount(mnt)
    files = {name: content(name, size) for name, size in FILES.items()}
    for name, data in files.items():
        write_file(mnt / name, data, fsync=name == "e")
    drop_chunk_cache(rig)
    proxy.set_fault("truncate", fraction=0.3, methods={"GET"})
    failed = []
    for name, data in files.items():
        try:
            got = (mnt / name).read_bytes()
        except OSError as e:
            assert e.errno == errno.EIO, f"{name}: {e}"
            failed.append(name)
            continue
        assert got == data, f"{name}: read {len(got)} bytes of wrong content under truncation"
    assert proxy.faults["truncate"] >= 10, f"only {proxy.faults['truncate']} truncations"
    assert not failed, f"reads of {failed} failed although each GET is retried"
    proxy.clear()
    for name in failed:
        assert (mnt / name).read_bytes() == files[name]
    _umount(env, mnt)
    proxy.set_fault("truncate", fraction=0.3, methods={"GET"})
    res = env.cli("verify", "--full", check=False, timeout=90)
    assert res.returncode == 0, f"verify --full under truncation:\n{res.stdout}{res.stderr}"
    proxy.clear()
    assert_bounded(proxy)


# -- 4: the store is down while files are written and closed --------------------------------------


@pytest.mark.timeout(150)
def test_store_down_close_stages_then_uploads(rig: Rig, s3_client: Any) -> None:
    """Every request is reset for ~20 s while files are written and closed (no fsync): close
    returns at once, the chunks wait in staging; once the store is back they are uploaded, and a
    machine with only the store (and the config) has the files."""
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    env.mount(mnt)
    files = {name: content(name, size) for name, size in FILES.items()}
    expected_chunks = sum(objects_of(len(d)) for d in files.values())
    proxy.set_fault("down")
    down_at = time.monotonic()
    for name, data in files.items():
        took = write_file(mnt / name, data, fsync=False)
        assert took < 3.0, f"close of {name} took {took:.1f}s with the store down"
    assert time.monotonic() - down_at < 10, "writing while the store is down was slow"
    staged = [p for p in rig.staging.iterdir() if not p.name.endswith(".tmp")]
    chunks = [p for p in staged if p.name.startswith("data_")]
    assert len(chunks) == expected_chunks, f"{len(chunks)} staged, expected {expected_chunks}"
    assert any(p.name.startswith("packs_") for p in staged), "no pack staged"
    assert data_objects(s3_client, rig.bucket) == 0
    for name, data in files.items():  # readable from staging meanwhile
        assert (mnt / name).read_bytes() == data
    time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
    assert proxy.faults["down"] > 0
    proxy.clear()
    up_at = time.monotonic()
    while any(rig.staging.iterdir()):
        assert time.monotonic() - up_at < 45, "staged chunks not uploaded 45 s after recovery"
        time.sleep(0.2)
    assert data_objects(s3_client, rig.bucket) == expected_chunks
    assert data_objects(s3_client, rig.bucket, "vault/packs/") >= 1
    _umount(env, mnt)

    # a new machine: only the config (store URL, wrapped key) and the store
    shutil.rmtree(env.root / "data" / "cryptfs" / "vaults")
    shutil.rmtree(env.root / "cache")
    env.mount(mnt)
    try:
        for name, data in files.items():
            got = (mnt / name).read_bytes()
            assert got == data, f"{name} from the store alone: {len(got)} bytes, wrong content"
    finally:
        _umount(env, mnt)
    assert_bounded(proxy)


# -- 5: a read the store cannot serve -------------------------------------------------------------


@pytest.mark.timeout(150)
def test_unrecoverable_read_fails_in_bounded_time(rig: Rig) -> None:
    """A chunk not in the local cache while the store stalls (accepts connections, never
    answers) for longer than the store timeout: the read fails with EIO in bounded time, ``ls``
    of the mount keeps working meanwhile, and the same read succeeds once the store is back.

    The store timeout is 10 s here (``&timeout=10`` in the URL). The kernel re-issues a failed
    read at once (readahead, then the single page); the chunk store remembers the failure for a
    few seconds, so the second try fails at once instead of waiting for the store again."""
    kind = "stall"
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    data = content("big", 3 * CHUNK + 17)
    env.mount(mnt)
    write_file(mnt / "big", data, fsync=False)
    (mnt / "small").write_bytes(b"x")
    _umount(env, mnt)
    shutil.rmtree(env.root / "cache")
    env.mount(mnt)

    result: dict[str, Any] = {}

    def reader() -> None:
        start = time.monotonic()
        try:
            with open(mnt / "big", "rb") as f:
                result["data"] = f.read()
        except OSError as e:
            result["errno"] = e.errno
        result["elapsed"] = time.monotonic() - start

    proxy.set_fault(kind)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    ls_times = []
    while t.is_alive() and len(ls_times) < 200:
        start = time.monotonic()
        res = subprocess.run(["ls", "-l", str(mnt)], capture_output=True, text=True, timeout=10)
        ls_times.append(time.monotonic() - start)
        assert res.returncode == 0 and "small" in res.stdout, res.stderr
        t.join(1.0)
    t.join(40)
    assert not t.is_alive(), "the read still hangs after 40 s"
    assert "data" not in result, "the read succeeded although the store never answered"
    assert result.get("errno") == errno.EIO, result
    assert result["elapsed"] < 20, f"EIO only after {result['elapsed']:.1f}s"
    assert len(ls_times) >= 3 and max(ls_times) < 3, f"ls took {max(ls_times):.1f}s"
    assert proxy.faults[kind] > 0
    proxy.clear()
    time.sleep(FAILED_FETCH_MEMORY + 0.5)  # a failure is remembered this long
    start = time.monotonic()
    assert (mnt / "big").read_bytes() == data
    assert time.monotonic() - start < 10
    _umount(env, mnt)
    assert_bounded(proxy)
    print(f"{kind}: EIO after {result['elapsed']:.1f}s, {len(ls_times)} ls, "
          f"slowest {max(ls_times):.2f}s")


# -- 6: fsync while the store throttles ----------------------------------------------------------


@pytest.mark.timeout(100)
def test_fsync_waits_through_slowdown(rig: Rig, s3_client: Any) -> None:
    """Every request gets 503 SlowDown for 8 s: an fsync started in that stretch returns success
    only after the data is in the store (so not before the stretch ends), within bounded time."""
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    stretch = 8.0
    env.mount(mnt)
    before = checkpoints(s3_client, rig.bucket)
    data = content("synced", 10 * CHUNK + 99)
    proxy.set_fault("slowdown503", seconds=stretch)
    start = time.monotonic()
    fd = os.open(mnt / "synced", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
        synced = time.monotonic() - start
        # in the store now, while the file is still open and the mount still up (an fsync
        # journals the short last chunk, new since its last seal: the checkpoint carries it,
        # docs/FORMAT.md 5.3; only a close packs)
        assert data_objects(s3_client, rig.bucket) == objects_of(len(data))
        assert checkpoints(s3_client, rig.bucket) - before, "fsync wrote no checkpoint"
    finally:
        os.close(fd)
    assert proxy.faults["slowdown503"] > 0
    assert synced >= stretch - 0.5, f"fsync returned after {synced:.1f}s, inside the stretch"
    assert synced < stretch + STORE_TIMEOUT, f"fsync took {synced:.1f}s"
    assert (mnt / "synced").read_bytes() == data
    _umount(env, mnt)
    assert_bounded(proxy)
    print(f"fsync returned after {synced:.1f}s (stretch {stretch}s)")


# -- 7: the store refuses deletes (garbage collection only) ---------------------------------------


@pytest.mark.timeout(60)
def test_fsync_succeeds_when_old_snapshots_cannot_be_deleted(rig: Rig, s3_client: Any) -> None:
    """The store refuses every DELETE (403, e.g. a bucket policy without s3:DeleteObject): the
    data and the new checkpoint still reach the store, so fsync succeeds, whether its own round
    or a later one (the background's) meets the refusal; deleting what the checkpoints made
    obsolete is garbage collection, retried later, and once deletes work again the vault
    verifies clean."""
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    env.mount(mnt)
    data = content("kept", 2 * CHUNK + 5)
    proxy.set_fault("denied403", methods={"DELETE"})
    before = checkpoints(s3_client, rig.bucket)
    start = time.monotonic()
    fd = os.open(mnt / "kept", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fsync_errors = []
    try:
        for i in range(20):  # until a collection was refused (bounded: 10 s)
            os.pwrite(fd, data if i == 0 else b"again %d" % i, 0)
            try:
                os.fsync(fd)
            except OSError as e:
                fsync_errors.append(e)
            if i == 0:
                durable = (data_objects(s3_client, rig.bucket) == objects_of(len(data))
                           and bool(checkpoints(s3_client, rig.bucket) - before))
            if proxy.faults["denied403"] > 0:
                break
            time.sleep(0.5)
    finally:
        os.close(fd)
    took = time.monotonic() - start
    assert proxy.faults["denied403"] > 0, "no DELETE was attempted"
    assert durable, "fsync did not store the data and a checkpoint"
    assert not fsync_errors, (
        f"fsync failed ({fsync_errors[0]}) within {took:.1f}s although the data and the "
        "checkpoints are in the store: only deleting obsolete objects was refused")
    proxy.clear()
    _umount(env, mnt)
    res = env.cli("verify", check=False, timeout=60)
    assert res.returncode == 0, f"verify after refused deletes:\n{res.stdout}{res.stderr}"
    assert_bounded(proxy)


# -- 8: the final checkpoint of an unmount fails ---------------------------------------------------


@pytest.mark.timeout(60)
def test_umount_reports_a_failed_final_checkpoint(rig: Rig) -> None:
    """``cryptfs umount`` promises to return after everything is stored. If the store refuses
    the final checkpoint (403 on PUT), the daemon cannot keep that promise: umount must say so
    (non-zero exit, one line), not report success; the change is stored at the next mount."""
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    env.mount(mnt)
    (mnt / "before").write_bytes(b"x")
    fd = os.open(mnt, os.O_RDONLY)
    try:
        os.fsync(fd)  # everything so far is in the store
    finally:
        os.close(fd)
    os.rename(mnt / "before", mnt / "after")  # a metadata change only the final checkpoint stores
    proxy.set_fault("denied403", methods={"PUT"})
    res = env.cli("umount", str(mnt), check=False, timeout=60)
    force_unmount(str(mnt))
    assert proxy.faults["denied403"] > 0, "the unmount stored nothing"
    assert "closing the vault failed" in env.log_text()
    proxy.clear()
    assert res.returncode != 0, (
        "cryptfs umount exited 0 although the daemon's final checkpoint failed "
        f"(stderr {res.stderr.strip()!r})")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    env.mount(mnt)  # the rename is still in the local state and is stored from here
    try:
        assert sorted(os.listdir(mnt)) == ["after"]
    finally:
        _umount(env, mnt)
    res = env.cli("verify", check=False, timeout=60)
    assert res.returncode == 0, f"verify:\n{res.stdout}{res.stderr}"
    assert_bounded(proxy)


def test_disk_cache_serves_reads_while_the_store_is_down(rig: Rig) -> None:
    """Objects fetched (or uploaded) before are read from the disk cache, also after a remount
    and with the store refusing every read; a sequential read of a file bigger than a quarter
    of the cache does not fill it (it would evict everything else)."""
    env, mnt = rig.env, rig.mnt
    opts = ("cache_size=4M",)  # a stream limit of 1 MiB
    small = {f"s{i}": content(f"s{i}", 5000 + i) for i in range(20)}
    big = content("big", 2 << 20)  # 32 chunks
    env.mount(mnt, *opts)
    for n, d in small.items():
        (mnt / n).write_bytes(d)
    (mnt / "big").write_bytes(big)
    _umount(env, mnt)
    shutil.rmtree(rig.chunk_cache)
    env.mount(mnt, *opts)
    assert all((mnt / n).read_bytes() == d for n, d in small.items())
    assert (mnt / "big").read_bytes() == big
    _umount(env, mnt)
    cached = sorted(f.name for f in rig.chunk_cache.iterdir())
    # the small files' chunks lie in one pack (docs/FORMAT.md 4.3), cached whole; the first
    # chunk of big may be kept
    assert len([n for n in cached if n.startswith("packs_")]) == 1, cached
    assert len([n for n in cached if n.startswith("data_")]) <= 2, cached
    env.mount(mnt, *opts)
    rig.proxy.set_fault("down", methods={"GET"})
    start = time.monotonic()
    assert all((mnt / n).read_bytes() == d for n, d in small.items())
    assert time.monotonic() - start < 5  # no store call waited for its 10 s timeout
    assert rig.proxy.faults["down"] <= 2  # at most the lease's own reads were refused
    rig.proxy.clear()


def test_unrenewable_lease_fences_the_mount_until_a_renewal_finds_it(rig: Rig) -> None:
    """A mount that cannot renew its lease for two thirds of its lifetime could be taken over
    by another machine once the lease expires: it stops writing (EROFS, said in status) and
    writes again only after a renewal finds its own lease still in place. Nothing written
    before the fence is lost."""
    env, proxy, mnt = rig.env, rig.proxy, rig.mnt
    env.extra_env["CRYPTFS_LEASE_SECONDS"] = "3"
    env.mount(mnt)
    try:
        (mnt / "before").write_bytes(b"written before the store went away")
        fd = os.open(mnt, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        proxy.set_fault("down")  # every request reset: no renewal can succeed
        deadline = time.monotonic() + 20
        while True:
            try:
                (mnt / f"probe-{time.monotonic_ns()}").write_bytes(b"x")
            except OSError as e:
                assert e.errno == errno.EROFS, e
                break
            assert time.monotonic() < deadline, "still writable long after the lease ran out"
            time.sleep(0.2)
        deadline = time.monotonic() + 5  # status.json is rewritten once a second
        while True:
            status = env.cli("status", str(mnt), "--json", check=False, timeout=30).stdout
            if "lease could not be renewed" in status:
                break
            assert time.monotonic() < deadline, f"status does not say why: {status}"
            time.sleep(0.5)
        assert (mnt / "before").read_bytes() == b"written before the store went away"
        proxy.clear()
        deadline = time.monotonic() + 20
        while True:  # the next renewal finds the lease still ours: writable again
            try:
                (mnt / "after").write_bytes(b"written after the store came back")
                break
            except OSError as e:
                assert e.errno == errno.EROFS, e
            assert time.monotonic() < deadline, "still read-only after the store came back"
            time.sleep(0.3)
        assert "writable again" in env.log_text()
    finally:
        proxy.clear()
        _umount(env, mnt)
    env.mount(mnt)
    try:
        assert (mnt / "before").read_bytes() == b"written before the store went away"
        assert (mnt / "after").read_bytes() == b"written after the store came back"
    finally:
        _umount(env, mnt)
    verify_full(env)
    assert_bounded(proxy)
