"""Watching a mount (issue 18): Prometheus metrics, the loopback status endpoint, `cryptfs stats`.

Through real mounts and a real HTTP client: traffic through the mount (writes, reads, an fsync,
cache misses on the moto S3 server) moves the right counters by the right amounts, parsed with
``prometheus_client``'s own parser; histograms have sane buckets; the endpoint listens on
loopback only unless a non-loopback address is given; a second mount on the same port fails
with one line; unmounting closes the port; without ``-o metrics`` no port is opened;
``cryptfs stats`` in a pseudo-terminal shows changing figures and ends on Ctrl-C; every metric
the Grafana dashboard queries exists in a real scrape. One unit test covers the store wrapper
on an in-memory store.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mount_fixtures import CRYPTFS, VaultEnv, _mounted, _tmp_root
from prometheus_client.parser import text_string_to_metric_families

from cryptfs.cli.fuse_ops import CryptfsFUSE
from cryptfs.errors import ObjectNotFound
from cryptfs.fuse_row import FUSE_SAMPLE
from cryptfs.metrics import Metrics, parse_address
from cryptfs.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
MIB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------------
def scrape(addr: str) -> dict[str, Any]:
    """name -> metric family, from a real HTTP GET parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    """Sum of the samples called ``sample`` whose labels include ``labels``."""
    family = re.sub(r"_(total|count|sum|bucket|created)$", "", sample)
    fam = fams.get(family) or fams.get(sample)
    assert fam is not None, f"no metric {sample}"
    return sum(s.value for s in fam.samples if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


def status_json(env: VaultEnv, mnt: Path) -> dict[str, Any]:
    doc = json.loads(env.cli("status", str(mnt), "--json").stdout)
    assert len(doc["mounts"]) == 1
    return dict(doc["mounts"][0])


def metrics_addr(env: VaultEnv, mnt: Path) -> str:
    addr = status_json(env, mnt).get("metrics")
    assert addr, "the mount serves no metrics"
    return str(addr)


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that process ``pid`` listens on (IPv4 and IPv6),
    from /proc: the sockets among its file descriptors in state LISTEN."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:
                    continue
                hexaddr, hexport = local.split(":")
                raw = bytes.fromhex(hexaddr)
                if table == "tcp":
                    addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    addr = socket.inet_ntop(socket.AF_INET6, words)
                out.append((addr, int(hexport, 16)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def check_histogram(fams: dict[str, Any], name: str) -> None:
    """Buckets: sorted bounds ending in +Inf, cumulative counts, +Inf equal to _count."""
    fam = fams[name]
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for s in fam.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        if s.name == name + "_bucket":
            series.setdefault(key, []).append((float(s.labels["le"]), s.value))
        elif s.name == name + "_count":
            counts[key] = s.value
    assert series, name
    for key, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf"), (name, bounds)
        assert len(bounds) >= 10, (name, bounds)
        cum = [c for _, c in buckets]
        assert cum == sorted(cum), (name, key, cum)
        assert cum[-1] == counts[key], (name, key)


def _cleanup(env: VaultEnv, root: Path) -> None:
    for mp in root.glob("mnt*"):
        if _mounted(str(mp)):
            try:
                env.umount(mp)
            except Exception:  # noqa: BLE001 - VaultEnv.umount already forced it away
                pass
    shutil.rmtree(root, ignore_errors=True)


# -- counters move by the right amounts ------------------------------------------------------------
def test_traffic_on_s3_moves_the_right_counters(s3_url: str) -> None:
    root = _tmp_root()
    env = VaultEnv(root, s3_url)
    mnt = root / "mnt"
    try:
        env.init("--chunk-size", str(MIB))
        env.mount(mnt, "metrics=127.0.0.1:0")
        addr = metrics_addr(env, mnt)
        before = scrape(addr)
        assert value(before, "cryptfs_lease_held") == 1
        assert value(before, "cryptfs_readonly", reason="none") == 0
        assert value(before, "cryptfs_store_info", store="main", kind="s3") == 1

        data = random.Random(18).randbytes(3 * MIB)
        fd = os.open(mnt / "three-chunks", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            for off in range(0, len(data), 256 << 10):
                os.write(fd, view[off:off + (256 << 10)])
            os.fsync(fd)  # uploads the chunks and writes a checkpoint before it returns
        finally:
            os.close(fd)
        after = scrape(addr)

        def delta(sample: str, **labels: str) -> float:
            return value(after, sample, **labels) - value(before, sample, **labels)

        assert delta("cryptfs_fuse_written_bytes_total") == 3 * MIB
        assert delta("cryptfs_fuse_operations_total", op="fsync") == 1
        assert delta("cryptfs_fuse_operations_total", op="create") == 1
        writes = delta("cryptfs_fuse_operations_total", op="write")
        assert writes >= 12
        # the latency of a sample: at least the first write of a daemon thread
        assert 1 <= delta("cryptfs_fuse_operation_seconds_count", op="write") < writes
        assert delta("cryptfs_fuse_read_bytes_total") == 0
        # three chunk objects, a metadata snapshot and a checkpoint, at least
        assert delta("cryptfs_store_operation_seconds_count", store="main", op="put") >= 5
        assert delta("cryptfs_store_bytes_total", store="main", op="put") >= 3 * MIB
        assert delta("cryptfs_checkpoint_duration_seconds_count") >= 1
        assert value(after, "cryptfs_checkpoint_snapshot_bytes") > 0
        assert value(after, "cryptfs_uploads_pending_objects") == 0
        assert value(after, "cryptfs_uploads_oldest_pending_age_seconds") == 0
        assert value(after, "cryptfs_ledger_head_sequence") > value(
            before, "cryptfs_ledger_head_sequence")
        assert value(after, "cryptfs_store_errors_total") == 0
        for h in ("cryptfs_fuse_operation_seconds", "cryptfs_store_operation_seconds",
                  "cryptfs_checkpoint_duration_seconds"):
            check_histogram(after, h)
        # the fsync took a real time, seen in its histogram's sum
        assert delta("cryptfs_fuse_operation_seconds_sum", op="fsync") > 0

        # cold: a new mount without the chunk cache reads every chunk from the store once
        env.umount(mnt)
        shutil.rmtree(root / "cache" / "cryptfs", ignore_errors=True)
        env.mount(mnt, "metrics=127.0.0.1:0")
        addr = metrics_addr(env, mnt)
        before = scrape(addr)
        assert value(before, "cryptfs_cache_misses_total") == 0
        assert value(before, "cryptfs_cache_bytes") == 0
        assert (mnt / "three-chunks").read_bytes() == data
        after = scrape(addr)
        assert delta("cryptfs_fuse_read_bytes_total") == 3 * MIB
        assert delta("cryptfs_cache_misses_total") == 3
        gets = delta("cryptfs_store_operation_seconds_count", store="main", op="get")
        assert 3 <= gets <= 4, gets  # the chunks (and perhaps the lease being renewed)
        assert delta("cryptfs_store_bytes_total", store="main", op="get") >= 3 * MIB
        assert value(after, "cryptfs_cache_bytes") >= 3 * MIB  # fetched objects are kept
        assert delta("cryptfs_cache_hits_total", cache="disk") == 0
        assert value(after, "cryptfs_integrity_errors_total") == 0

        # warm: the same chunks again after a remount come from the disk cache
        env.umount(mnt)
        env.mount(mnt, "metrics=127.0.0.1:0")
        addr = metrics_addr(env, mnt)
        before = scrape(addr)
        assert (mnt / "three-chunks").read_bytes() == data
        after = scrape(addr)
        assert delta("cryptfs_cache_hits_total", cache="disk") == 3
        assert delta("cryptfs_cache_misses_total") == 0
        assert delta("cryptfs_store_bytes_total", op="get") < MIB  # at most the lease
        env.umount(mnt)
    finally:
        _cleanup(env, root)


def test_uploads_waiting_show_in_the_queue_gauges(s3_server: Any, s3_bucket: str) -> None:
    """Pending uploads (objects, bytes, oldest age) while the store does not take PUTs."""
    from faultproxy import FaultProxy

    root = _tmp_root()
    proxy = FaultProxy(s3_server.endpoint).start()
    env = VaultEnv(root, f"s3://{s3_bucket}/vault?endpoint={proxy.endpoint}")
    mnt = root / "mnt"
    try:
        env.init("--chunk-size", "65536")
        env.mount(mnt, "metrics=127.0.0.1:0")
        addr = metrics_addr(env, mnt)
        proxy.set_fault("stall", methods={"PUT"})
        (mnt / "four-chunks").write_bytes(random.Random(5).randbytes(4 * 65536))
        deadline = time.monotonic() + 15
        while True:
            fams = scrape(addr)
            if value(fams, "cryptfs_uploads_pending_objects") >= 4:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.2)
        fams = scrape(addr)
        assert value(fams, "cryptfs_uploads_pending_bytes") >= 4 * 65536
        assert value(fams, "cryptfs_uploads_oldest_pending_age_seconds") >= 1.0
        proxy.clear()
        deadline = time.monotonic() + 60
        while value(scrape(addr), "cryptfs_uploads_pending_objects") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        fams = scrape(addr)
        assert value(fams, "cryptfs_uploads_oldest_pending_age_seconds") == 0
        assert value(fams, "cryptfs_upload_errors_total") == 0
        env.umount(mnt)
    finally:
        proxy.clear()
        _cleanup(env, root)
        proxy.stop()


# -- the endpoint ----------------------------------------------------------------------------------
@pytest.mark.log_problems_expected  # the second daemon logs why it cannot mount
def test_endpoint_is_loopback_only_exclusive_and_closed_at_unmount(
        local_env: VaultEnv) -> None:
    env = local_env
    mnt = env.root / "mnt"
    port = free_port()
    env.mount(mnt, f"metrics={port}")  # a port alone: loopback
    st = status_json(env, mnt)
    addr = f"127.0.0.1:{port}"
    assert st["metrics"] == addr
    assert listening(int(st["pid"])) == [("127.0.0.1", port)]  # nothing else, nowhere else
    assert f"metrics: http://{addr}/metrics" in env.cli("status", str(mnt)).stdout

    # /status: the same document `cryptfs status --json` shows; nothing but two paths served
    with urllib.request.urlopen(f"http://{addr}/status", timeout=10) as resp:
        served = json.loads(resp.read())["mounts"][0]
    assert served["mountpoint"] == str(mnt) and served["name"] == env.name
    assert served["store"] == st["store"] and served["pid"] == st["pid"]
    assert set(st) - {"age_seconds"} <= set(served)
    (mnt / "secret.txt").write_text("not for http")
    for path in ("/secret.txt", f"{mnt}/secret.txt", "/metrics/../secret.txt", "/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{addr}{path}", timeout=10)
        assert err.value.code == 404
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    assert "secret" not in text and str(env.root) not in text  # no names or paths in labels

    # a second mount on the same port: one clear line, exit code 7, nothing mounted
    other = VaultEnv(env.root / "other", f"file://{env.root}/other-store", name="other")
    other.init()
    mnt2 = env.root / "mnt2"
    mnt2.mkdir()
    res = other.cli("mount", "--name", "other", str(mnt2), "--metrics", addr, check=False)
    assert res.returncode == 7
    assert res.stderr.strip().splitlines() == [
        f"cryptfs: cannot serve metrics on {addr}: address already in use (another mount or "
        "program uses it; choose another port with -o metrics=127.0.0.1:PORT)"]
    assert not _mounted(str(mnt2))
    assert scrape(addr)  # the first mount still serves

    env.umount(mnt)
    assert refused(addr)


@pytest.mark.log_problems_expected  # a non-loopback endpoint is announced with a warning
def test_non_loopback_only_when_asked_and_without_paths_read_only(
        local_env: VaultEnv) -> None:
    env = local_env
    mnt = env.root / "mnt"
    for bad in ("myhost:9567", "127.0.0.1:99999", "127.0.0.1:x"):
        res = env.cli("mount", str(mnt), "-o", f"metrics={bad}", check=False)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
        assert res.stderr.startswith(f"cryptfs: invalid metrics address '{bad}'")
    assert parse_address("") == ("127.0.0.1", 9567)  # -o metrics / --metrics alone
    assert parse_address("[::1]:80") == ("::1", 80)

    port = free_port()
    env.mount(mnt, f"metrics=0.0.0.0:{port}", "ro")
    st = status_json(env, mnt)
    fams = scrape(f"127.0.0.1:{port}")
    assert value(fams, "cryptfs_readonly", reason="mount_option") == 1
    assert value(fams, "cryptfs_lease_held") == 0  # a read-only mount takes no lease
    assert listening(int(st["pid"])) == [("0.0.0.0", port)]
    assert "reachable from other machines" in env.log_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as resp:
        served = json.loads(resp.read())["mounts"][0]
    assert "mountpoint" not in served and "store" not in served
    assert str(env.root) not in json.dumps(served)
    assert served["name"] == env.name and served["pid"] == st["pid"]
    env.umount(mnt)
    assert refused(f"127.0.0.1:{port}")


def test_no_port_without_metrics(local_env: VaultEnv) -> None:
    env = local_env
    mnt = env.root / "mnt"
    env.mount(mnt)
    st = status_json(env, mnt)
    assert "metrics" not in st
    assert listening(int(st["pid"])) == []
    res = env.cli("stats", str(mnt), check=False)
    assert res.returncode == 7
    assert res.stderr.strip().splitlines() == [
        f"cryptfs: {mnt} serves no metrics (mount with -o metrics=127.0.0.1:PORT to watch it)"]
    res = env.cli("stats", str(mnt), "--interval", "0", check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "example" in env.cli("stats", "--help").stdout
    env.umount(mnt)
    res = env.cli("stats", str(mnt), check=False)
    assert res.returncode == 7 and "not a cryptfs mount" in res.stderr


# -- cryptfs stats ---------------------------------------------------------------------------------
def test_stats_in_a_pty_shows_changing_figures_and_ends_on_ctrl_c(
        local_env: VaultEnv) -> None:
    env = local_env
    mnt = env.root / "mnt"
    env.mount(mnt, "metrics=127.0.0.1:0")
    stop = threading.Event()

    def writer() -> None:
        rnd = random.Random(7)
        i = 0
        while not stop.is_set():
            (mnt / f"w{i % 4}").write_bytes(rnd.randbytes(2 * MIB))
            i += 1
            stop.wait(0.05)

    pid, fd = pty.fork()
    if pid == 0:  # the child: cryptfs stats on the terminal
        try:
            # as a shell starts a foreground program: SIGINT at its default (a pytest-xdist
            # worker ignores it, and an ignored SIGINT is inherited through exec: Python then
            # installs no KeyboardInterrupt handler, rightly, as for a background job)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(CRYPTFS, [CRYPTFS, "stats", str(mnt)], env.env)
        finally:
            os._exit(127)
    t = threading.Thread(target=writer)
    out = b""
    try:
        t.start()
        deadline = time.monotonic() + 20
        rows: list[list[str]] = []
        # four rows at least, and up to eight until the write figures change (a row's rate
        # is of its interval: on a loaded machine the writer may keep one pace for a while)
        while time.monotonic() < deadline and (
                len(rows) < 4 or (len(rows) < 8 and len({r[2] for r in rows}) < 2)):
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
            rows = [ln.split() for ln in out.decode(errors="replace").splitlines()
                    if re.match(r"\s+\d", ln)]
        stop.set()
        t.join(timeout=30)
        assert len(rows) >= 4, out
        header = next(ln for ln in out.decode().splitlines() if "ops/s" in ln).split()
        assert "wr" in header and "hit" in header
        writes = [float(r[2]) for r in rows]  # wr MB/s
        ops = [float(r[0]) for r in rows]
        assert max(writes) > 0 and len(set(writes)) > 1, rows  # figures change while writing
        assert max(ops) > 0
        os.write(fd, b"\x03")  # Ctrl-C through the terminal
        started = time.monotonic()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - started > 20:
                with open(f"/proc/{pid}/status") as st:
                    signals = " ".join(ln.strip() for ln in st if ln.startswith(("Sig", "Shd")))
                raise AssertionError(
                    f"cryptfs stats did not end on Ctrl-C within 20 s ({signals}): {out[-300:]!r}")
            with_data, _, _ = select.select([fd], [], [], 0.2)
            if with_data:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    pass
        assert os.waitstatus_to_exitcode(status) == 0
        assert b"Traceback" not in out
    finally:
        stop.set()
        t.join(timeout=30)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    # not on a terminal: plain lines, a given number of them
    res = env.cli("stats", str(mnt), "--count", "2", "--interval", "0.2")
    lines = res.stdout.splitlines()
    assert len(lines) == 4 and "ops/s" in lines[1] and "\x1b" not in res.stdout
    env.umount(mnt)


# -- the Grafana dashboard -------------------------------------------------------------------------
def test_grafana_dashboard_queries_metrics_that_exist(local_env: VaultEnv) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 10
    queried = {n for e in exprs for n in re.findall(r"\bcryptfs_[a-z_]+\b", e)}
    env = local_env
    mnt = env.root / "mnt"
    env.mount(mnt, "metrics=127.0.0.1:0")
    (mnt / "f").write_bytes(b"x" * 5000)
    addr = metrics_addr(env, mnt)
    fams = scrape(addr)
    served = {s.name for f in fams.values() for s in f.samples}
    # a labelled counter that has not counted yet (store errors) is declared without samples
    served |= {f"{f.name}_total" for f in fams.values() if f.type == "counter"}
    assert queried and queried <= served, sorted(queried - served)
    env.umount(mnt)


# -- unit: the store wrapper -----------------------------------------------------------------------
def test_metered_store_counts_requests_bytes_and_errors() -> None:
    m = Metrics()
    store = m.wrap_store(MemoryStore("memory://"), "a1")
    store.put("data/x", b"12345")
    assert store.get("data/x", 1 << 20) == b"12345"
    with pytest.raises(ObjectNotFound):
        store.get("data/missing", 1 << 20)
    assert store.exists("data/x")
    assert [n for n, _ in store.list("data/")] == ["data/x"]
    store.delete("data/x")
    assert store.url == "memory://"
    r = m.registry

    def get(name: str, **labels: str) -> float:
        v = r.get_sample_value(name, {"store": "a1", **labels})
        return 0.0 if v is None else v

    assert get("cryptfs_store_operation_seconds_count", op="put") == 1
    assert get("cryptfs_store_operation_seconds_count", op="get") == 2
    assert get("cryptfs_store_operation_seconds_count", op="list") == 1
    assert get("cryptfs_store_operation_seconds_count", op="delete") == 1
    assert get("cryptfs_store_bytes_total", op="put") == 5
    assert get("cryptfs_store_bytes_total", op="get") == 5
    assert get("cryptfs_store_errors_total", op="get", kind="not_found") == 1
    assert get("cryptfs_store_info", kind="memory") == 1


def unmounted_fuse(m: Metrics) -> CryptfsFUSE:
    """The FUSE adapter's callback wrapper with ``m`` recording, without a mount: callbacks
    are named like mfusepy's methods (``getattr_fuse_3``, ``read``, ...)."""
    fuse = CryptfsFUSE.__new__(CryptfsFUSE)
    fuse.record_into(m)
    return fuse


def test_fuse_operation_records_become_a_histogram() -> None:
    """Every callback is counted (with its bytes and errno); its latency goes to the histogram
    for the first of its kind in the thread and every FUSE_SAMPLE-th after."""
    m = Metrics()
    r = m.registry
    fuse = unmounted_fuse(m)
    timed = range(0, 2 * FUSE_SAMPLE + 1, FUSE_SAMPLE)  # 0, 8, 16: the timed ones

    def read(i: int) -> int:  # mfusepy's read returns the bytes it copied
        if i == timed[1]:
            raise OSError(errno.EIO, "EIO")
        if i in timed:
            time.sleep(0.002)
        return i

    def write(n: int) -> int:
        return n

    def readdir_fuse_3(n: int) -> int:
        return 0

    for i in range(timed[-1] + 1):
        assert fuse._wrapper(read, i) == (-errno.EIO if i == timed[1] else i)
    assert fuse._wrapper(write, 4096) == 4096
    assert fuse._wrapper(readdir_fuse_3, 3) == 0

    def sample(name: str, **labels: str) -> float:
        v = r.get_sample_value(name, labels)
        assert v is not None, (name, labels)
        return v

    assert sample("cryptfs_fuse_operations_total", op="read") == timed[-1] + 1
    assert sample("cryptfs_fuse_operation_seconds_count", op="read") == len(timed)
    assert sample("cryptfs_fuse_operation_seconds_bucket", op="read", le="0.001") == 1  # EIO
    assert sample("cryptfs_fuse_operation_seconds_bucket", op="read", le="+Inf") == len(timed)
    assert 0.004 <= sample("cryptfs_fuse_operation_seconds_sum", op="read") < 1
    assert sample("cryptfs_fuse_read_bytes_total") == sum(range(timed[-1] + 1)) - timed[1]
    assert sample("cryptfs_fuse_written_bytes_total") == 4096
    assert sample("cryptfs_fuse_errors_total", op="read", errno="EIO") == 1
    assert sample("cryptfs_fuse_operations_total", op="readdir") == 1
    assert sample("cryptfs_fuse_operation_seconds_count", op="readdir") == 1


def test_records_from_many_threads_add_up_and_outlive_their_threads() -> None:
    """Each thread records into its own row without a lock: nothing is lost when threads
    race, an exception that is not an OSError is answered EIO and counted, and the rows of
    threads that ended still count after they are folded."""
    m = Metrics()
    r = m.registry
    fuse = unmounted_fuse(m)
    answers: list[int] = []

    def getattr_fuse_3(i: int) -> int:
        if i < 0:
            raise ValueError("internal")
        return 0

    store = m.wrap_store(MemoryStore("memory://"), "s")
    store.put("o", b"abc")

    def work() -> None:
        for i in range(5000):
            fuse._wrapper(getattr_fuse_3, i)
            m.memory_hit()
        store.get("o", 10)
        answers.append(fuse._wrapper(getattr_fuse_3, -1))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [-errno.EIO] * 4
    for _ in range(2):  # the second scrape sums the rows the first one folded
        assert r.get_sample_value("cryptfs_fuse_operations_total",
                                  {"op": "getattr"}) == 4 * 5001
        # each thread timed its first getattr and every FUSE_SAMPLE-th after
        assert r.get_sample_value("cryptfs_fuse_operation_seconds_count",
                                  {"op": "getattr"}) == 4 * -(-5001 // FUSE_SAMPLE)
        assert r.get_sample_value("cryptfs_fuse_errors_total",
                                  {"op": "getattr", "errno": "EIO"}) == 4
        assert r.get_sample_value("cryptfs_cache_hits_total", {"cache": "memory"}) == 4 * 5000
        assert r.get_sample_value("cryptfs_store_operation_seconds_count",
                                  {"store": "s", "op": "get"}) == 4
        assert r.get_sample_value("cryptfs_store_bytes_total", {"store": "s", "op": "get"}) == 12
    assert not m._fuse._live  # the ended threads' rows were folded


def test_fuse_wrapper_counts_errno_answers_and_bytes() -> None:
    """The FUSE adapter's wrapper in-process: errno answers returned as -errno and counted
    by errno (a bare OSError, which has none, answers EINVAL), read and write counting the
    bytes mfusepy's methods return, and the other operations counting no bytes."""
    m = Metrics()
    r = m.registry
    fuse = unmounted_fuse(m)

    def getattr_fuse_3(code: int | None) -> int:
        raise OSError(code, "answer") if code is not None else OSError("no errno")

    def read(size: int) -> int:
        return size

    def write(size: int) -> int:
        return size - 1  # what the operation says it wrote, not what it was given

    for code in (errno.ENOENT, errno.ENOENT, errno.ENODATA, None):
        assert fuse._wrapper(getattr_fuse_3, code) == -(code or errno.EINVAL)
    assert fuse._wrapper(read, 7) == 7 and fuse._wrapper(read, 5) == 5
    assert fuse._wrapper(write, 4) == 3
    for _ in range(2):  # the same figures from a second scrape
        assert r.get_sample_value("cryptfs_fuse_operations_total", {"op": "getattr"}) == 4
        for name, n in (("ENOENT", 2), ("ENODATA", 1), ("EINVAL", 1)):
            assert r.get_sample_value("cryptfs_fuse_errors_total",
                                      {"op": "getattr", "errno": name}) == n
        assert r.get_sample_value("cryptfs_fuse_read_bytes_total") == 12
        assert r.get_sample_value("cryptfs_fuse_written_bytes_total") == 3
        assert r.get_sample_value("cryptfs_fuse_operations_total", {"op": "read"}) == 2
        assert r.get_sample_value("cryptfs_fuse_operations_total", {"op": "write"}) == 1


def test_each_store_of_a_replicated_vault_has_its_own_figures() -> None:
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/store-a")
    mnt = root / "mnt"
    try:
        env.cli("init", f"file://{root}/store-a", f"file://{root}/store-b", "--name", env.name)
        env.mount(mnt, "metrics=127.0.0.1:0")
        addr = metrics_addr(env, mnt)
        ids = [s["id"] for s in status_json(env, mnt)["stores"]]
        assert len(ids) == 2
        before = scrape(addr)
        (mnt / "f").write_bytes(random.Random(3).randbytes(600_000))
        os.sync()
        deadline = time.monotonic() + 30
        while True:  # the second copy is written in the background
            after = scrape(addr)
            puts = {i: value(after, "cryptfs_store_bytes_total", store=i, op="put")
                    - value(before, "cryptfs_store_bytes_total", store=i, op="put") for i in ids}
            if all(p >= 600_000 for p in puts.values()):
                break
            assert time.monotonic() < deadline, puts
            time.sleep(0.3)
        for i in ids:
            assert value(after, "cryptfs_store_up", store=i) == 1
            assert value(after, "cryptfs_store_info", store=i, kind="file") == 1
        assert value(after, "cryptfs_store_info", store="main") == 0  # no such store
        env.umount(mnt)
    finally:
        _cleanup(env, root)


def test_fuse_rows_count_any_errno_and_only_read_write_bytes() -> None:
    """A row counts errnos past errno.errorcode too (in its dict), and what callbacks other
    than read and write return (getxattr's value size, lseek's offset) is no byte count."""
    m = Metrics()
    r = m.registry
    fuse = unmounted_fuse(m)

    def getxattr(code: int) -> int:
        if code:
            raise OSError(code, "answer")
        return 42  # the value's size

    def lseek(offset: int) -> int:
        return offset

    assert fuse._wrapper(getxattr, 1000) == -1000
    assert fuse._wrapper(getxattr, errno.ENODATA) == -errno.ENODATA
    assert fuse._wrapper(getxattr, 0) == 42
    assert fuse._wrapper(lseek, 1 << 20) == 1 << 20
    for _ in range(2):
        assert r.get_sample_value("cryptfs_fuse_errors_total",
                                  {"op": "getxattr", "errno": "1000"}) == 1
        assert r.get_sample_value("cryptfs_fuse_errors_total",
                                  {"op": "getxattr", "errno": "ENODATA"}) == 1
        assert r.get_sample_value("cryptfs_fuse_operations_total", {"op": "getxattr"}) == 3
        assert r.get_sample_value("cryptfs_fuse_operations_total", {"op": "lseek"}) == 1
        assert r.get_sample_value("cryptfs_fuse_read_bytes_total") == 0
        assert r.get_sample_value("cryptfs_fuse_written_bytes_total") == 0
