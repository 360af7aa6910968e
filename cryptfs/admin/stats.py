"""``cryptfs stats [MOUNTPOINT]``: a live view of a mount's metrics, one line a second.

Like ``vmstat`` or ``juicefs stats``: every interval the command scrapes the mount's metrics
endpoint (``-o metrics``; its address is in the mount's status), parses it with
``prometheus_client``'s parser and prints one line of rates over the interval: FUSE operations
per second, read and write throughput, the upload queue, the cache hit ratio and size, store
requests per second and their mean latency, store errors. On a terminal the header repeats
every screenful; otherwise the output is plain lines with one header. Ctrl-C ends it (exit 0).
"""

from __future__ import annotations

import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from cryptfs.admin.status import collect
from cryptfs.errors import MountError

Sample = dict[str, float]  # "name" or "name{label=value}" -> value

COLUMNS = (  # header, width
    ("ops/s", 7), ("rd MB/s", 8), ("wr MB/s", 8), ("upl obj", 8), ("upl MB", 7),
    ("oldest s", 8), ("hit %", 6), ("cache MB", 9), ("get/s", 7), ("put/s", 7),
    ("get ms", 7), ("put ms", 7), ("err/s", 6),
)


def find_endpoint(mountpoint: str | None) -> tuple[str, str]:
    """(mountpoint, scrape URL) of the mount to watch: the one given, or the only mount that
    serves metrics. MountError when there is none or the choice is ambiguous."""
    docs = [d for d in collect(mountpoint) if d.get("state") == "mounted"]
    with_metrics = [d for d in docs if d.get("metrics")]
    if not with_metrics:
        where = mountpoint or "any mount"
        raise MountError(f"{where} serves no metrics" if docs or mountpoint else
                         "no vault is mounted",
                         hint="mount with -o metrics=127.0.0.1:PORT to watch it")
    if len(with_metrics) > 1:
        raise MountError("several mounts serve metrics",
                         hint="name one: cryptfs stats MOUNTPOINT")
    doc = with_metrics[0]
    host, _, port = str(doc["metrics"]).rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)  # noqa: S104
    return str(doc.get("mountpoint")), f"http://{host}:{port}/metrics"


def scrape(url: str, timeout: float = 5.0) -> Sample:
    """Every sample of one scrape, keyed by name and sorted labels."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http
        text = resp.read().decode()
    out: Sample = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def total(sample: Sample, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = [f"{k}={v}" for k, v in labels.items()]
    n = 0.0
    for key, value in sample.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest.rstrip("}").split(",") for w in want):
            n += value
    return n


def row(prev: Sample, cur: Sample, dt: float) -> list[str]:
    """One line of figures for the interval between two scrapes."""
    def rate(name: str, **labels: str) -> float:
        return max(0.0, total(cur, name, **labels) - total(prev, name, **labels)) / dt

    def mean_ms(op: str) -> str:
        n = rate("cryptfs_store_operation_seconds_count", op=op) * dt
        s = rate("cryptfs_store_operation_seconds_sum", op=op) * dt
        return f"{s / n * 1000:.1f}" if n else "-"

    hits = rate("cryptfs_cache_hits_total")
    misses = rate("cryptfs_cache_misses_total")
    return [
        f"{rate('cryptfs_fuse_operations_total'):.0f}",
        f"{rate('cryptfs_fuse_read_bytes_total') / 1e6:.1f}",
        f"{rate('cryptfs_fuse_written_bytes_total') / 1e6:.1f}",
        f"{total(cur, 'cryptfs_uploads_pending_objects'):.0f}",
        f"{total(cur, 'cryptfs_uploads_pending_bytes') / 1e6:.1f}",
        f"{total(cur, 'cryptfs_uploads_oldest_pending_age_seconds'):.0f}",
        f"{hits / (hits + misses) * 100:.0f}" if hits + misses else "-",
        f"{total(cur, 'cryptfs_cache_bytes') / 1e6:.1f}",
        f"{rate('cryptfs_store_operation_seconds_count', op='get'):.0f}",
        f"{rate('cryptfs_store_operation_seconds_count', op='put'):.0f}",
        mean_ms("get"),
        mean_ms("put"),
        f"{rate('cryptfs_store_errors_total'):.0f}",
    ]


def _line(cells: list[str]) -> str:
    return " ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))


def watch(mountpoint: str | None, interval: float = 1.0, count: int = 0,
          out: TextIO = sys.stdout, sleep: Callable[[float], Any] = time.sleep) -> int:
    """Print a line every ``interval`` seconds (``count`` lines, 0: until Ctrl-C)."""
    mp, url = find_endpoint(mountpoint)
    tty = out.isatty()
    header = _line([h for h, _ in COLUMNS])
    every = max(5, shutil.get_terminal_size().lines - 2) if tty else 0

    def get() -> Sample:
        try:
            return scrape(url)
        except (OSError, urllib.error.URLError, ValueError) as e:
            raise MountError(f"cannot read the metrics of {mp} at {url}: {e}",
                             hint="is it still mounted? see 'cryptfs status'") from None

    printed = 0
    try:
        prev, t0 = get(), time.monotonic()
        out.write(f"{mp}: {url}\n{header}\n")
        out.flush()
        while count <= 0 or printed < count:
            sleep(interval)
            cur, t1 = get(), time.monotonic()
            if every and printed and printed % every == 0:
                out.write(header + "\n")
            out.write(_line(row(prev, cur, max(t1 - t0, 1e-3))) + "\n")
            out.flush()
            printed += 1
            prev, t0 = cur, t1
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
    return 0
