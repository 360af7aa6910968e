"""Prometheus metrics of one mount, and its loopback HTTP endpoint (``-o metrics=ADDR``).

A :class:`Metrics` owns one ``prometheus_client.CollectorRegistry`` per mount (never the
library's global registry) and the instruments the layers record into; the mount creates it
and passes it to the layers at construction (the vault, the chunk store, the disk cache, the
FUSE adapter, and a :class:`MeteredStore` around each object store). Figures that are cheap to
read (pending uploads, cache size, ledger head, lease) are read at scrape time by
:class:`VaultCollector`, not updated on the hot path. What is recorded per operation (FUSE
callbacks, store requests, cache hits) goes into plain per-thread rows without a lock
(:class:`FuseRecorder`, :class:`_Rows`) and becomes metric families at scrape time
(:class:`_HotCollector`); a FUSE callback is recorded inside the FUSE adapter's one wrapper,
touching one thread-local, one dict and one list (in a daemon, where every callback runs with
cold caches, what a record touches is what it costs), and its latency is measured for a sample
of the callbacks (one in ``FUSE_SAMPLE`` of each kind and thread: the clock reads were half of
a record's cost); counts, errors and bytes are exact. The rarer events (misses, errors,
checkpoints) use the library's instruments. Without ``-o metrics`` nothing is created and
nothing is recorded.

:class:`MetricsEndpoint` serves ``GET /metrics`` (Prometheus text format, written by
``prometheus_client``) and ``GET /status`` (the JSON that ``cryptfs status --json`` shows), and
nothing else: never file data. It binds loopback unless a non-loopback address is given
explicitly; then it says so in the log, and ``/status`` leaves out what names paths, buckets or
files (mountpoint, store URLs, the last warning). No metric label carries a file name, a path,
a bucket or a key: labels are operation kinds, store ids and cache kinds.

Longer than ~400 lines: every metric is declared here, because metric names and labels are the
operator's interface (README, docs/grafana-dashboard.json).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import json
import logging
import socket
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cryptfs.errors import CryptfsError, MountError, ObjectNotFound, UsageError
from cryptfs.fuse_row import (
    FUSE_BUCKETS,
    FUSE_BYTES,
    FUSE_CALLS,
    FUSE_ERRORS,
    FUSE_NB,
    FUSE_SAMPLE,
    FUSE_SECONDS,
    FUSE_WIDTH,
)

log = logging.getLogger("cryptfs.metrics")

DEFAULT_ADDRESS = "127.0.0.1:9567"  # the port JuiceFS uses; one mount per port
# a store request: ~100 us (local file) to tens of seconds (a timed-out S3 call with retries)
STORE_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      300.0, 900.0)


class _Rows:
    """Numbers added to on a hot path without a lock: each thread adds into its own row (a
    list: ``width`` numbers, then a dict of keyed counts) and :meth:`total` sums the rows at
    scrape time. Only its own thread writes a row, and reading a list item or copying a dict
    is atomic in CPython, so a scrape sees each figure at most one operation late; a histogram's
    count and sum may disagree by that one operation. A row whose thread has ended (its
    thread-local owner is gone) is folded into one total at the next scrape, so threads that
    come and go (a repair's pool) do not add up. The hot path reads the row itself::

        try:
            row = rows.local.row
        except AttributeError:
            row = rows.new_row()
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.local = threading.local()
        self._lock = threading.Lock()  # new rows and totals; never taken per operation
        self._live: list[tuple[weakref.ref[_RowOwner], list[Any]]] = []
        self._ended: list[Any] = [0] * width + [{}]

    def new_row(self) -> list[Any]:
        """The calling thread's row, made on its first record."""
        row: list[Any] = [0] * self.width + [{}]
        owner = _RowOwner()
        self.local.owner, self.local.row = owner, row  # both die with the thread
        with self._lock:
            self._live.append((weakref.ref(owner), row))
        return row

    def total(self) -> tuple[list[float], dict[Any, int]]:
        """The sums over every thread: the numbers and the keyed counts."""
        with self._lock:
            live = []
            for ref, row in self._live:
                if ref() is None:  # its thread ended: nobody writes this row any more
                    _add(self._ended, row)
                else:
                    live.append((ref, row))
            self._live = live
            out: list[Any] = list(self._ended[:-1]) + [dict(self._ended[-1])]
            for _, row in live:
                _add(out, row)
        return out[:-1], out[-1]


class _RowOwner:
    """Lives in a thread's locals only: gone once the thread has ended."""

    __slots__ = ("__weakref__",)


def _add(into: list[Any], row: list[Any]) -> None:
    """``row`` (numbers, then keyed counts) added into ``into``."""
    for i in range(len(into) - 1):
        into[i] += row[i]
    keyed = into[-1]
    for k, n in row[-1].copy().items():
        keyed[k] = keyed.get(k, 0) + n


# a FUSE row: see cryptfs.fuse_row
_NB, _BYTES = FUSE_NB, FUSE_BYTES
# a store request's row: the same with the store buckets
_SNB = len(STORE_BUCKETS) + 1
_SSECONDS, _SBYTES = _SNB, _SNB + 1
_STORE_OPS = ("put", "put_if_absent", "get", "get_range", "delete", "list", "exists", "sync")


def _histogram(family: HistogramMetricFamily, labels: list[str], bounds: list[str],
               fig: list[float], n: int) -> None:
    """Adds the histogram of a row's first ``n`` bucket counts (then its seconds)."""
    family.add_metric(labels, list(zip(bounds, itertools.accumulate(fig[:n]), strict=True)),
                      fig[n])


class _HotCollector(Collector):
    """What the hot paths record in rows (:class:`_Rows`), built at scrape time: FUSE
    operations (``cryptfs_fuse_operations_total`` and the sampled latency
    ``cryptfs_fuse_operation_seconds`` by ``op``, errors by ``op`` and ``errno``, read and
    written bytes), store requests (``cryptfs_store_operation_seconds`` and
    ``cryptfs_store_bytes`` by ``store`` and ``op``) and cache hits by ``cache``."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self.fuse_bounds = [floatToGoString(b) for b in FUSE_BUCKETS] + ["+Inf"]
        self.store_bounds = [floatToGoString(b) for b in STORE_BUCKETS] + ["+Inf"]

    def collect(self) -> Iterator[Any]:
        calls = CounterMetricFamily(
            "cryptfs_fuse_operations", "FUSE operations by kind", labels=["op"])
        h = HistogramMetricFamily(
            "cryptfs_fuse_operation_seconds",
            f"FUSE operations by kind: latency of a sample (the first of its kind in each "
            f"daemon thread and every {FUSE_SAMPLE}th after; _count is the sample's size, "
            f"cryptfs_fuse_operations_total counts them all)", labels=["op"])
        errors = CounterMetricFamily(
            "cryptfs_fuse_errors", "FUSE operations that returned an error, by kind and errno",
            labels=["op", "errno"])
        nbytes = {}
        for op, (fig, failed) in self.m._fuse.totals().items():
            nbytes[op] = fig[_BYTES]
            calls.add_metric([op], fig[FUSE_CALLS])
            _histogram(h, [op], self.fuse_bounds, fig, _NB)
            for code, n in sorted(failed.items()):  # (positive ints: CryptfsFUSE._wrapper)
                errors.add_metric([op, errno.errorcode.get(code, str(code))], n)
        yield calls
        yield h
        yield errors
        yield CounterMetricFamily("cryptfs_fuse_read_bytes", "Bytes read through the mount",
                                  value=nbytes.get("read", 0))
        yield CounterMetricFamily("cryptfs_fuse_written_bytes",
                                  "Bytes written through the mount",
                                  value=nbytes.get("write", 0))
        sh = HistogramMetricFamily(
            "cryptfs_store_operation_seconds",
            "Object store requests by store and kind (put, get, delete, list, ...): latency; "
            "the _count is the number of requests", labels=["store", "op"])
        sb = CounterMetricFamily(
            "cryptfs_store_bytes", "Object bytes sent to (put) and received from (get, get_range) "
            "a store",
            labels=["store", "op"])
        for store_id, ops in list(self.m._stores.items()):
            for op, rows in ops.items():
                fig, _ = rows.total()
                _histogram(sh, [store_id, op], self.store_bounds, fig, _SNB)
                if op in ("put", "get", "get_range"):
                    sb.add_metric([store_id, op], fig[_SBYTES])
        yield sh
        yield sb
        hits = CounterMetricFamily(
            "cryptfs_cache_hits", "Chunk reads served without the store: from memory (plaintext)"
            " or disk (the sealed-object cache or the upload staging area)", labels=["cache"])
        fig, _ = self.m._hits.total()
        hits.add_metric(["memory"], fig[0])
        hits.add_metric(["disk"], fig[1])
        yield hits


class FuseRecorder:
    """The FUSE callbacks of a mount, recorded by the FUSE adapter's one wrapper
    (:meth:`cryptfs.cli.fuse_ops.CryptfsFUSE._wrapper`) in the calling thread's rows, without
    a lock, and summed by operation at scrape time.

    Each thread has a dict ``local.rows``: callback (the callable libfuse's callback runs,
    named like mfusepy's method, ``getattr_fuse_3`` counting as ``getattr``) -> its row, a list
    of ``FUSE_WIDTH`` numbers and a dict (:mod:`cryptfs.fuse_row`): a count per latency
    bucket of :data:`FUSE_BUCKETS` (then +Inf) and the seconds, over the timed callbacks (the
    first of its kind in the thread and every ``FUSE_SAMPLE``-th after), then the bytes the
    callback returned (reported for ``read`` and ``write`` only), the number of callbacks, a
    count per errno below :data:`FUSE_ERRNOS` at ``FUSE_ERRORS + errno``, and in the dict the
    counts of larger errnos. The wrapper adds into the row itself: per callback that is one
    thread-local and one dict lookup, one to three additions to one list, and for a timed
    callback a clock read before and after, with no call into this module. What a record
    costs the daemon is what it touches in memory and the clock more than what it executes:
    a callback runs after two context switches, with the caches cold, so every object and
    cache line it touches counts (one list and a few ints and floats here, against ten
    closure cells, two dicts and two thread-locals before), and the two clock reads were
    half of the rest (BENCHMARKS.md).

    Like :class:`_Rows`: only its thread writes a row, a scrape copies the dicts and reads the
    rows (a figure at most one callback late), and the rows of a thread that ended are folded
    into one total at the next scrape."""

    def __init__(self) -> None:
        self.local = threading.local()
        self._lock = threading.Lock()  # new threads and totals; never taken per callback
        self._live: list[tuple[weakref.ref[_RowOwner], dict[Any, list[Any]]]] = []
        self._ended: dict[str, list[Any]] = {}  # operation -> the rows of ended threads

    def thread_rows(self) -> dict[Any, list[Any]]:
        """The calling thread's rows (``local.rows``), made on its first callback."""
        rows: dict[Any, list[Any]] = {}
        owner = _RowOwner()
        self.local.owner, self.local.rows = owner, rows  # both die with the thread
        with self._lock:
            self._live.append((weakref.ref(owner), rows))
        return rows

    @staticmethod
    def new_row(rows: dict[Any, list[Any]], callback: Any) -> list[Any]:
        """The row of ``callback`` in the calling thread's ``rows``, made on its first call."""
        row: list[Any] = [0] * FUSE_WIDTH + [{}]
        row[FUSE_SECONDS] = 0.0
        rows[callback] = row
        return row

    def totals(self) -> dict[str, tuple[list[Any], dict[int, int]]]:
        """Operation -> the sums over every thread: the bucket counts, seconds and bytes, and
        the count by errno. ``read`` and ``write`` are always there."""
        out: dict[str, list[Any]] = {}

        def into(op: str, row: list[Any]) -> None:
            total = out.get(op)
            if total is None:
                total = out[op] = [0] * FUSE_WIDTH + [{}]
            _add(total, row)

        with self._lock:
            live = []
            for ref, rows in self._live:
                ended = ref() is None  # its thread ended: nobody writes these rows any more
                for callback, row in rows.copy().items():
                    op = callback.__name__.removesuffix("_fuse_3")
                    if ended:
                        total = self._ended.setdefault(op, [0] * FUSE_WIDTH + [{}])
                        _add(total, row)
                    else:
                        into(op, row)
                if not ended:
                    live.append((ref, rows))
            self._live = live
            for op, row in self._ended.items():
                into(op, row)
        for op in ("read", "write"):
            out.setdefault(op, [0] * FUSE_WIDTH + [{}])
        result = {}
        for op, total in out.items():
            failed = {code: n for code, n in enumerate(total[FUSE_ERRORS:FUSE_WIDTH]) if n}
            failed.update(total[-1])
            result[op] = (total[:FUSE_ERRORS], failed)
        return result


class Metrics:
    """The instruments of one mount (see the module docstring for who records what)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._fuse = FuseRecorder()
        self._stores: dict[str, dict[str, _Rows]] = {}  # store id -> request kind -> rows
        self._hits = _Rows(2)  # memory, disk
        r.register(_HotCollector(self))
        self.store_errors = Counter(
            "cryptfs_store_errors", "Failed store requests by store, kind and error kind",
            ["store", "op", "kind"], registry=r)
        self.store_info = Gauge("cryptfs_store_info", "The stores of the vault (always 1)",
                                ["store", "kind"], registry=r)
        self.cache_misses = Counter("cryptfs_cache_misses",
                                    "Chunk reads that fetched the object from the store",
                                    registry=r)
        self.cache_evictions = Counter("cryptfs_cache_evictions",
                                       "Objects evicted from the disk cache", registry=r)
        self.integrity_errors = Counter(
            "cryptfs_integrity_errors",
            "Objects fetched that were missing or failed their integrity check", registry=r)
        self.checkpoint_seconds = Histogram(
            "cryptfs_checkpoint_duration_seconds",
            "Checkpoints written by this mount: duration (the _count is the number)",
            registry=r, buckets=CHECKPOINT_BUCKETS)
        self.checkpoint_failures = Counter("cryptfs_checkpoint_failures",
                                           "Checkpoints that failed", registry=r)
        self.checkpoint_bytes = Gauge("cryptfs_checkpoint_snapshot_bytes",
                                      "Size of the newest metadata snapshot this mount stored",
                                      registry=r)

    # -- recording helpers for the hot paths ---------------------------------------------------
    def memory_hit(self) -> None:
        local = self._hits.local
        try:
            local.row[0] += 1
        except AttributeError:
            self._hits.new_row()[0] += 1

    def disk_hit(self) -> None:
        local = self._hits.local
        try:
            local.row[1] += 1
        except AttributeError:
            self._hits.new_row()[1] += 1

    def fuse_recorder(self) -> FuseRecorder:
        """Where the FUSE adapter's wrapper records every callback (see :class:`FuseRecorder`)."""
        return self._fuse

    def wrap_store(self, store: Any, store_id: str) -> MeteredStore:
        """``store`` with its requests recorded under label ``store=store_id``."""
        kind = store.url.partition(":")[0] or "unknown"
        self.store_info.labels(store_id, kind).set(1)
        ops = self._stores.setdefault(store_id, {op: _Rows(_SNB + 2) for op in _STORE_OPS})
        return MeteredStore(store, self.store_errors, store_id, ops)


_clock = time.perf_counter


def _store_recorder(rows: _Rows) -> Callable[..., None]:
    """``record(t, nbytes=0)``: a request of one kind that started at ``t`` (perf_counter)
    and moved ``nbytes``, added to the calling thread's row."""
    local, new_row = rows.local, rows.new_row
    bounds, seconds, counted = STORE_BUCKETS, _SSECONDS, _SBYTES
    clock = time.perf_counter

    def record(t: float, nbytes: int = 0) -> None:
        d = clock() - t
        try:
            row = local.row
        except AttributeError:
            row = new_row()
        row[bisect_left(bounds, d)] += 1
        row[seconds] += d
        if nbytes:
            row[counted] += nbytes

    return record


class MeteredStore:
    """An :class:`cryptfs.stores.ObjectStore` that times and counts every request of the store
    it wraps (restic's decorator backend); everything else is passed through unchanged. A
    request is recorded in the calling thread's row of its kind (:class:`_Rows`): about a
    microsecond, against 100 us for the cheapest request (a local file)."""

    def __init__(self, inner: Any, errors: Counter, store_id: str,
                 ops: dict[str, _Rows]) -> None:
        self.inner = inner
        self._id = store_id
        self._errors = errors
        self._rec = {op: _store_recorder(rows) for op, rows in ops.items()}
        self._put_bytes = ops["put"]  # put_if_absent's bytes count as put's

    @property
    def url(self) -> str:
        return str(self.inner.url)

    def __getattr__(self, name: str) -> Any:  # attributes of the real store (not requests)
        return getattr(self.inner, name)

    def _fail(self, op: str, e: BaseException) -> None:
        kind = ("not_found" if isinstance(e, ObjectNotFound)
                else type(e).__name__ if isinstance(e, CryptfsError) else "other")
        self._errors.labels(self._id, op, kind).inc()

    def _call(self, op: str, fn: Callable[..., Any], *args: Any,
              nbytes: Callable[[Any], int] | None = None) -> Any:
        """``fn(*args)`` timed as a request of kind ``op``, failed ones counted by error;
        ``nbytes(result)``: the bytes a successful one moved."""
        t = _clock()
        try:
            out = fn(*args)
        except Exception as e:
            self._rec[op](t)
            self._fail(op, e)
            raise
        self._rec[op](t, nbytes(out) if nbytes is not None else 0)
        return out

    def put(self, name: str, data: bytes) -> None:
        self._call("put", self.inner.put, name, data, nbytes=lambda _: len(data))

    def append(self, name: str, at: int, data: bytes) -> None:  # (counted as a put)
        self._call("put", self.inner.append, name, at, data, nbytes=lambda _: len(data))

    def put_if_absent(self, name: str, data: bytes) -> bool:
        done = bool(self._call("put_if_absent", self.inner.put_if_absent, name, data))
        if done:  # the bytes sent count under put (the kind operators watch)
            rows = self._put_bytes
            try:
                row = rows.local.row
            except AttributeError:
                row = rows.new_row()
            row[_SBYTES] += len(data)
        return done

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        return cast(bytes, self._call("get", self.inner.get, name, max_size, check, nbytes=len))

    def get_range(self, name: str, offset: int, length: int, size: int | None) -> bytes:
        return cast(bytes, self._call("get_range", self.inner.get_range, name, offset, length,
                                      size, nbytes=len))

    def delete(self, name: str) -> None:
        self._call("delete", self.inner.delete, name)

    def exists(self, name: str) -> bool:
        return bool(self._call("exists", self.inner.exists, name))

    def sync(self) -> None:
        self._call("sync", self.inner.sync)

    def _listing(self, it: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        t = time.perf_counter()
        try:
            yield from it()
        except Exception as e:
            self._fail("list", e)
            raise
        finally:
            self._rec["list"](t)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self._listing(lambda: self.inner.list(prefix))

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        return self._listing(lambda: self.inner.list_aged(prefix))

    def close(self) -> None:
        self.inner.close()


class VaultCollector(Collector):
    """The figures of an open vault read at scrape time: pending uploads, cache, ledger head,
    last checkpoint, lease, read-only state, read and upload errors, store health."""

    def __init__(self, vault: Any) -> None:
        self.vault = vault

    def collect(self) -> Iterator[Any]:
        v = self.vault
        chunks = v.chunks
        if chunks is not None:
            objects, nbytes = chunks.pending()
            yield GaugeMetricFamily("cryptfs_uploads_pending_objects",
                                    "Objects staged locally, waiting for their upload",
                                    value=objects)
            yield GaugeMetricFamily("cryptfs_uploads_pending_bytes",
                                    "Bytes staged locally, waiting for their upload", value=nbytes)
            yield GaugeMetricFamily("cryptfs_uploads_oldest_pending_age_seconds",
                                    "Age of the oldest upload still waiting (0: none)",
                                    value=chunks.oldest_pending_age())
            yield CounterMetricFamily("cryptfs_upload_errors", "Uploads given up (at unmount "
                                      "or on a local error)", value=chunks.errors)
            cache = chunks.cache
            yield GaugeMetricFamily("cryptfs_cache_bytes", "Bytes in the disk cache",
                                    value=cache.bytes if cache is not None else 0)
            yield GaugeMetricFamily("cryptfs_cache_limit_bytes", "Size limit of the disk cache",
                                    value=cache.max_bytes if cache is not None else 0)
            yield GaugeMetricFamily("cryptfs_memory_cache_bytes",
                                    "Plaintext of recently read chunks kept in memory",
                                    value=chunks.memory_bytes())
        fs, ledger = v.fs, v.ledger
        if fs is not None and ledger is not None:
            with fs.lock:
                head = ledger.head()
            yield GaugeMetricFamily("cryptfs_ledger_head_sequence",
                                    "Sequence number of the newest ledger entry",
                                    value=head.seq if head else 0)
            yield CounterMetricFamily("cryptfs_read_errors", "Reads that failed (store or "
                                      "integrity error)", value=fs.read_errors)
        ck = v.checkpointer
        yield GaugeMetricFamily("cryptfs_checkpoint_last_timestamp_seconds",
                                "When this machine last recorded a checkpoint (Unix time)",
                                value=ck.last_ns / 1e9 if ck is not None else 0.0)
        lease = v.lease
        held = (lease is not None and lease.held()) or (v.session is not None
                                                        and not v.session_lost)
        yield GaugeMetricFamily("cryptfs_lease_held",
                                "1 while this mount holds the vault's write lease (on a "
                                "PostgreSQL vault: a live session in the database)",
                                value=1 if held else 0)
        ro = GaugeMetricFamily("cryptfs_readonly", "1 when the mount is read-only; the reason "
                               "is mount_option, lease_lost, lease_not_renewed, "
                               "ledger_forked or checkpoint_failed", labels=["reason"])
        cause = v.readonly_cause()
        ro.add_metric([cause], 0 if cause == "none" else 1)
        yield ro
        members = v.store.members  # a replicated store's (a plain store has none)
        if members:
            up = GaugeMetricFamily("cryptfs_store_up", "1 while a store of a replicated vault "
                                   "answers", labels=["store"])
            for m in members:
                up.add_metric([m.id], 0 if m.failures else 1)
            yield up


# -- the endpoint ---------------------------------------------------------------------------------
def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` (HOST an IP address or ``localhost``); an
    empty text is :data:`DEFAULT_ADDRESS`. Raises UsageError."""
    text = text.strip() or DEFAULT_ADDRESS
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") if host.startswith("[") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        num = int(port)
        if not 0 <= num <= 65535:
            raise ValueError
    except ValueError:
        raise UsageError(f"invalid metrics address '{text}'",
                         hint="use metrics=127.0.0.1:PORT (an IP address, not a host name)"
                         ) from None
    return host, num


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_REDACTED = ("mountpoint", "store", "last_warning")


def redact(doc: dict[str, Any]) -> dict[str, Any]:
    """The status without what names paths, buckets or files (for a non-loopback endpoint)."""
    out = {k: v for k, v in doc.items() if k not in _REDACTED}
    if "stores" in out:
        out["stores"] = [{k: v for k, v in s.items() if k != "url"} for s in out["stores"]]
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # TIME_WAIT only: Linux never lets two sockets listen on a port

    def __init__(self, address: tuple[str, int], endpoint: MetricsEndpoint) -> None:
        self.endpoint = endpoint
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsEndpoint:
    """The HTTP endpoint: bound at construction (so a taken port fails the mount before the
    vault is opened), serving from :meth:`start` until :meth:`close`."""

    def __init__(self, address: str) -> None:
        host, port = parse_address(address)
        self.loopback = is_loopback(host)
        self._registry: CollectorRegistry | None = None
        self._status: Callable[[], dict[str, Any]] = dict
        try:
            self._server = (_Server6 if ":" in host else _Server)((host, port), self)
        except OSError as e:
            why = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise MountError(f"cannot serve metrics on {format_address(host, port)}: {why}",
                             hint="another mount or program uses it; choose another port "
                             "with -o metrics=127.0.0.1:PORT") from None
        self.host = host
        self.port = int(self._server.server_address[1])
        self.address = format_address(host, self.port)
        self._thread: threading.Thread | None = None

    def start(self, registry: CollectorRegistry, status: Callable[[], dict[str, Any]]) -> None:
        """Serve ``registry`` at /metrics and ``status()`` at /status in a thread."""
        self._registry = registry
        self._status = status if self.loopback else lambda: redact(status())
        if self.loopback:
            log.info("metrics at http://%s/metrics, status at /status", self.address)
        else:
            log.warning("metrics endpoint bound to %s, reachable from other machines (asked "
                        "for with metrics=%s); /status leaves out paths and store URLs",
                        self.address, self.address)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "cryptfs"

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        path = self.path.split("?", 1)[0]
        ep: MetricsEndpoint = self.server.endpoint  # type: ignore[attr-defined]
        try:
            if path == "/metrics" and ep._registry is not None:
                body, ctype = generate_latest(ep._registry), CONTENT_TYPE_LATEST
            elif path == "/status":
                doc = ep._status()
                body = json.dumps({"mounts": [doc]}, indent=1).encode() + b"\n"
                ctype = "application/json"
            else:
                self.send_error(404, "only /metrics and /status are served here")
                return
        except Exception as e:  # noqa: BLE001 - a failed scrape must not touch the mount
            log.debug("metrics request %s failed: %s", path, e)
            self.send_error(503, "the daemon could not gather its figures")
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("metrics: " + format, *args)
