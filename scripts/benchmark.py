#!/usr/bin/env python3
"""Benchmark cryptfs against a raw directory, a Python passthrough FUSE mount and gocryptfs.

Usage: scripts/bench [--quick] [--runs N] [--targets raw,passthrough,gocryptfs,cryptfs-local,
       cryptfs-s3,boto3] [--no-append]

Extra targets (only when named): passthrough-fusepy, cryptfs-s3x2 (two buckets),
cryptfs-metrics (cryptfs-local with the metrics endpoint on, scraped every --scrape-seconds,
15 s by default like Prometheus; with cryptfs-local in the same run the table gets a
metrics/local column: the cost of metrics), cryptfs-before / cryptfs-s3-before (the
cryptfs command of another checkout given with --before; columns local/before, s3/s3-before),
and cryptfs-pg (issue 14: cryptfs-local with its metadata in PostgreSQL, on a server the bench
starts like the tests do, tests/pg_fixtures.py, but with fsync on; with cryptfs-local in the
run the table gets a pg/local column; it also runs the two-mount workload: a second machine,
its own XDG homes, on the same vault), aes-passthrough and s3-passthrough (the floors of
`scripts/yardsticks.py`: the passthrough plus AES-GCM of 16 KiB segments on every read and
write, and a FUSE filesystem storing what it is given in S3 objects of 1 MiB through boto3;
they run the sequential write, and aes-passthrough the cold read, nothing else; with
cryptfs-local or cryptfs-s3 in the run the table gets a local/aes-pt or s3/s3-pt column).

Every target gets a fresh temporary directory. The same workloads run on each (see HEADER below),
interleaved: workload k runs on every target in turn before workload k+1 (the FUSE round trips
round by round), and every other run in the reverse order, so that drift from other processes
on the machine falls on all targets alike. Figures are medians over the runs; the ratio columns
of A/B pairs (metrics/local, local/before) show the median of the per-run ratios and their
range. The table is printed and, unless --no-append (the default in --quick mode), appended to
BENCHMARKS.md. Everything mounted or started is unmounted and stopped
again, also on errors and Ctrl-C. Needs root for dropping the page cache.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime as dt
import errno
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PASSTHROUGH = REPO / "scripts" / "passthrough.py"
YARDSTICKS = REPO / "scripts" / "yardsticks.py"
MIB = 1024 * 1024
PASSPHRASE = "benchmark passphrase, not a secret"
ALL_TARGETS = ("raw", "passthrough", "gocryptfs", "cryptfs-local", "cryptfs-s3", "boto3")
EXTRA_TARGETS = ("passthrough-fusepy", "cryptfs-s3x2", "cryptfs-metrics", "cryptfs-before",
                 "cryptfs-s3-before", "cryptfs-pg", "cryptfs-pg-before", "aes-passthrough",
                 "s3-passthrough")
FS_BASELINES = ("passthrough", "gocryptfs")
CRYPTFS_TARGETS = ("cryptfs-local", "cryptfs-s3")

HEADER = """# Benchmarks

Produced by `scripts/bench` (see `scripts/benchmark.py`); each section is one run of it. Targets:
a raw directory on the local disk, a trivial Python passthrough FUSE filesystem with the same
binding and mount options as cryptfs (`scripts/passthrough.py`), gocryptfs, cryptfs on a local
directory store, cryptfs on a local moto S3 server, and boto3 alone against that same server.
Workloads: first, on a fresh directory, the fsync workloads: 1,000 empty files are created, then
the median time of 50 fsyncs of a 4 KiB overwrite of one file; SQLite transactions per second on
the mount (WAL journal, synchronous=FULL, one small row per transaction, 5 s); then empty files up
to 100,000 and the fsync latency again; on cryptfs targets then, with those files in the vault,
`cryptfs snapshot create`, the first fsync after it (as above, once), `snapshot list` (each
command whole, Python start included),
and `cryptfs mount --at` that snapshot until its tree is there, and its unmount
(`--fsync-only` runs just these, `--no-fsync` leaves them out: they churn the store's
directories, more so the faster a target's fsync, which slows its later workloads' object
creation). Then a sequential write
of one big file in 1 MiB writes followed by fsync and close; a
sequential read of it with a cold cache (unmount, drop the page cache, delete cryptfs's local
cache, remount); random 4 KiB reads in it for a fixed time, each dropped from the page cache
right after (POSIX_FADV_DONTNEED) so that every read reaches the filesystem; cold random 4 KiB
reads after another cold mount, one in each MiB of the file in random order (never at a chunk's
start), so that each reaches a chunk no read touched since the mount; creating many 4 KiB
files in 20 directories followed by sync; `stat` of all of them, cold; extracting a tarball of
the running Python's standard library (without `__pycache__`, `site-packages` and the
`config-*` build directory) followed by sync; reading every file of it back, cold, and again
after a remount that drops the page cache but keeps cryptfs's chunk cache. boto3 uploads
and downloads the same total bytes in objects of the cryptfs chunk size with 8 threads; its
figures stand in the sequential write and read rows; then one thread GETs random 4 KiB ranges
of those objects for the random-read seconds (a bare range-GET loop), in the cold random row.
Figures are medians over the runs; the ratio columns divide cryptfs by a baseline so that a
ratio above 1 means cryptfs is faster (for times the baseline's time is divided by cryptfs's).
Peak RSS is the FUSE daemon's VmHWM after the big write. cryptfs-pg (when named) is
cryptfs-local with its metadata in a PostgreSQL server started by the bench (a Unix socket,
fsync on); on it alone, a second mount of the same vault (another machine: its own XDG homes)
serves the two-mount workload: N 4 KiB files created in one directory by one mount (the other
idle), then N by each mount in its own directory at the same time (files/s of both together),
each followed by sync.
"""


# ----------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step of a target failed; the message is the one-line reason."""


def one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line[:limit]


def run_cmd(argv, *, env=None, timeout=120, what=None, input_text=None) -> str:
    """Run a command; raise BenchError with its last stderr line when it fails."""
    what = what or " ".join(str(a) for a in argv[:3])
    try:
        proc = subprocess.run(
            [str(a) for a in argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal must not reach mount daemons
        )
    except FileNotFoundError as e:
        raise BenchError(f"{what}: {e.strerror}: {e.filename}") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout} s") from None
    if proc.returncode != 0:
        reason = one_line(proc.stderr) or one_line(proc.stdout) or f"exit {proc.returncode}"
        raise BenchError(f"{what}: {reason}")
    return proc.stdout


def fuse_mounted(path: Path) -> bool:
    want = str(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if mnt == want and parts[2].startswith("fuse"):
                return True
    return False


def wait_until(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def holds_dev_fuse(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False


def find_daemon(mnt: Path, must_contain: str | None = None) -> int | None:
    """The pid of a live process whose argv holds the mountpoint (and must_contain, if given),
    preferring one that has /dev/fuse open."""
    me = {os.getpid(), os.getppid()}
    want = {str(mnt), os.path.realpath(mnt)}
    found = []
    for entry in sorted((e for e in os.listdir("/proc") if e.isdigit()), key=int):
        if int(entry) in me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "umount" in argv or not any(a.rstrip("/") in want for a in argv):
            continue
        if must_contain and not any(must_contain in a for a in argv):
            continue
        if pid_alive(int(entry)):
            found.append(int(entry))
    for pid in found:
        if holds_dev_fuse(pid):
            return pid
    return found[0] if found else None


def vm_hwm_mib(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


_warned_drop = False


def drop_caches() -> None:
    global _warned_drop
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        if not _warned_drop:
            log(f"cannot drop the page cache ({e.strerror}); cold figures are not cold")
            _warned_drop = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_info(tmp: Path) -> dict:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    try:
        fs = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp)], capture_output=True, text=True
        ).stdout.split()[0]
    except (OSError, IndexError):
        fs = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "ram_gib": mem / 2**30,
        "kernel": platform.release(),
        "fs": fs or "?",
    }


def git_head(where: Path = REPO) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def chunk_size() -> tuple[int, str]:
    """cryptfs's default chunk size, from wherever the package defines it."""
    import importlib

    for mod in ("cryptfs.chunking", "cryptfs.vault.core"):
        try:
            return int(importlib.import_module(mod).DEFAULT_CHUNK_SIZE), mod
        except Exception:
            continue
    return MIB, "cryptfs not importable, assumed"


def local_chunk_text() -> str:
    try:
        from cryptfs.vault.core import default_chunk_size
        return fmt_size(default_chunk_size("file:///"))
    except Exception:  # noqa: BLE001 - an older cryptfs without per-store defaults
        return "the same"


class Watchdog:
    """Calls abort() if a workload runs longer than its deadline (a hung FUSE mount)."""

    def __init__(self, seconds: float, abort, what: str) -> None:
        self.seconds, self.abort, self.what = seconds, abort, what
        self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        log(f"{self.what}: no progress after {self.seconds:.0f} s, aborting the mount")
        with contextlib.suppress(Exception):
            self.abort()

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        if self.fired and exc[0] is not None:
            raise BenchError(f"{self.what}: timed out after {self.seconds:.0f} s") from exc[1]
        return False


# ----------------------------------------------------------------------------------------------
# targets


class Target:
    """A place to run the workloads; subclasses mount and unmount it."""

    name = "?"
    fuse = True
    # a yardstick runs only the sequential write ("write") or it and the cold read ("read")
    sequential_only: str | None = None

    def __init__(self, base: Path, bench: Bench) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=base))
        self.bench = bench
        self.mnt = self.dir / "mnt"
        self.mounted = False
        self.logfile = self.dir / "daemon.log"

    @property
    def workdir(self) -> Path:
        return self.mnt

    def setup(self) -> None:
        self.mnt.mkdir()

    def mount(self) -> None:
        raise NotImplementedError

    def _umount(self) -> None:
        run_cmd(["umount", self.mnt], timeout=120, what=f"umount {self.name}")

    def daemon_pid(self) -> int | None:
        return find_daemon(self.mnt)

    def umount(self) -> None:
        if not self.mounted:
            return
        pid = self.daemon_pid()
        self.mounted = False
        self._umount()
        if pid and not wait_until(lambda: not pid_alive(pid), 120):
            raise BenchError(f"{self.name}: daemon {pid} still running after unmount")

    def clear_cache(self) -> None:
        pass

    def cold_mount(self, keep_cache: bool = False) -> None:
        """Unmount, drop the page cache (and the target's own cache unless ``keep_cache``),
        mount again."""
        self.umount()
        drop_caches()
        if not keep_cache:
            self.clear_cache()
        self.mount()

    def abort(self) -> None:
        """Make a hung mount fail fast: kill its daemon, detach the mount."""
        pid = self.daemon_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)

    def cleanup(self) -> None:
        """Best effort: leave nothing mounted or running."""
        if self.fuse and fuse_mounted(self.mnt):
            try:
                self.mounted = True
                self.umount()
            except Exception as e:
                log(f"{self.name}: clean unmount failed ({e}); forcing")
                self.abort()
        self.mounted = False
        pid = self.daemon_pid() if self.fuse else None
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not wait_until(lambda: not pid_alive(pid), 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def teardown(self) -> None:
        self.cleanup()
        if self.fuse and fuse_mounted(self.mnt):
            log(f"{self.name}: {self.mnt} is still mounted; leaving {self.dir}")
            return
        shutil.rmtree(self.dir, ignore_errors=True)

    def _wait_mounted(self, proc: subprocess.Popen | None, timeout: float = 60) -> None:
        def ready():
            return fuse_mounted(self.mnt) or (proc is not None and proc.poll() is not None)

        wait_until(ready, timeout)
        if not fuse_mounted(self.mnt):
            reason = (
                one_line(self.logfile.read_text(errors="replace")) if self.logfile.exists() else ""
            )
            raise BenchError(f"{self.name}: mount did not appear ({reason or 'no message'})")
        self.mounted = True


class RawTarget(Target):
    name = "raw"
    fuse = False

    @property
    def workdir(self) -> Path:
        return self.dir / "data"

    def setup(self) -> None:
        self.workdir.mkdir()

    def mount(self) -> None:
        self.mounted = True

    def umount(self) -> None:
        self.mounted = False

    def abort(self) -> None:
        pass


class PassthroughTarget(Target):
    name = "passthrough"
    python = str(VENV_BIN / "python")
    binding = "mfusepy"

    def __init__(self, base: Path, bench: Bench) -> None:
        super().__init__(base, bench)
        self.src = self.dir / "src"
        self.proc: subprocess.Popen | None = None

    def setup(self) -> None:
        super().setup()
        self.src.mkdir()
        if not Path(self.python).exists():
            raise BenchError(f"{self.name}: {self.python} not found")

    def daemon_command(self) -> list[str]:
        return [self.python, str(PASSTHROUGH), "--binding", self.binding, str(self.src),
                str(self.mnt)]

    def process_env(self) -> dict | None:
        """The daemon's environment (None: the bench's)."""
        return None

    def mount(self) -> None:
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(self.daemon_command(), stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, start_new_session=True,
                                         env=self.process_env())
        self._wait_mounted(self.proc)

    def daemon_pid(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return None

    def umount(self) -> None:
        super().umount()
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        super().cleanup()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class FusepyPassthroughTarget(PassthroughTarget):
    name = "passthrough-fusepy"
    python = "/tmp/fusepy-venv/bin/python"
    binding = "fusepy"


class AesYardstickTarget(PassthroughTarget):
    """The passthrough that encrypts: `scripts/yardsticks.py aes`."""

    name = "aes-passthrough"
    sequential_only = "read"

    def daemon_command(self) -> list[str]:
        return [self.python, str(YARDSTICKS), "aes", str(self.src), str(self.mnt)]


class S3YardstickTarget(PassthroughTarget):
    """A FUSE filesystem writing to S3 through boto3 and nothing else: `scripts/yardsticks.py
    s3`, on the bench's moto server."""

    name = "s3-passthrough"
    sequential_only = "write"

    def setup(self) -> None:
        super().setup()
        s3 = self.bench.s3()
        s3.client().create_bucket(Bucket="bench-s3-passthrough")

    def daemon_command(self) -> list[str]:
        return [self.python, str(YARDSTICKS), "s3", str(self.mnt), self.bench.s3().endpoint,
                "bench-s3-passthrough"]

    def process_env(self) -> dict | None:
        return {**os.environ, **self.bench.s3().env()}


class GocryptfsTarget(Target):
    name = "gocryptfs"

    def setup(self) -> None:
        super().setup()
        self.cipher = self.dir / "cipher"
        self.cipher.mkdir()
        self.passfile = self.dir / "passfile"
        self.passfile.write_text(PASSPHRASE + "\n")
        run_cmd(
            ["gocryptfs", "-init", "-q", "-passfile", self.passfile, "-scryptn", "10", self.cipher],
            what="gocryptfs -init",
        )

    def mount(self) -> None:
        run_cmd(
            ["gocryptfs", "-q", "-passfile", self.passfile, self.cipher, self.mnt],
            what="gocryptfs mount",
            timeout=60,
        )
        self._wait_mounted(None, 10)

    def daemon_pid(self) -> int | None:
        return find_daemon(self.mnt, "gocryptfs")


class CryptfsTarget(Target):
    name = "cryptfs-local"
    mount_opts: list[str] = []

    def command(self) -> str:
        """The cryptfs command this target runs."""
        return str(self.bench.args.cryptfs)

    def setup(self) -> None:
        super().setup()
        self.cli = Path(self.command())
        if not self.cli.exists():
            raise BenchError(f"{self.name}: {self.cli} not found")
        self.xdg = {k: self.dir / k.lower() for k in ("config", "data", "cache")}
        for d in self.xdg.values():
            d.mkdir()
        self.env = dict(os.environ)
        self.env.update(
            CRYPTFS_PASSPHRASE=PASSPHRASE,
            XDG_CONFIG_HOME=str(self.xdg["config"]),
            XDG_DATA_HOME=str(self.xdg["data"]),
            XDG_CACHE_HOME=str(self.xdg["cache"]),
        )
        self.env.pop("FUSE_LIBRARY_NAME", None)
        self.init_store()

    def store_url(self) -> str:
        store = self.dir / "store"
        store.mkdir()
        return f"file://{store}"

    def init_store(self) -> None:
        url = self.store_url()
        run_cmd(
            [self.cli, "init", url, "--name", "bench"],
            env=self.env,
            what=f"cryptfs init {url.split('?')[0]}",
            timeout=300,
        )

    def mount(self) -> None:
        with open(self.logfile, "a") as logf:
            logf.write(f"--- mount {time.ctime()}\n")
        try:
            out = run_cmd(
                [self.cli, "mount", "--name", "bench", self.mnt, *self.mount_opts],
                env=self.env,
                what="cryptfs mount",
                timeout=300,
            )
        except BenchError:
            self.mounted = fuse_mounted(self.mnt)
            raise
        with open(self.logfile, "a") as logf:
            logf.write(out)
        if not fuse_mounted(self.mnt):
            raise BenchError("cryptfs mount: returned, but no FUSE mount at the mountpoint")
        self.mounted = True

    def _umount(self) -> None:
        run_cmd([self.cli, "umount", self.mnt], env=self.env, what="cryptfs umount", timeout=900)
        if fuse_mounted(self.mnt):
            raise BenchError("cryptfs umount: returned, but the mountpoint is still mounted")

    def daemon_pid(self) -> int | None:
        return find_daemon(self.mnt, "cryptfs")

    def clear_cache(self) -> None:
        shutil.rmtree(self.xdg["cache"] / "cryptfs", ignore_errors=True)


class CryptfsS3Target(CryptfsTarget):
    name = "cryptfs-s3"

    def store_url(self) -> str:
        s3 = self.bench.s3()
        bucket = f"bench-{self.name}"
        s3.client().create_bucket(Bucket=bucket)
        self.env.update(s3.env())
        return f"s3://{bucket}/vault?endpoint={s3.endpoint}"


class CryptfsMetricsTarget(CryptfsTarget):
    """cryptfs-local with -o metrics (issue 18), its /metrics scraped every --scrape-seconds
    (15 s by default, Prometheus's default scrape interval) from setup to teardown, mounted or
    not, as a Prometheus server would."""

    name = "cryptfs-metrics"

    def setup(self) -> None:
        super().setup()
        self.port = free_port()
        self.mount_opts = ["-o", f"metrics=127.0.0.1:{self.port}"]
        self.scrapes = 0
        self._stop = threading.Event()
        self._scraper = threading.Thread(target=self._scrape, daemon=True)
        self._scraper.start()

    def _get(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def _scrape(self) -> None:
        while not self._stop.wait(self.bench.args.scrape_seconds):
            try:
                self._get()
                self.scrapes += 1
            except OSError:
                pass  # between an unmount and the next mount

    def callbacks(self) -> int | None:
        """FUSE callbacks recorded so far (the sum of the operation counts), None if the
        endpoint does not answer."""
        try:
            text = self._get()
        except OSError:
            return None
        return sum(int(float(line.rpartition(" ")[2])) for line in text.splitlines()
                   if line.startswith("cryptfs_fuse_operations_total{"))

    def _umount(self) -> None:
        try:  # check that the metrics were really recorded
            text = self._get()
        except OSError as e:
            text = f"scrape failed: {e}"
        super()._umount()
        if 'cryptfs_fuse_operations_total{op="getattr"}' not in text:
            raise BenchError(f"cryptfs-metrics: no FUSE operation counts ({one_line(text)})")

    def teardown(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            self._scraper.join(timeout=10)
        super().teardown()


class CryptfsBeforeTarget(CryptfsTarget):
    """cryptfs-local run by another checkout's command (--before), for a before/after
    comparison in one run."""

    name = "cryptfs-before"

    def command(self) -> str:
        if not self.bench.args.before:
            raise BenchError(f"{self.name}: needs --before PATH (the other checkout's cryptfs)")
        return str(self.bench.args.before)


class CryptfsS3BeforeTarget(CryptfsS3Target):
    """cryptfs-s3 run by the --before command."""

    name = "cryptfs-s3-before"
    command = CryptfsBeforeTarget.command


class CryptfsPgTarget(CryptfsTarget):
    """cryptfs-local with its metadata in PostgreSQL (issue 14): a database of its own on the
    bench's server (:meth:`Bench.pg`). ``peer`` is a second machine on the same vault and store
    (its own XDG homes, attached by ``cryptfs init --meta``), mounted only for the two-mount
    workload (:func:`run_pair_workloads`)."""

    name = "cryptfs-pg"

    def init_store(self) -> None:
        self.meta_url = self.bench.pg(self.name)
        self.url = self.store_url()
        run_cmd([self.cli, "init", self.url, "--name", "bench", "--meta", self.meta_url],
                env=self.env, what="cryptfs init --meta", timeout=300)
        self.peer = self.peer_type()(self.dir, self.bench)
        self.peer.primary = self
        self.peer.setup()

    @staticmethod
    def peer_type() -> type[CryptfsPgPeer]:
        return CryptfsPgPeer

    def abort(self) -> None:
        self.peer.abort()
        super().abort()

    def cleanup(self) -> None:
        if hasattr(self, "peer"):
            self.peer.cleanup()
        super().cleanup()


class CryptfsPgPeer(CryptfsTarget):
    """The second machine of a :class:`CryptfsPgTarget`: its vault attached, not made."""

    name = "cryptfs-pg-peer"
    primary: CryptfsPgTarget

    def init_store(self) -> None:
        run_cmd([self.cli, "init", self.primary.url, "--name", "bench", "--meta",
                 self.primary.meta_url], env=self.env, what="cryptfs init --meta (attach)",
                timeout=300)


class CryptfsPgBeforeTarget(CryptfsPgTarget):
    """cryptfs-pg run by the --before command (its peer too), on a database of its own."""

    name = "cryptfs-pg-before"
    command = CryptfsBeforeTarget.command

    @staticmethod
    def peer_type() -> type[CryptfsPgPeer]:
        return CryptfsPgBeforePeer


class CryptfsPgBeforePeer(CryptfsPgPeer):
    """The second machine of a :class:`CryptfsPgBeforeTarget`."""

    name = "cryptfs-pg-before-peer"
    command = CryptfsBeforeTarget.command


class CryptfsS3x2Target(CryptfsTarget):
    """One vault over two buckets of the same server (issue 7: every chunk stored twice)."""

    name = "cryptfs-s3x2"

    def init_store(self) -> None:
        s3 = self.bench.s3()
        urls = []
        for bucket in ("bench-rep-a", "bench-rep-b"):
            s3.client().create_bucket(Bucket=bucket)
            urls.append(f"s3://{bucket}/vault?endpoint={s3.endpoint}")
        self.env.update(s3.env())
        run_cmd([self.cli, "init", *urls, "--name", "bench"], env=self.env,
                what="cryptfs init (two buckets)", timeout=300)


# ----------------------------------------------------------------------------------------------
# moto server and the boto3 baseline


class MotoServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.logfile = workdir / "moto.log"
        self.proc: subprocess.Popen | None = None
        self._client = None

    def env(self) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> None:
        exe = VENV_BIN / "moto_server"
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )

        def up():
            if self.proc.poll() is not None:
                return True
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                    return True
            except OSError:
                return False

        wait_until(up, 30, 0.2)
        if self.proc.poll() is not None:
            raise BenchError(f"moto_server exited: {one_line(self.logfile.read_text())}")

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            e = self.env()
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
                region_name=e["AWS_DEFAULT_REGION"],
                config=Config(max_pool_connections=16, retries={"max_attempts": 3}),
            )
        return self._client

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def unique_block(size: int, seed: int) -> bytearray:
    """Incompressible data; callers stamp a counter into it so no two blocks are equal."""
    return bytearray(random.Random(seed).randbytes(size))


def boto3_round(s3: MotoServer, total: int, obj_size: int, threads: int, run: int,
                seconds: float) -> dict:
    client = s3.client()
    bucket = "bench-boto3"
    with contextlib.suppress(Exception):
        client.create_bucket(Bucket=bucket)
    n = max(1, total // obj_size)
    template = bytes(unique_block(obj_size, 1000 + run))

    def body(i: int) -> bytes:
        return struct.pack("<QQ", run, i) + template[16:]

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"r{run}/{i:08d}", Body=body(i))

    def get(i: int) -> int:
        resp = client.get_object(Bucket=bucket, Key=f"r{run}/{i:08d}")
        return len(resp["Body"].read())

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(put, range(n)))
        t_up = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = sum(pool.map(get, range(n)))
        t_down = time.perf_counter() - t0
    if got != n * obj_size:
        raise BenchError(f"boto3: downloaded {got} bytes, expected {n * obj_size}")
    rng = random.Random(run)
    blocks = obj_size // 4096
    ops, t0 = 0, time.perf_counter()
    while ops == 0 or time.perf_counter() - t0 < seconds:  # one thread, as the FS workload
        off = rng.randrange(1, blocks) * 4096
        resp = client.get_object(Bucket=bucket, Key=f"r{run}/{rng.randrange(n):08d}",
                                 Range=f"bytes={off}-{off + 4095}")
        if len(resp["Body"].read()) != 4096:
            raise BenchError("boto3: short range GET")
        ops += 1
    range_rate = ops / (time.perf_counter() - t0)
    keys = [{"Key": f"r{run}/{i:08d}"} for i in range(n)]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
    return {"seq_write": n * obj_size / 1e6 / t_up, "seq_read": n * obj_size / 1e6 / t_down,
            "cold_rand_read": range_rate}


# ----------------------------------------------------------------------------------------------
# workloads


def write_big(path: Path, size: int, run: int) -> float:
    """Write ``size`` bytes in 1 MiB writes and fsync; MB/s. Every 4 KiB of the file carries its
    own stamp (run, position), so no two pieces of it at any chunk size (4 KiB and up) are
    equal: a deduplicating filesystem stores all of it, as one that does not."""
    block = unique_block(MIB, run)
    stamps = memoryview(block).cast("Q")[:: 4096 // 8]  # the first 8 bytes of each 4 KiB
    per = MIB // 4096
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // MIB):
            stamps[:] = array.array("Q", range((run << 48) + i * per, (run << 48) + (i + 1) * per))
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / 1e6 / (time.perf_counter() - t0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and all its threads, dead ones included: its
    process CPU clock (clock_getcpuclockid(3): the kernel's scheduler runtime, to the
    nanosecond), or /proc/PID/stat's utime + stime (10 ms ticks) where that clock cannot be
    read."""
    try:
        return time.clock_gettime((~pid << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trips(path: Path, pid: int | None, res: Results, name: str, seconds: float = 0.3,
                rounds: int = 15) -> Iterator[None]:
    """Two operations that reach the FUSE daemon every time (the kernel caches neither statfs
    nor a missing extended attribute): microseconds per call end to end, the median of
    ``rounds`` rounds of calls for ``seconds`` each, and the daemon's CPU time per call over
    its rounds (what a callback costs the daemon; other processes barely change it). Yields
    after each round, so that the rounds of several targets interleave (see
    :func:`interleave`)."""

    def getxattr() -> None:
        try:
            os.getxattr(path, "user.cryptfs-bench")
        except OSError:
            pass

    for key, fn in (("statfs", lambda: os.statvfs(path)), ("getxattr", getxattr)):
        per_call, cpu, calls = [], 0.0, 0
        for _ in range(rounds):
            cpu0 = cpu_seconds(pid) if pid is not None else 0.0
            n, t = 0, time.perf_counter()
            end = t + seconds
            while True:
                for _ in range(20):
                    fn()
                n += 20
                now = time.perf_counter()
                if now >= end:
                    break
            per_call.append((now - t) / n * 1e6)
            calls += n
            if pid is not None:
                cpu += cpu_seconds(pid) - cpu0
            yield
        res.add(name, f"rt_{key}", statistics.median(per_call))
        if pid is not None:
            res.add(name, f"cpu_{key}", cpu / calls * 1e6)


def read_all(path: Path, buf: bytearray) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n


def read_big(path: Path, size: int) -> float:
    buf = bytearray(MIB)
    t0 = time.perf_counter()
    got = read_all(path, buf)
    dt_ = time.perf_counter() - t0
    if got != size:
        raise BenchError(f"read {got} bytes back, expected {size}")
    return size / 1e6 / dt_


def random_reads(path: Path, size: int, seconds: float, seed: int) -> float:
    """Random 4 KiB reads; each one is dropped from the page cache again right after, so every
    read reaches the filesystem (for FUSE targets: the daemon) rather than the kernel's cache."""
    rng = random.Random(seed)
    blocks = size // 4096
    ops = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        end = t0 + seconds
        now = t0
        while now < end:
            for _ in range(16):
                off = rng.randrange(blocks) * 4096
                if len(os.pread(fd, 4096, off)) != 4096:
                    raise BenchError("short random read")
                os.posix_fadvise(fd, off, 4096, os.POSIX_FADV_DONTNEED)
            ops += 16
            now = time.perf_counter()
    finally:
        os.close(fd)
    return ops / (now - t0)


def cold_random_reads(path: Path, size: int, seconds: float, seed: int) -> float:
    """Random 4 KiB reads that each reach a chunk no read touched since the cold mount: one in
    every MiB of the file (in random order, never at a 256 KiB boundary, so at no chunk's start
    for chunk sizes up to 1 MiB), until all are read or ``seconds`` have passed."""
    rng = random.Random(seed)
    offsets = [m * MIB + rng.choice([b for b in range(1, 256) if b % 64]) * 4096
               for m in range(size // MIB)]
    rng.shuffle(offsets)
    ops = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise BenchError("short random read")
            ops += 1
            if time.perf_counter() - t0 >= seconds:
                break
        dt_ = time.perf_counter() - t0
    finally:
        os.close(fd)
    return ops / dt_


def small_paths(root: Path, n: int, ndirs: int) -> list[Path]:
    return [root / f"d{i % ndirs:02d}" / f"f{i:05d}" for i in range(n)]


def create_small(root: Path, n: int, ndirs: int, run: int) -> float:
    block = unique_block(4096, 2000 + run)
    paths = small_paths(root, n, ndirs)
    t0 = time.perf_counter()
    root.mkdir()
    for d in range(ndirs):
        (root / f"d{d:02d}").mkdir()
    for i, p in enumerate(paths):
        struct.pack_into("<QQ", block, 0, run, i)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, block)
        finally:
            os.close(fd)
    os.sync()
    return n / (time.perf_counter() - t0)


def add_empty_files(root: Path, n: int, per_dir: int = 1000) -> None:
    """Create ``n`` more empty files under ``root`` (directories of ``per_dir``), then sync."""
    root.mkdir(exist_ok=True)
    have = sum(1 for _ in root.iterdir())
    for d in range(have, have + (n + per_dir - 1) // per_dir):
        sub = root / f"e{d:04d}"
        sub.mkdir()
        for i in range(min(per_dir, n - (d - have) * per_dir)):
            os.close(os.open(sub / f"{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    os.sync()


def fsync_latency(probe: Path, samples: int, run: int) -> float:
    """Median seconds of a 4 KiB overwrite + fsync of one file."""
    block = unique_block(4096, 3000 + run)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644)
    times = []
    try:
        for i in range(samples):
            struct.pack_into("<QQ", block, 0, run, i)
            os.pwrite(fd, block, 0)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times)


def sqlite_txns(path: Path, seconds: float) -> float:
    """Transactions per second of SQLite on ``path`` (WAL, synchronous=FULL): one row of
    ~100 bytes per transaction, for ``seconds``."""
    import sqlite3

    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            con.execute("BEGIN")
            con.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(100),))
            con.execute("COMMIT")
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        con.close()


def daemon_cpu(t: Target, res: Results, key: str, fn, per=None):
    """``fn()``, and the FUSE daemon's CPU time over it as ``cpu_KEY``: milliseconds, or
    microseconds per operation when ``per(fn())`` says how many operations it did. Far less
    noisy than the wall time on a shared machine (other processes slow the daemon down, but
    hardly change the CPU time its own work takes), and what the daemon's work costs:
    metrics on against off (issue 18)."""
    pid = t.daemon_pid() if t.fuse else None
    # with metrics: the callbacks the workload made, counted outside the CPU window (a scrape
    # costs the daemon CPU too), for metrics_share
    calls0 = t.callbacks() if isinstance(t, CryptfsMetricsTarget) else None
    cpu0 = cpu_seconds(pid) if pid else 0.0
    value = fn()
    if pid:
        with contextlib.suppress(OSError):
            cpu = cpu_seconds(pid) - cpu0
            res.add(t.name, f"cpu_{key}", cpu * 1e6 / per(value) if per else cpu * 1e3)
    if calls0 is not None:
        calls1 = t.callbacks()  # type: ignore[attr-defined]
        if calls1 is not None:
            res.add(t.name, f"calls_{key}", (calls1 - calls0) / per(value) if per
                    else calls1 - calls0)
    return value


def run_fsync_workloads(t: Target, sz: Sizes, run: int, res: Results, step) -> None:
    """fsync latency with ~1,000 and with ``sz.fsync_files`` files in the vault, and SQLite
    transactions/s, on a fresh directory of the mounted target."""
    name = t.name
    root = t.workdir / f"fsync{run}"
    step("mkdir", root.mkdir)
    files = root / "files"
    step("1,000 files", add_empty_files, files, 1000)
    log(f"{name}: fsync latency, 1,000 files")
    res.add(name, "fsync_1k", daemon_cpu(
        t, res, "fsync_1k", lambda: step("fsync 1k", fsync_latency, root / "probe", 50, run),
        lambda _: 50) * 1e3)
    log(f"{name}: SQLite transactions, synchronous=FULL")
    res.add(name, "sqlite_txn", daemon_cpu(
        t, res, "sqlite_txn", lambda: step("sqlite", sqlite_txns, root / "db.sqlite", sz.sqlite_s),
        lambda rate: rate * sz.sqlite_s))
    log(f"{name}: adding files up to {sz.fsync_files}")
    step("many files", add_empty_files, files, sz.fsync_files - 1000)
    log(f"{name}: fsync latency, {sz.fsync_files} files")
    res.add(name, "fsync_many", step("fsync many", fsync_latency, root / "probe", 50, run) * 1e3)


def run_snapshot_workloads(t: Target, sz: Sizes, run: int, res: Results, step) -> None:
    """Snapshots (issue 17) on a mounted cryptfs target holding ``sz.fsync_files`` files (left
    by :func:`run_fsync_workloads`): seconds of ``cryptfs snapshot create``, milliseconds of
    the first fsync after it, seconds of ``snapshot list``, until an ``--at`` mount of the
    snapshot is ready, and of its unmount."""
    if not isinstance(t, CryptfsTarget):
        return
    name = t.name
    at = t.dir / f"at{run}"
    at.mkdir()

    def cli(*argv: object) -> float:
        t0 = time.perf_counter()
        run_cmd([t.cli, *argv], env=t.env, what=f"cryptfs {argv[0]} {argv[1]}",
                timeout=sz.deadline)
        return time.perf_counter() - t0

    log(f"{name}: snapshot create, {sz.fsync_files} files")
    res.add(name, "snap_create", step("snapshot create", cli, "snapshot", "create", "--vault",
                                      "bench", "--name", f"bench{run}"))
    log(f"{name}: the first fsync after it (its cleanup works out what the snapshot holds)")
    res.add(name, "snap_fsync", step("fsync after snapshot", fsync_latency,
                                     t.workdir / f"fsync{run}" / "probe", 1, run + 100) * 1e3)
    log(f"{name}: snapshot list")
    res.add(name, "snap_list", step("snapshot list", cli, "snapshot", "list", "--name", "bench"))
    log(f"{name}: mount --at, {sz.fsync_files} files")

    def mount_at() -> float:
        t0 = time.perf_counter()
        try:
            run_cmd([t.cli, "mount", "--name", "bench", "--at", f"bench{run}", at], env=t.env,
                    what="cryptfs mount --at", timeout=sz.deadline)
            if not fuse_mounted(at) or not (at / f"fsync{run}" / "files").is_dir():
                raise BenchError("cryptfs mount --at: no snapshot tree at the mountpoint")
            return time.perf_counter() - t0
        except BaseException:
            subprocess.run(["umount", "-l", str(at)], capture_output=True)
            raise

    res.add(name, "snap_at_mount", step("mount --at", mount_at))
    res.add(name, "snap_at_umount", step("umount --at", cli, "umount", at))
    if fuse_mounted(at):
        raise BenchError("cryptfs umount: the --at mount is still mounted")


def create_at_once(roots: list[Path], n: int, run: int) -> float:
    """Files per second of creating ``n`` 4 KiB files in each directory of ``roots`` (one
    thread each, all started together), then sync: the files of all over the time from the
    start until the last thread is done and the sync returned."""
    start = threading.Barrier(len(roots) + 1)
    errors: list[BaseException] = []

    def work(k: int, root: Path) -> None:
        block = unique_block(4096, 4000 + run * 10 + k)
        try:
            start.wait()
            root.mkdir()
            for i in range(n):
                struct.pack_into("<QQQ", block, 0, run, k, i)
                fd = os.open(root / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, block)
                finally:
                    os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k, r), daemon=True)
               for k, r in enumerate(roots)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    if errors:
        raise BenchError(f"creating files: {errors[0]}")
    os.sync()
    return n * len(roots) / (time.perf_counter() - t0)


def run_pair_workloads(t: CryptfsPgTarget, sz: Sizes, run: int, res: Results,
                       step) -> Iterator[None]:
    """Two machines on one PostgreSQL vault (issue 14): with the peer mounted, ``sz.pair_files``
    files created in one directory by ``t`` alone (the peer idle), then as many by each of
    the two mounts in its own directory at the same time (files/s of both together)."""
    name, peer = t.name, t.peer
    step("mount the second machine", peer.mount)
    try:
        log(f"{name}: one mount creates {sz.pair_files} files, the other idle")
        res.add(name, "pair_one", step("one mount", create_at_once,
                                       [t.workdir / f"one{run}"], sz.pair_files, run))
        yield
        log(f"{name}: two mounts create {sz.pair_files} files each at once")
        res.add(name, "pair_two", step("two mounts", create_at_once,
                                       [t.workdir / f"two{run}a", peer.workdir / f"two{run}b"],
                                       sz.pair_files, run))
    finally:
        step("unmount the second machine", peer.umount)
    yield


def stat_small(root: Path, n: int, ndirs: int) -> float:
    paths = small_paths(root, n, ndirs)
    t0 = time.perf_counter()
    for p in paths:
        if os.stat(p).st_size != 4096:
            raise BenchError(f"{p}: wrong size")
    return n / (time.perf_counter() - t0)


def extract_tar(tarball: Path, dest: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    dest.mkdir()
    run_cmd(["tar", "-xf", tarball, "-C", dest], timeout=timeout, what="tar -x")
    os.sync()
    return time.perf_counter() - t0


def read_tree(root: Path, expect_files: int, expect_bytes: int) -> float:
    buf = bytearray(MIB)
    files = total = 0
    t0 = time.perf_counter()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            total += read_all(Path(p), buf)
            files += 1
    elapsed = time.perf_counter() - t0
    if files != expect_files or total != expect_bytes:
        raise BenchError(
            f"tree read back {files} files/{total} B, expected {expect_files}/{expect_bytes} B"
        )
    return elapsed


def make_stdlib_tar(dest: Path, max_files: int | None) -> tuple[Path, int, int]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"__pycache__", "site-packages", "dist-packages"}
    members = []
    for dirpath, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("config-"))
        for name in sorted(names):
            members.append(Path(dirpath) / name)
    members = [m for m in members if m.is_file() and not m.is_symlink()]
    if max_files:
        members = members[:max_files]
    tarball = dest / "stdlib.tar"
    nbytes = 0
    with tarfile.open(tarball, "w") as tar:
        for m in members:
            tar.add(m, arcname=str(Path("stdlib") / m.relative_to(stdlib)), recursive=False)
            nbytes += m.stat().st_size
    return tarball, len(members), nbytes


def metrics_cost() -> str:
    """What recording costs on the hot paths of a mount with metrics (issue 18), in-process:
    a FUSE callback that returns and one that answers an errno, through the FUSE adapter's
    wrapper with metrics (its record) and without; a cache hit; a store request against the
    bare in-memory store. CPU time of this thread, best of 11 rounds, so that other processes
    on the machine barely matter."""
    import timeit

    from cryptfs.cli.fuse_ops import CryptfsFUSE
    from cryptfs.metrics import Metrics
    from cryptfs.stores.memory import MemoryStore

    def statfs(path: bytes) -> int:
        return 0

    def getxattr(path: bytes, name: bytes) -> int:
        raise OSError(errno.ENODATA, "no such attribute")

    def ns(fn, n: int = 100_000) -> float:
        return min(timeit.repeat(fn, number=n, repeat=11, timer=time.thread_time)) / n * 1e9

    m = Metrics()
    off, on = CryptfsFUSE.__new__(CryptfsFUSE), CryptfsFUSE.__new__(CryptfsFUSE)
    off.record_into(None)  # the adapter's one wrapper, unmounted
    on.record_into(m)
    bare = MemoryStore("memory://")
    bare.put("o", b"x" * 4096)
    metered = m.wrap_store(bare, "main")
    rows = [
        ("FUSE callback, returns", ns(lambda: off._wrapper(statfs, b"/")),
         ns(lambda: on._wrapper(statfs, b"/"))),
        ("FUSE callback, errno answer", ns(lambda: off._wrapper(getxattr, b"/", b"user.x")),
         ns(lambda: on._wrapper(getxattr, b"/", b"user.x"))),
        ("cache hit (memory)", 0.0, ns(m.memory_hit)),
        ("store get, 4 KiB in memory", ns(lambda: bare.get("o", 8192)),
         ns(lambda: metered.get("o", 8192))),
    ]
    out = ["| path | without metrics (ns) | with metrics (ns) | recording costs (ns) |",
           "| --- | ---: | ---: | ---: |"]
    out += [f"| {what} | {a:.0f} | {b:.0f} | {b - a:.0f} |" for what, a, b in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# the bench


@dataclass
class Sizes:
    big: int
    small_files: int
    small_dirs: int
    random_s: float
    runs: int
    tar_max_files: int | None
    deadline: float
    fsync_files: int = 100_000
    sqlite_s: float = 5.0
    fsync_only: bool = False
    no_fsync: bool = False
    pair_files: int = 1000


@dataclass
class Results:
    values: dict = field(default_factory=dict)  # (target, workload) -> [floats]
    failures: dict = field(default_factory=dict)  # target -> reason
    notes: list = field(default_factory=list)

    def add(self, target: str, workload: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault((target, workload), []).append(value)
            log(f"{target}: {workload} = {value:.3g}")

    def median(self, target: str, workload: str) -> float | None:
        vals = self.values.get((target, workload))
        return statistics.median(vals) if vals else None


class Bench:
    def __init__(self, args, base: Path) -> None:
        self.args = args
        self.base = base
        self._s3: MotoServer | None = None
        self._pg = None

    def s3(self) -> MotoServer:
        if self._s3 is None:
            self._s3 = MotoServer(self.base)
            self._s3.start()
        return self._s3

    def pg(self, db: str) -> str:
        """The URL of a new database ``db`` on the bench's PostgreSQL server, started on first
        use as the tests start theirs (tests/pg_fixtures.py: initdb and the server as the
        postgres user, a Unix socket in a temporary directory), but with fsync on (and
        PostgreSQL's default shared_buffers), as a server holding real data runs."""
        if self._pg is None:
            sys.path.insert(0, str(REPO / "tests"))
            from pg_fixtures import PgServer

            server = PgServer({"fsync": "on", "shared_buffers": "128MB"})
            try:
                server.start()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                server.stop()
                raise BenchError(f"PostgreSQL: {one_line(str(e))}") from None
            self._pg = server
        db = db.replace("-", "_")
        self._pg.create_database(db)
        return self._pg.url(db)

    def stop(self) -> None:
        if self._s3 is not None:
            self._s3.stop()
        if self._pg is not None:
            self._pg.stop()


TARGET_CLASSES = {
    "raw": RawTarget,
    "passthrough": PassthroughTarget,
    "passthrough-fusepy": FusepyPassthroughTarget,
    "gocryptfs": GocryptfsTarget,
    "cryptfs-local": CryptfsTarget,
    "cryptfs-s3": CryptfsS3Target,
    "cryptfs-s3x2": CryptfsS3x2Target,
    "cryptfs-metrics": CryptfsMetricsTarget,
    "cryptfs-before": CryptfsBeforeTarget,
    "cryptfs-s3-before": CryptfsS3BeforeTarget,
    "cryptfs-pg": CryptfsPgTarget,
    "cryptfs-pg-before": CryptfsPgBeforeTarget,
    "aes-passthrough": AesYardstickTarget,
    "s3-passthrough": S3YardstickTarget,
}


def run_suite(t: Target, sz: Sizes, run: int, tar: tuple[Path, int, int],
              res: Results) -> Iterator[None]:
    """All workloads once on target t (mounted fresh, unmounted at the end), yielding after
    each measurement so that the targets' workloads interleave (see :func:`interleave`)."""
    name = t.name

    def step(what: str, fn, *a):
        with Watchdog(sz.deadline, t.abort, f"{name}: {what}"):
            return fn(*a)

    def timed(key: str, what: str, fn, *a):
        """step(), and the FUSE daemon's CPU time over it (see :func:`daemon_cpu`)."""
        return daemon_cpu(t, res, key, lambda: step(what, fn, *a))

    step("mount", t.mount)
    if not sz.no_fsync and t.sequential_only is None:
        run_fsync_workloads(t, sz, run, res, step)
        try:
            run_snapshot_workloads(t, sz, run, res, step)
        except BenchError as e:  # e.g. a cryptfs-before without snapshots: its others stand
            res.notes.append(f"{t.name}: snapshot workloads n/a: {e}")
            log(res.notes[-1])
    if sz.fsync_only:
        step("unmount", t.umount)
        return
    root = t.workdir / f"run{run}"
    step("mkdir", root.mkdir)
    big = root / "big"

    log(f"{name}: sequential write of {sz.big // MIB} MiB")
    res.add(name, "seq_write", timed("seq_write", "sequential write", write_big, big, sz.big, run))
    if t.fuse:
        res.add(name, "rss", vm_hwm_mib(t.daemon_pid()))
    t0 = time.perf_counter()
    step("unmount after write", t.umount)
    if t.fuse:
        res.add(name, "umount", time.perf_counter() - t0)
    yield
    if t.sequential_only == "write":
        return

    step("cold mount", t.cold_mount)
    log(f"{name}: sequential read, cold")
    res.add(name, "seq_read", timed("seq_read", "sequential read", read_big, big, sz.big))
    yield
    if t.sequential_only == "read":
        step("unmount", t.umount)
        return

    step("cold mount", t.cold_mount)
    log(f"{name}: random 4 KiB reads for {sz.random_s:g} s, uncached")
    res.add(name, "rand_read", daemon_cpu(
        t, res, "rand_read", lambda: step("random reads", random_reads, big, sz.big, sz.random_s,
                                          run), lambda rate: rate * sz.random_s))
    yield

    step("cold mount", t.cold_mount)
    log(f"{name}: cold random 4 KiB reads, one per MiB, for up to {sz.random_s:g} s")
    res.add(name, "cold_rand_read", step("cold random reads", cold_random_reads, big, sz.big,
                                         sz.random_s, run))
    yield

    small = root / "small"
    log(f"{name}: create {sz.small_files} small files + sync")
    res.add(
        name,
        "small_create",
        timed("small_create", "small files", create_small, small, sz.small_files, sz.small_dirs,
              run),
    )
    yield
    step("cold mount", t.cold_mount)
    log(f"{name}: stat {sz.small_files} files, cold")
    res.add(name, "small_stat", timed("small_stat", "stat", stat_small, small, sz.small_files,
                                     sz.small_dirs))
    yield

    if isinstance(t, CryptfsPgTarget):
        yield from run_pair_workloads(t, sz, run, res, step)

    tarball, tar_files, tar_bytes = tar
    log(f"{name}: extract tar ({tar_files} files) + sync")
    res.add(
        name, "tar_extract", timed("tar_extract", "tar extract", extract_tar, tarball, root / "tar",
                                   sz.deadline)
    )
    yield
    step("cold mount", t.cold_mount)
    log(f"{name}: read tree back, cold")
    res.add(name, "tar_read", timed("tar_read", "tar read", read_tree, root / "tar", tar_files,
                                   tar_bytes))
    yield
    step("remount", t.cold_mount, True)
    log(f"{name}: read tree back again after a remount, own cache kept")
    res.add(name, "tar_reread", timed("tar_reread", "tar reread", read_tree, root / "tar",
                                     tar_files, tar_bytes))
    yield
    if t.fuse:
        log(f"{name}: FUSE round trips")
        trips = round_trips(root, t.daemon_pid(), res, name)
        while step("round trips", next, trips, _DONE) is not _DONE:
            yield

    # The run's files stay: deleting them through the mount costs minutes per round on the slow
    # targets (and the unmount after it more), and the temp dir goes at the end anyway.
    log(f"{name}: run {run + 1} done")
    step("unmount", t.umount)


_DONE = object()


def interleave(suites: list[tuple[Target, Iterator[None]]], res: Results) -> None:
    """Advance the targets' suites in turn, one measurement each, until all are done: every
    target measures workload k within minutes of the others (drift from other processes on
    the machine falls on all of them alike). A failing target is noted and cleaned up."""
    while suites:
        for t, suite in list(suites):
            try:
                next(suite)
            except StopIteration:
                suites.remove((t, suite))
            except Exception as e:
                reason = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
                res.failures[t.name] = reason
                log(f"{t.name}: failed: {reason}")
                t.cleanup()
                suites.remove((t, suite))


WORKLOADS = [
    # key, label template, unit, higher is better, ratio shown
    ("seq_write", "sequential write {big} + fsync", "MB/s", True, True),
    ("seq_read", "sequential read {big}, cold", "MB/s", True, True),
    ("rand_read", "random 4 KiB reads for {rs:g} s, uncached", "ops/s", True, True),
    ("cold_rand_read", "cold random 4 KiB reads, one per MiB, up to {rs:g} s (boto3: range "
     "GETs)", "ops/s", True, True),
    ("small_create", "create {nf} × 4 KiB files in {nd} dirs + sync", "files/s", True, True),
    ("small_stat", "stat {nf} files, cold", "stat/s", True, True),
    ("pair_one", "one mount: create {np} × 4 KiB files in a dir + sync, a 2nd mount idle",
     "files/s", True, False),
    ("pair_two", "two mounts at once: {np} files each in its own dir + sync, together",
     "files/s", True, False),
    ("tar_extract", "extract stdlib tar ({tf} files, {tb}) + sync", "s", False, True),
    ("tar_read", "read every stdlib file back, cold", "s", False, True),
    ("tar_reread", "read them again after a remount, chunk cache kept", "s", False, True),
    ("rt_statfs", "statfs round trip (median of 15 rounds of 0.3 s)", "µs", False, True),
    ("rt_getxattr", "getxattr round trip, ENODATA (median of 15 × 0.3 s)", "µs", False, True),
    ("cpu_statfs", "daemon CPU per statfs call", "µs", False, True),
    ("cpu_getxattr", "daemon CPU per getxattr call", "µs", False, True),
    ("cpu_seq_write", "daemon CPU: sequential write", "ms", False, True),
    ("cpu_seq_read", "daemon CPU: sequential read, cold", "ms", False, True),
    ("cpu_rand_read", "daemon CPU per random 4 KiB read", "µs", False, True),
    ("cpu_small_create", "daemon CPU: create small files + sync", "ms", False, True),
    ("cpu_small_stat", "daemon CPU: stat small files, cold", "ms", False, True),
    ("cpu_tar_extract", "daemon CPU: extract stdlib tar + sync", "ms", False, True),
    ("cpu_tar_read", "daemon CPU: read stdlib files back, cold", "ms", False, True),
    ("cpu_tar_reread", "daemon CPU: read them again, chunk cache kept", "ms", False, True),
    ("cpu_fsync_1k", "daemon CPU per 4 KiB overwrite + fsync, 1,000 files", "µs", False, True),
    ("cpu_sqlite_txn", "daemon CPU per SQLite transaction", "µs", False, True),
    ("fsync_1k", "4 KiB overwrite + fsync, 1,000 files in the vault, median", "ms", False, True),
    ("fsync_many", "4 KiB overwrite + fsync, {ff} files in the vault, median", "ms", False, True),
    ("snap_create", "cryptfs snapshot create, {ff} files in the mounted vault", "s", False, False),
    ("snap_fsync", "the first 4 KiB overwrite + fsync after it", "ms", False, False),
    ("snap_list", "cryptfs snapshot list (one snapshot), {ff} files", "s", False, False),
    ("snap_at_mount", "cryptfs mount --at the snapshot until ready, {ff} files", "s", False,
     False),
    ("snap_at_umount", "unmount of that --at mount", "s", False, False),
    ("sqlite_txn", "SQLite WAL synchronous=FULL, 1-row transactions", "txn/s", True, True),
    ("rss", "daemon peak RSS after the write", "MiB", False, False),
    ("umount", "unmount after the write", "s", False, False),
]


def fmt_size(n: int) -> str:
    if n >= 2**30 and n % 2**30 == 0:
        return f"{n // 2**30} GiB"
    if n >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "s":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def ratio(res: Results, target: str, base: str, key: str, higher: bool) -> str:
    a, b = res.median(target, key), res.median(base, key)
    if a is None or b is None or a == 0 or b == 0:
        return "n/a"
    return f"{(a / b) if higher else (b / a):.2f}"


# A/B pairs whose ratio column shows the spread over runs: the cost of metrics (issue 18), and
# this checkout against another (--before)
PAIRS = (("cryptfs-metrics", "cryptfs-local"), ("cryptfs-local", "cryptfs-before"),
         ("cryptfs-s3", "cryptfs-s3-before"), ("cryptfs-pg", "cryptfs-local"),
         ("cryptfs-pg-before", "cryptfs-local"), ("cryptfs-pg", "cryptfs-pg-before"))


# the floors of scripts/yardsticks.py, each against the cryptfs target it bounds
YARDSTICK_PAIRS = (("cryptfs-local", "aes-passthrough"), ("cryptfs-s3", "s3-passthrough"))
YARDSTICK_TARGETS = tuple(b for _c, b in YARDSTICK_PAIRS)


def paired_ratio(res: Results, target: str, base: str, key: str, higher: bool) -> str:
    """The median of the per-run ratios (the two targets' run i ran interleaved, so each
    ratio compares figures taken minutes apart), with their range in brackets."""
    a, b = res.values.get((target, key), []), res.values.get((base, key), [])
    if len(a) != len(b) or len(a) < 2 or 0 in a or 0 in b:
        return ratio(res, target, base, key, higher)
    rs = [(x / y) if higher else (y / x) for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(rs):.3f} ({min(rs):.2f}–{max(rs):.2f})"


def metrics_share(res: Results, sz: Sizes) -> list[str]:
    """What recording adds per callback (issue 18), for the two callbacks that reach the
    daemon every time: the daemon CPU per call with metrics less without, run by run (the
    runs interleaved), and that as a share of the round trip a program waits for without
    metrics. The recording runs on the callback's path, so it delays the caller by at most
    its CPU time. Then per workload: the callbacks it made (counted by the metrics) times
    the larger of the two per-call figures, as a share of the workload's time without
    metrics (how much slower recording can make it at most: the recording is on the
    callbacks' path, and nothing else waits for it) and as a share of the daemon CPU the
    workload takes without metrics (what it costs the machine). Both are bounds far steadier
    than the difference of two noisy figures."""
    out = []
    per_call = []
    for key, what in (("statfs", "a statfs"), ("getxattr", "an ENODATA getxattr")):
        on = res.values.get(("cryptfs-metrics", f"cpu_{key}"), [])
        off = res.values.get(("cryptfs-local", f"cpu_{key}"), [])
        rt = res.values.get(("cryptfs-local", f"rt_{key}"), [])
        if not on or len(on) != len(off) or len(rt) != len(off):
            continue
        gaps = [a - b for a, b in zip(on, off, strict=True)]
        per_call.append(statistics.median(gaps))
        shares = [g / r * 100 for g, r in zip(gaps, rt, strict=True)]
        out.append(f"metrics add {statistics.median(gaps):.1f} µs of daemon CPU to {what} "
                   f"(per run {', '.join(f'{g:.1f}' for g in gaps)}): "
                   f"{statistics.median(shares):.1f} % of its round trip without metrics "
                   f"(per run {', '.join(f'{x:.1f}' for x in shares)} %)")
    if not per_call:
        return out
    cost = max(max(per_call), 0.1)  # µs per callback
    slower, cpu_share = [], []
    for key, label, unit, _higher, _ratio in WORKLOADS:
        calls = res.median("cryptfs-metrics", f"calls_{key.removeprefix('cpu_')}")
        cpu = res.median("cryptfs-local", key)
        if not key.startswith("cpu_") or calls is None or not cpu:
            continue
        what = label.removeprefix("daemon CPU").lstrip(": ")
        spent = cpu * (1e3 if unit == "ms" else 1.0)  # µs, in total or per operation
        cpu_share.append(f"{what} {calls * cost / spent * 100:.2f} %")
        took = workload_us(res, key.removeprefix("cpu_"), sz)
        if took:
            slower.append(f"{what} {calls * cost / took * 100:.2f} % ({calls:,.0f} callbacks)")
    out.append(f"recording at {cost:.1f} µs per callback makes each workload slower by at "
               f"most (callbacks × cost / its time without metrics): " + "; ".join(slower))
    out.append("and costs of its daemon CPU without metrics: " + "; ".join(cpu_share))
    return out


def workload_us(res: Results, key: str, sz: Sizes) -> float | None:
    """The time of workload ``key`` on cryptfs-local in µs, in total or per operation as its
    daemon CPU row counts it (the median of its runs), from its throughput or duration row."""
    v = res.median("cryptfs-local", key)
    if not v:
        return None
    per_second = {"seq_write": sz.big / 1e6, "seq_read": sz.big / 1e6,
                  "small_create": sz.small_files, "small_stat": sz.small_files,
                  "rand_read": 1, "sqlite_txn": 1}  # units done per second of the figure
    if key in per_second:
        return per_second[key] / v * 1e6
    unit = next(u for k, _label, u, _h, _r in WORKLOADS if k == key)
    return v * {"s": 1e6, "ms": 1e3, "µs": 1.0}[unit]


def render_table(res: Results, targets: list[str], sz: Sizes, tar: tuple[Path, int, int]) -> str:
    fields = {
        "big": fmt_size(sz.big),
        "rs": sz.random_s,
        "nf": sz.small_files,
        "nd": sz.small_dirs,
        "tf": tar[1],
        "tb": f"{tar[2] / 1e6:.0f} MB",
        "ff": f"{sz.fsync_files:,}",
        "np": sz.pair_files,
    }
    ratio_cols = [
        (c, b)
        for c in CRYPTFS_TARGETS
        for b in (*FS_BASELINES, "boto3")
        if c in targets and b in targets and (b != "boto3" or c == "cryptfs-s3")
    ]
    paired = [p for p in PAIRS if p[0] in targets and p[1] in targets]
    ratio_cols += paired
    ratio_cols += [p for p in YARDSTICK_PAIRS if p[0] in targets and p[1] in targets]
    short = {
        "passthrough": "pt",
        "gocryptfs": "gocfs",
        "boto3": "boto3",
        "cryptfs-local": "local",
        "cryptfs-s3": "s3",
        "cryptfs-metrics": "metrics",
        "cryptfs-before": "before",
        "cryptfs-s3-before": "s3-before",
        "cryptfs-pg": "pg",
        "cryptfs-pg-before": "pg-before",
        "aes-passthrough": "aes-pt",
        "s3-passthrough": "s3-pt",
    }
    head = ["workload", "unit", *targets, *(f"{short[c]}/{short[b]}" for c, b in ratio_cols)]
    rows = [head, ["---"] * 2 + ["---:"] * (len(head) - 2)]
    for key, label, unit, higher, show_ratio in WORKLOADS:
        vals = [res.median(t, key) for t in targets]
        if all(v is None for v in vals):
            continue
        row = [label.format(**fields), unit]
        for t, v in zip(targets, vals, strict=True):
            if v is None and (t == "boto3" or (t == "raw" and key in ("rss", "umount"))
                              or t in YARDSTICK_TARGETS):
                row.append("–")
            else:
                row.append(fmt_value(v, unit))
        for c, b in ratio_cols:
            if not show_ratio or (b == "boto3" and key not in ("seq_write", "seq_read",
                                                               "cold_rand_read")) \
                    or (b in YARDSTICK_TARGETS and None in (res.median(c, key),
                                                            res.median(b, key))):
                row.append("–")
            elif (c, b) in paired:
                row.append(paired_ratio(res, c, b, key, higher))
            else:
                row.append(ratio(res, c, b, key, higher))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark cryptfs against baselines.")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 MiB files, 200 small files, 2 s random reads, 1 run",
    )
    ap.add_argument("--runs", type=int, help="runs per target; figures are medians (default 3)")
    ap.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated, from {','.join(ALL_TARGETS + EXTRA_TARGETS)}",
    )
    ap.add_argument("--big-mib", type=int, help="size of the big file in MiB")
    ap.add_argument("--small-files", type=int, help="number of 4 KiB files")
    ap.add_argument("--random-seconds", type=float, help="duration of the random-read workload")
    ap.add_argument("--fsync-files", type=int,
                    help="files in the vault for the second fsync latency and the snapshot "
                    "workloads (default 100000; 10000 with --quick)")
    ap.add_argument("--fsync-only", action="store_true",
                    help="run only the fsync and snapshot workloads (fsync latency, SQLite "
                    "transactions, snapshot create/list, mount --at)")
    ap.add_argument("--no-fsync", action="store_true",
                    help="leave the fsync and snapshot workloads out (an A/B of the other "
                    "workloads on equal stores)")
    ap.add_argument(
        "--budget-min",
        type=float,
        help="start no further pair of runs (one in each order) once this many minutes "
        "would be exceeded (default 16, 0 = no limit; none in --quick mode)",
    )
    ap.add_argument("--tmpdir", help="where the temporary directories go (default: $TMPDIR)")
    ap.add_argument(
        "--output", default=str(REPO / "BENCHMARKS.md"), help="file the table is appended to"
    )
    ap.add_argument(
        "--append",
        dest="append",
        action="store_true",
        default=None,
        help="append to --output (default unless --quick)",
    )
    ap.add_argument("--no-append", dest="append", action="store_false")
    ap.add_argument(
        "--cryptfs", default=str(VENV_BIN / "cryptfs"), help="the cryptfs command to benchmark"
    )
    ap.add_argument(
        "--before",
        help="the cryptfs command of another checkout (e.g. /work/wt-old/.venv/bin/cryptfs), "
        "for the targets cryptfs-before and cryptfs-s3-before",
    )
    ap.add_argument(
        "--scrape-seconds",
        type=float,
        default=15.0,
        help="how often the cryptfs-metrics target's /metrics is scraped (default 15, "
        "Prometheus's default scrape interval)",
    )
    ap.add_argument(
        "--metrics-cost",
        action="store_true",
        help="only measure, in this process, what recording a metric costs per call (CPU "
        "time, best of 11 rounds) and print it",
    )
    ap.add_argument(
        "--fusepy-python",
        default=FusepyPassthroughTarget.python,
        help="interpreter with fusepy, for the passthrough-fusepy target",
    )
    args = ap.parse_args(argv)
    if args.metrics_cost:
        print(metrics_cost())
        return 0

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS + EXTRA_TARGETS]
    if unknown:
        ap.error(f"unknown targets: {', '.join(unknown)}")
    FusepyPassthroughTarget.python = args.fusepy_python
    q = args.quick
    sz = Sizes(
        big=(args.big_mib or (64 if q else 1024)) * MIB,
        small_files=args.small_files or (200 if q else 2000),
        small_dirs=20,
        random_s=args.random_seconds or (2.0 if q else 10.0),
        runs=args.runs or (1 if q else 3),
        tar_max_files=300 if q else None,
        deadline=300 if q else 900,
        fsync_files=args.fsync_files or (10_000 if q else 100_000),
        sqlite_s=2.0 if q else 5.0,
        fsync_only=args.fsync_only,
        no_fsync=args.no_fsync,
        pair_files=args.small_files or (200 if q else 1000),
    )
    append = (not q) if args.append is None else args.append
    budget = (args.budget_min if args.budget_min is not None else (0 if q else 16)) * 60
    if os.geteuid() != 0:
        log("not root: the page cache cannot be dropped, so cold figures are warm")

    started = time.monotonic()
    when = dt.datetime.now(dt.timezone.utc)
    base = Path(tempfile.mkdtemp(prefix="cryptfs-bench-", dir=args.tmpdir))
    bench = Bench(args, base)
    res = Results()
    active: list[Target] = []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    round_times: list[float] = []
    chunk, chunk_src = chunk_size()
    try:
        log(f"temp dir {base}")
        tar = make_stdlib_tar(base, sz.tar_max_files)
        log(f"stdlib tarball: {tar[1]} files, {tar[2] / 1e6:.1f} MB")

        for name in targets:
            if name == "boto3":
                continue
            t = TARGET_CLASSES[name](base, bench)
            active.append(t)
            try:
                log(f"{name}: setting up in {t.dir}")
                t.setup()
            except Exception as e:
                reason = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
                res.failures[name] = reason
                log(f"{name}: n/a: {reason}")
                active.remove(t)
                t.teardown()

        for run in range(sz.runs):
            if budget and round_times and run % 2 == 0:
                # runs go in pairs, one in each order: a budget that cut the second one off
                # left every target after the same neighbour in most runs (BENCHMARKS.md, the
                # 18:59 run of 2026-12-03)
                spent = time.monotonic() - started
                if spent + min(2, sz.runs - run) * max(round_times) > budget:
                    res.notes.append(
                        f"stopped after {run} of {sz.runs} runs to stay within the "
                        f"{budget / 60:g}-minute budget (--budget-min)"
                    )
                    log(res.notes[-1])
                    break
            round_start = time.monotonic()
            log(f"=== run {run + 1} of {sz.runs}")
            order = active if run % 2 == 0 else active[::-1]  # ABAB..., then ...BABA
            interleave([(t, run_suite(t, sz, run, tar, res)) for t in order
                        if t.name not in res.failures], res)
            if "boto3" in targets and "boto3" not in res.failures:
                try:
                    log(f"boto3: {fmt_size(sz.big)} in {fmt_size(chunk)} objects, 8 threads")
                    figures = boto3_round(bench.s3(), sz.big, chunk, 8, run, sz.random_s)
                    for k, v in figures.items():
                        res.add("boto3", k, v)
                except Exception as e:
                    reason = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
                    res.failures["boto3"] = reason
                    log(f"boto3: failed: {reason}")
            round_times.append(time.monotonic() - round_start)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    finally:
        for t in active:
            if isinstance(t, CryptfsMetricsTarget) and hasattr(t, "scrapes"):
                res.notes.append(f"{t.name}: /metrics scraped every "
                                 f"{args.scrape_seconds:g} s, {t.scrapes} scrapes served")
            try:
                t.teardown()
            except Exception as e:
                log(f"{t.name}: teardown: {e}")
        bench.stop()
        signal.signal(signal.SIGTERM, old_term)
        if not any(fuse_mounted(t.mnt) for t in active):
            shutil.rmtree(base, ignore_errors=True)

    elapsed = time.monotonic() - started
    runs_done = len(round_times)
    if interrupted:
        return 130
    info = machine_info(Path(args.tmpdir or tempfile.gettempdir()))
    table = render_table(res, targets, sz, tar)
    mode = "quick" if q else "default"
    title = (
        f"## {when:%Y-%m-%d %H:%M} UTC — {info['cpu']}, {info['cores']} cores, "
        f"{info['ram_gib']:.1f} GiB RAM, Linux {info['kernel']}, temp dir on {info['fs']}"
    )
    desc = (
        f"Mode {mode}, {runs_done} run{'s' if runs_done != 1 else ''} (medians), commit "
        f"{git_head() or '?'}, Python {platform.python_version()}, cryptfs default chunk "
        f"size {local_chunk_text()} on the local store, {fmt_size(chunk)} on S3 (and for "
        f"boto3; {chunk_src}); elapsed {elapsed / 60:.1f} min. The targets' workloads ran "
        f"interleaved (each workload on every target in turn, the order reversed every other "
        f"run)."
    )
    if any(t.endswith("-before") for t in targets):
        desc += (f" cryptfs-before and cryptfs-s3-before: `{args.before}`, commit "
                 f"{git_head(Path(args.before).parent) or '?'}.")
    if any(k.startswith("cpu_") for _, k in res.values):
        desc += (" Daemon CPU rows: the FUSE daemon's CPU time (all its threads, user + system,"
                 " from its process CPU clock) over each workload, or per call or operation;"
                 " other processes change it less than the wall time, but on a busy machine"
                 " they still slow the daemon's every instruction through the shared caches.")
    if any(a in targets and b in targets for a, b in PAIRS):
        desc += (" Paired ratio columns: the median of the per-run ratios, their range in "
                 "brackets.")
    notes = [f"- {t}: n/a: {r}" for t, r in res.failures.items()]
    notes += [f"- {n}" for n in res.notes + metrics_share(res, sz)]
    text = "\n\n".join(p for p in (title, desc, table, "\n".join(notes)) if p) + "\n"
    print()
    print(text)
    if append:
        out = Path(args.output)
        new = not out.exists() or out.stat().st_size == 0
        with open(out, "a") as f:
            if new:
                f.write(HEADER)
            f.write("\n" + text)
        log(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
