"""Object stores: one contract suite run against every store, then store-specific behaviour.

S3 runs against a real moto server process; failures are injected with :class:`FaultProxy`.
"""

from __future__ import annotations

import http.client
import os
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from s3server import MotoServer, free_port

from cryptfs.errors import IntegrityError, ObjectNotFound, StoreError, UsageError
from cryptfs.stores import ObjectStore, open_store
from cryptfs.stores.local import LocalStore
from cryptfs.stores.memory import MemoryStore

BOUND = 1 << 30  # the most bytes a test reads of one object

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck run


@pytest.fixture(params=["memory", "local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "memory":
        s: ObjectStore = MemoryStore()
    elif request.param == "local":
        s = open_store(f"file://{tmp_path}/store", create=True)
    else:
        s = open_store(request.getfixturevalue("s3_url"))
    yield s
    s.close()


# -- the contract, for every store -------------------------------------------------------------

def test_put_get_exists_delete(store: ObjectStore) -> None:
    assert not store.exists("data/aa/one")
    store.put("data/aa/one", b"first object")
    assert store.exists("data/aa/one")
    assert store.get("data/aa/one", BOUND) == b"first object"
    store.put("empty", b"")
    assert store.get("empty", BOUND) == b""
    store.delete("data/aa/one")
    assert not store.exists("data/aa/one")
    store.delete("data/aa/one")  # absent: not an error
    store.delete("never/was/there")


def test_missing_object_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.get("data/zz/missing", BOUND)
    assert "data/zz/missing" in str(info.value)
    assert "\n" not in info.value.line()


def test_list_with_and_without_prefix(store: ObjectStore) -> None:
    objects = {"data/aa/1": b"x" * 10, "data/ab/2": b"y" * 20, "data/b/3": b"", "meta/head": b"z"}
    for name, data in objects.items():
        store.put(name, data)
    assert sorted(store.list()) == sorted((n, len(d)) for n, d in objects.items())
    assert sorted(store.list("data/")) == [("data/aa/1", 10), ("data/ab/2", 20), ("data/b/3", 0)]
    assert sorted(store.list("data/a")) == [("data/aa/1", 10), ("data/ab/2", 20)]
    assert list(store.list("meta/head")) == [("meta/head", 1)]
    assert list(store.list("nothing/")) == []


def test_large_object_round_trip(store: ObjectStore) -> None:
    data = os.urandom(20 << 20)
    store.put("data/big", data)
    assert store.get("data/big", BOUND) == data
    assert list(store.list("data/big")) == [("data/big", len(data))]


def test_concurrent_puts_and_gets(store: ObjectStore) -> None:
    def work(t: int) -> None:
        for i in range(6):
            name, data = f"data/{t}/{i}", os.urandom(1000 * (t + 1) + i)
            store.put(name, data)
            assert store.get(name, BOUND) == data

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, t) for t in range(8)]:
            future.result(timeout=60)
    assert len(list(store.list("data/"))) == 48


def test_get_range_reads_exactly_and_checks_the_size(store: ObjectStore) -> None:
    """A range read returns exactly the bytes asked; an object of another size than the one
    recorded (truncated, grown) is IntegrityError before any byte is used, a missing one
    ObjectNotFound, a range outside the recorded size a caller's error."""
    data = os.urandom(50000)
    store.put("data/rr/obj", data)
    for off, n in ((0, 1), (0, 50000), (1, 16399), (16399, 2), (49999, 1), (12345, 4096)):
        assert store.get_range("data/rr/obj", off, n, 50000) == data[off : off + n]
    store.put("data/rr/obj", data[:-1])  # truncated: the recorded size is 50,000
    for off, n in ((0, 10), (49990, 10)):
        with pytest.raises(IntegrityError, match="data/rr/obj"):
            store.get_range("data/rr/obj", off, n, 50000)
    store.put("data/rr/obj", data + b"x")  # grown
    with pytest.raises(IntegrityError, match="data/rr/obj"):
        store.get_range("data/rr/obj", 0, 10, 50000)
    with pytest.raises(ObjectNotFound):
        store.get_range("data/rr/missing", 0, 10, 50000)
    for off, n in ((-1, 10), (0, 0), (49999, 2)):
        with pytest.raises(ValueError):
            store.get_range("data/rr/obj", off, n, 50000)


# -- local store -------------------------------------------------------------------------------

def test_local_leaves_no_temp_files_and_uses_mode_0600(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s", create=True)
    for i in range(5):
        store.put(f"data/{i % 2}/obj{i}", b"payload %d" % i)
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert len(files) == 5
    assert not [p for p in files if p.name.startswith(".tmp.")]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


@pytest.mark.parametrize("names_with_files", [False, True])
def test_local_sync_fsyncs_exactly_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names_with_files: bool
) -> None:
    """sync makes durable each object put since the last sync (data and a replaced one) and
    each directory that got an entry, new directories' parents up to the root included;
    nothing else, nothing twice; past SYNCFS_ABOVE it is one syncfs instead. On a filesystem
    where a file's fsync makes its name durable (ext4, xfs) only new directories' parents, each
    once (not the root again for every new directory below it); the next mount syncs each
    parent once, not once for each existing directory it first puts into."""
    from cryptfs.stores import local

    root = tmp_path / "s"
    monkeypatch.setattr(local, "names_durable_with_files", lambda _p: names_with_files)
    store = LocalStore(root, create=True)
    store.put("meta/old", b"x")
    store.sync()
    synced: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(local.os, "fsync", fsync)
    store.put("data/ab/c1", b"1")  # new directories data and data/ab
    store.put("data/ab/c2", b"2")
    store.put("meta/old", b"y")  # replaced (temp file and rename)
    store.delete("data/ab/c2")  # deleted before the sync: nothing to do for it
    store.sync()
    dirs = [root / "data", root] if names_with_files else [root / "data/ab", root / "data",
                                                           root, root / "meta"]
    assert sorted(synced) == sorted([root / "data/ab/c1", root / "meta/old", *dirs])
    synced.clear()
    store.sync()  # nothing put since
    assert synced == []
    store.put("data/cd/c3", b"3")  # one more new directory: its parent, not the root again
    store.put("data/ab/c4", b"4")  # a directory seen before: nothing above it
    store.sync()
    dirs = [root / "data"] if names_with_files else [root / "data/cd", root / "data/ab",
                                                     root / "data"]
    assert sorted(synced) == sorted([root / "data/cd/c3", root / "data/ab/c4", *dirs])
    synced.clear()
    again = LocalStore(root)  # the next mount: every directory exists, none is known durable
    again.put("data/ab/c5", b"5")
    again.sync()
    dirs = [root / "data", root] if names_with_files else [root / "data/ab", root / "data",
                                                           root]
    assert sorted(synced) == sorted([root / "data/ab/c5", *dirs])
    synced.clear()
    again.put("data/cd/c6", b"6")  # in data/ when that sync listed it: nothing above it
    again.sync()
    dirs = [] if names_with_files else [root / "data/cd"]
    assert sorted(synced) == sorted([root / "data/cd/c6", *dirs])
    synced.clear()
    calls: list[int] = []
    monkeypatch.setattr(local, "SYNCFS_ABOVE", 3)
    monkeypatch.setattr(LocalStore, "_syncfs", lambda self: calls.append(1))
    for i in range(4):
        store.put(f"data/ab/n{i}", b"n")
    store.sync()
    assert calls == [1] and synced == []


@pytest.mark.parametrize("name", ["../escape", "data/../../escape", "/abs", ""])
def test_local_refuses_bad_names(tmp_path: Path, name: str) -> None:
    store = LocalStore(tmp_path / "s", create=True)
    with pytest.raises(StoreError):
        store.put(name, b"x")
    assert not (tmp_path / "escape").exists()


def test_local_missing_directory_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        open_store(f"file://{tmp_path}/absent")
    open_store(f"file://{tmp_path}/absent", create=True)
    assert (tmp_path / "absent").is_dir()


# -- open_store ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "ftp://host/x", "/no/scheme", "", "file://relative/path", "file:relative", "s3://",
    "s3://b", "s3://bucket/x?foo=1", "s3://bucket/x?endpoint=ftp://h", "s3://user@bucket/x",
    "s3://bucket/x?endpoint=http://a:1&endpoint=http://b:2",
])
def test_open_store_rejects_bad_urls(url: str) -> None:
    with pytest.raises(UsageError) as info:
        open_store(url)
    line = info.value.line()
    assert "\n" not in line and url in line


def test_open_store_unknown_scheme_lists_supported() -> None:
    with pytest.raises(UsageError, match=r"'ftp'.*file:///.*s3://.*memory://"):
        open_store("ftp://example/x")


def test_open_store_memory() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


def test_open_store_s3_prefix_and_endpoint(s3_server: MotoServer, s3_bucket: str,
                                           s3_client: Any) -> None:
    from cryptfs.stores.s3 import S3Store

    store = open_store(f"s3://{s3_bucket}/some/prefix/?endpoint={s3_server.endpoint}")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint) == (s3_bucket, "some/prefix",
                                                             s3_server.endpoint)
    store.put("data/x", b"abc")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["some/prefix/data/x"]
    again = open_store(store.url)  # the url attribute opens the same store
    assert again.get("data/x", BOUND) == b"abc"
    again.close()
    store.close()


def test_s3_upload_bodies_are_signed_and_not_checksummed_again(s3_url: str) -> None:
    """An upload's body is covered by its SigV4 signature (the payload's SHA-256 in
    x-amz-content-sha256, so S3 refuses a body damaged on the way); no CRC of S3's own is
    computed as well (a second pass over every byte), nor a trailer sent."""
    import hashlib

    store = open_store(s3_url)
    sent: list[Any] = []
    store._client.meta.events.register(  # type: ignore[attr-defined]
        "before-send.s3.PutObject", lambda request, **_kw: sent.append(request))
    try:
        body = os.urandom(300_000)
        store.put("data/signed", body)
        assert store.get("data/signed", BOUND) == body
    finally:
        store.close()
    (req,) = sent
    headers = {k.lower(): v for k, v in req.headers.items()}
    payload = headers["x-amz-content-sha256"]
    payload = payload.decode() if isinstance(payload, bytes) else payload
    assert payload == hashlib.sha256(body).hexdigest()
    assert not [k for k in headers if k.startswith("x-amz-checksum") or k == "x-amz-trailer"]


def test_s3_endpoint_parameter_overrides_env(s3_server: MotoServer, s3_bucket: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    open_store(f"s3://{s3_bucket}?endpoint={s3_server.endpoint}").close()
    with pytest.raises(StoreError, match="cannot reach"):
        open_store(f"s3://{s3_bucket}")  # no parameter: the (dead) env endpoint is used


# -- S3: errors and faults -----------------------------------------------------------------------

def test_s3_unreachable_endpoint(s3_server: MotoServer) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        open_store(f"s3://bucket/vault?endpoint={endpoint}")
    assert time.monotonic() - start < 10
    line = info.value.line()
    assert "\n" not in line and endpoint in line and "cannot reach" in line


def test_s3_missing_bucket(s3_server: MotoServer, s3_client: Any) -> None:
    bucket = f"cryptfs-missing-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/vault?endpoint={s3_server.endpoint}"
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        open_store(url)
    assert time.monotonic() - start < 10
    assert f"bucket {bucket} does not exist" in str(info.value) and info.value.hint
    store = open_store(url, create=True)
    store.put("x", b"1")
    assert open_store(url).get("x", BOUND) == b"1"
    s3_client.delete_object(Bucket=bucket, Key="vault/x")
    s3_client.delete_bucket(Bucket=bucket)


def test_s3_no_credentials(s3_server: MotoServer, s3_bucket: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="credentials") as info:
        open_store(f"s3://{s3_bucket}?endpoint={s3_server.endpoint}")
    assert "\n" not in info.value.line()


def test_s3_pagination(s3_url: str) -> None:
    store = open_store(s3_url)
    store.page_size = 2  # type: ignore[attr-defined]
    for i in range(5):
        store.put(f"p/{i}", b"x" * i)
    assert list(store.list("p/")) == [(f"p/{i}", i) for i in range(5)]


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as p:
        yield p


def _proxied(proxy: FaultProxy, bucket: str, timeout: float = 30.0, fast: bool = False) -> Any:
    """An S3Store through the proxy; ``fast`` shortens its backoff to keep long tests short."""
    from cryptfs.stores.s3 import S3Store

    store = S3Store(bucket, "vault", endpoint_url=proxy.endpoint, timeout=timeout)
    if fast:
        store.base_delay, store.throttle_base_delay = 0.01, 0.02
    return store


def _round_trip(store: ObjectStore, count: int = 20) -> None:
    payloads = {f"data/{i:02d}": os.urandom(500 + 997 * i) for i in range(count)}
    for name, data in payloads.items():
        store.put(name, data)
    for name, data in payloads.items():
        assert store.get(name, BOUND) == data


@pytest.mark.parametrize("kind", ["error500", "slowdown503", "reset"])
def test_s3_retries_transient_faults(proxy: FaultProxy, s3_bucket: str, kind: str) -> None:
    store = _proxied(proxy, s3_bucket, fast=True)
    proxy.set_fault(kind, fraction=0.3)
    start = time.monotonic()
    _round_trip(store)
    assert time.monotonic() - start < 60
    assert proxy.faults[kind] >= 3
    store.close()


def test_s3_access_denied_is_not_retried(proxy: FaultProxy, s3_bucket: str) -> None:
    store = _proxied(proxy, s3_bucket)
    proxy.set_fault("denied403")
    with pytest.raises(StoreError, match="access denied") as info:
        store.put("x", b"1")
    assert proxy.faults["denied403"] == 1 and info.value.hint
    store.close()


def test_s3_truncated_get_never_returns_short_data(proxy: FaultProxy, s3_bucket: str) -> None:
    store = _proxied(proxy, s3_bucket, timeout=2.0)
    payloads = {f"data/{i}": os.urandom(200_000 + i) for i in range(5)}
    for name, data in payloads.items():
        store.put(name, data)
    proxy.set_fault("truncate", seconds=1.5, methods={"GET"})
    outcomes: set[str] = set()
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        for name, data in payloads.items():
            try:
                assert store.get(name, BOUND) == data
                outcomes.add("ok")
            except StoreError as e:
                assert "\n" not in e.line()
                outcomes.add("error")
    assert proxy.faults["truncate"] > 0
    assert "ok" in outcomes  # at least after the stretch
    store.close()


def test_s3_stalled_get_gives_up_within_timeout(proxy: FaultProxy, s3_bucket: str) -> None:
    store = _proxied(proxy, s3_bucket, timeout=3.0)
    store.put("data/x", b"stalled")
    proxy.set_fault("stall", methods={"GET"})
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.get("data/x", BOUND)
    assert time.monotonic() - start < 3.0 + 1.0  # the timeout, plus slack for a busy machine
    assert "\n" not in info.value.line() and proxy.faults["stall"] >= 1
    start = time.monotonic()
    proxy.stop()
    assert time.monotonic() - start < 3
    store.close()


def test_s3_put_survives_outage(proxy: FaultProxy, s3_bucket: str) -> None:
    store = _proxied(proxy, s3_bucket)
    proxy.set_fault("down", seconds=2.0)
    start = time.monotonic()
    store.put("data/x", b"after the outage")  # started during the outage
    assert 1.5 < time.monotonic() - start < 20
    assert proxy.faults["down"] >= 2
    assert store.get("data/x", BOUND) == b"after the outage"
    store.close()


def test_s3_concurrent_through_faults(proxy: FaultProxy, s3_bucket: str) -> None:
    store = _proxied(proxy, s3_bucket)
    proxy.set_fault("reset", fraction=0.2)
    errors: list[Exception] = []

    def work(t: int) -> None:
        try:
            _round_trip_named(store, t)
        except Exception as e:  # collected and checked below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and proxy.faults["reset"] > 0
    store.close()


def _round_trip_named(store: ObjectStore, t: int) -> None:
    for i in range(4):
        name, data = f"data/{t}/{i}", os.urandom(3000 + t * 10 + i)
        store.put(name, data)
        assert store.get(name, BOUND) == data


# -- the proxy itself ------------------------------------------------------------------------------

def test_fault_proxy_counts_and_clears(proxy: FaultProxy) -> None:
    def status(method: str = "GET") -> int:
        host, port = proxy.endpoint.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request(method, "/")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    assert status() == 200 and proxy.requests == 1
    proxy.set_fault("error500")
    assert status() == 500 and proxy.faults["error500"] == 1
    proxy.set_fault("slowdown503", methods={"PUT"})
    proxy.clear("error500")
    assert status() == 200 and proxy.faults["slowdown503"] == 0
    proxy.clear()
    proxy.set_fault("error500", seconds=0.2)
    assert status() == 500
    time.sleep(0.3)
    assert status() == 200
    proxy.set_fault("down")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        status()
    proxy.clear()
    assert status() == 200
    assert proxy.requests == 7 and proxy.faults == {"error500": 2, "down": 1}


def test_names_durable_with_files_by_filesystem_type(tmp_path: Path) -> None:
    """Directory fsyncs are left out on ext4 and xfs only: what stat(1) reports decides."""
    from cryptfs.paths import names_durable_with_files

    for path in (tmp_path, Path("/dev/shm"), Path("/proc")):
        if not path.is_dir():
            continue
        kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert names_durable_with_files(path) == (kind in ("ext2/ext3", "xfs")), (path, kind)
