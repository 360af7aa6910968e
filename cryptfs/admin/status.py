"""``cryptfs status``: what each mounted vault is doing, published by its daemon.

The mount daemon runs a :class:`StatusPublisher` thread that rewrites
``$XDG_DATA_HOME/cryptfs/vaults/NAME/status.json`` (0600, temp file + rename, no fsync: it is
informational) about once a second while the vault is mounted, and with ``"state":
"unmounting"`` and the upload progress while it stores pending data after an unmount. The
command finds cryptfs mounts in /proc/self/mounts (device ``cryptfs:NAME``) and reads the file
of each.

status.json keys: ``state`` (mounted, unmounting), ``name``, ``mountpoint``, ``pid``, ``store``,
``readonly``, ``mounted_ns``, ``updated_ns``, ``pending_objects``, ``pending_bytes``,
``cache_bytes``, ``cache_limit``, ``ledger_seq``, ``ledger_hash``, ``checkpoint``,
``checkpoint_seq``, ``checkpoint_ns``, ``read_errors``, ``upload_errors``, ``warnings``,
``last_warning``, and ``metrics`` (HOST:PORT) when the mount serves metrics. The same document
is served at ``/status`` of the metrics endpoint (:meth:`StatusPublisher.snapshot`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptfs.errors import MountError
from cryptfs.format.layout import checkpoint_seq
from cryptfs.paths import VaultPaths, list_vaults, paths_for_mount

log = logging.getLogger("cryptfs.admin.status")

STATUS_FILE = "status.json"
INTERVAL = 1.0
STALE_AFTER = 10.0  # seconds without an update: the daemon is stuck or gone


def status_path(paths: VaultPaths) -> Path:
    return paths.data_dir / STATUS_FILE


def write_status(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(doc, indent=1).encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _WarningCounter(logging.Handler):
    """Counts warnings and errors logged by the daemon since the mount."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.count += 1
            self.last = record.getMessage()[:300]
        except Exception:  # noqa: BLE001 - a broken log record must not break the daemon
            pass


class StatusPublisher:
    """The daemon's status thread (see the module docstring)."""

    def __init__(self, vault: Any, mountpoint: str, cache_limit: int,
                 metrics: str | None = None) -> None:
        self.vault = vault
        self.paths: VaultPaths = vault.paths
        self.path = status_path(self.paths)
        self.doc: dict[str, Any] = {
            "state": "mounted",
            "name": self.paths.name,
            "mountpoint": mountpoint,
            "pid": os.getpid(),
            "store": vault.store.url,
            "readonly": bool(vault.readonly),
            "mounted_ns": time.time_ns(),
            "cache_limit": cache_limit,
            "cache_bytes": 0,
        }
        if metrics is not None:
            self.doc["metrics"] = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warnings = _WarningCounter()
        self._lock = threading.Lock()

    def start(self) -> None:
        logging.getLogger().addHandler(self._warnings)
        self.publish()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the periodic updates (before the vault is closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.publish()

    def _gather(self) -> None:
        v = self.vault
        d = self.doc
        if v.chunks is not None:
            d["pending_objects"], d["pending_bytes"] = v.chunks.pending()
            d["upload_errors"] = int(getattr(v.chunks, "errors", 0))
            d["cache_bytes"] = v.chunks.cache.bytes if v.chunks.cache is not None else 0
        if v.fs is not None and v.ledger is not None:
            with v.fs.lock:
                head = v.ledger.head()
                d["read_errors"] = int(v.fs.read_errors)
            d["ledger_seq"] = head.seq if head else 0
            d["ledger_hash"] = head.hash.hex() if head else ""
        try:
            ck = v.checkpointer  # (a read-only mount has none: the head file's age)
            if ck is not None and ck.newest is not None:  # (the head file lags up to a second)
                d["checkpoint"] = ck.newest
                d["checkpoint_seq"] = checkpoint_seq(ck.newest) or 0
            else:
                h = json.loads(self.paths.head.read_text())
                d["checkpoint"] = str(h.get("checkpoint", ""))
                d["checkpoint_seq"] = int(h.get("seq", 0))
            d["checkpoint_ns"] = ck.last_ns if ck is not None else \
                self.paths.head.stat().st_mtime_ns
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        d["warnings"] = self._warnings.count
        d["last_warning"] = self._warnings.last
        reason = getattr(v, "readonly_reason", None)  # a read-write mount that stopped writing
        d["readonly"] = bool(v.readonly or reason)
        d["readonly_reason"] = reason or ""
        members = v.store.members  # a replicated store's: their health and copies waiting
        if members and v.fs is not None and v.meta is not None:
            with v.fs.lock:  # copies waiting per store (the replicated store's health too)
                pending = v.meta.pending_copy_counts()
            d["stores"] = [{"id": m.id, "url": m.url, "up": not m.failures,
                            "pending_copies": pending.get(m.id, 0)} for m in members]

    def snapshot(self) -> dict[str, Any]:
        """The status now (a copy): what status.json holds and ``/status`` serves."""
        with self._lock:
            if self.doc["state"] == "mounted":
                self._gather()
            self.doc["updated_ns"] = time.time_ns()
            return json.loads(json.dumps(self.doc))

    def publish(self) -> None:
        try:
            write_status(self.path, self.snapshot())
        except Exception as e:  # noqa: BLE001 - status is best effort, never fatal
            log.debug("cannot publish status: %s", e)

    def unmounting(self, objects: int, nbytes: int) -> None:
        """Progress callback of the final checkpoint after the unmount."""
        with self._lock:
            self.doc["state"] = "unmounting"
            self.doc["pending_objects"] = objects
            self.doc["pending_bytes"] = nbytes
        self.publish()

    def remove(self) -> None:
        logging.getLogger().removeHandler(self._warnings)
        self.path.unlink(missing_ok=True)


# -- the command ----------------------------------------------------------------------------------
def cryptfs_mounts() -> list[tuple[str, str]]:
    """(vault name, mountpoint) of every cryptfs mount, from /proc/self/mounts."""
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or not parts[0].startswith("cryptfs:"):
                    continue
                mp = parts[1].encode().decode("unicode_escape")
                out.append((parts[0].split(":", 1)[1], mp))
    except OSError:
        pass
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def read_status(name: str, mountpoint: str | None) -> dict[str, Any]:
    """The published status of vault ``name`` (or a stub saying why there is none)."""
    base: dict[str, Any] = {"name": name, "mountpoint": mountpoint}
    try:
        paths = paths_for_mount(name)
    except Exception:  # noqa: BLE001 - a foreign mount with an odd name
        return {**base, "state": "unknown", "problem": "not a vault name of this machine"}
    try:
        doc = json.loads(status_path(paths).read_text())
        if not isinstance(doc, dict):
            raise ValueError
    except FileNotFoundError:
        return {**base, "state": "unknown",
                "problem": "no status here (mounted by another user, with other XDG_* settings, "
                "or by an older cryptfs)"}
    except (OSError, ValueError) as e:
        return {**base, "state": "unknown", "problem": f"unreadable status file: {e}"}
    if mountpoint is not None and doc.get("mountpoint") not in (None, mountpoint):
        return {**base, "state": "unknown",
                "problem": "no status here (mounted by another user or with other XDG_* "
                "settings)"}
    doc.setdefault("mountpoint", mountpoint)
    pid = doc.get("pid")
    age = (time.time_ns() - int(doc.get("updated_ns", 0))) / 1e9
    doc["age_seconds"] = round(age, 1)
    if isinstance(pid, int) and not _alive(pid):
        doc["state"] = "dead"
        doc["problem"] = f"the daemon (pid {pid}) is gone"
    elif doc.get("state") == "mounted" and age > STALE_AFTER:
        doc["state"] = "stalled"
        doc["problem"] = f"no status update for {age:.0f} s: the daemon is busy or stuck"
    return doc


def collect(mountpoint: str | None) -> list[dict[str, Any]]:
    mounts = cryptfs_mounts()
    if mountpoint is not None:
        real = os.path.realpath(mountpoint)
        found = [(n, mp) for n, mp in mounts if mp == real]
        if not found:
            raise MountError(f"{mountpoint} is not a cryptfs mount",
                             hint="run 'cryptfs status' to list mounted vaults")
        return [read_status(n, mp) for n, mp in found]
    out = [read_status(n, mp) for n, mp in mounts]
    shown = {d["name"] for d in out}
    for name in list_vaults():  # unmounted, still storing pending data
        if name in shown:
            continue
        try:
            doc = json.loads(status_path(VaultPaths(name)).read_text())
        except (OSError, ValueError, Exception):  # noqa: BLE001
            continue
        if (isinstance(doc, dict) and doc.get("state") == "unmounting"
                and isinstance(doc.get("pid"), int) and _alive(doc["pid"])):
            out.append(read_status(name, None))
    return out


def _size(n: Any) -> str:
    try:
        v = float(n)
    except (TypeError, ValueError):
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if v < 1000 or unit == "TB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} TB"


def _when(ns: Any) -> str:
    try:
        t = int(ns) / 1e9
    except (TypeError, ValueError):
        return "?"
    ago = max(0, time.time() - t)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({ago:.0f} s ago)"


def format_status(doc: dict[str, Any]) -> str:
    lines = [f"{doc.get('mountpoint') or '(unmounted)'}: vault '{doc.get('name')}', "
             f"{doc.get('state')}"]
    if doc.get("problem"):
        lines.append(f"  problem: {doc['problem']}")
    if "store" in doc:
        ro = " (read-only)" if doc.get("readonly") else ""
        if doc.get("readonly_reason"):
            ro = f" (read-only: {doc['readonly_reason']})"
        lines.append(f"  store: {doc['store']}{ro}")
    for st in doc.get("stores", ()):
        lines.append(f"    store {st['id']}: {'up' if st['up'] else 'down'}, "
                     f"{st['pending_copies']} copies pending ({st['url']})")
    if "pid" in doc:
        lines.append(f"  daemon: pid {doc['pid']}, mounted {_when(doc.get('mounted_ns'))}")
    if "pending_objects" in doc:
        lines.append(f"  pending uploads: {doc['pending_objects']} objects, "
                     f"{_size(doc.get('pending_bytes', 0))}")
    if doc.get("cache_limit") is not None and "store" in doc:
        if str(doc.get("store", "")).startswith("file://"):
            lines.append("  cache: none (local store)")
        else:
            lines.append(f"  cache: {_size(doc.get('cache_bytes', 0))} of "
                         f"{_size(doc.get('cache_limit'))}")
    if "ledger_seq" in doc:
        lines.append(f"  ledger head: sequence {doc['ledger_seq']} "
                     f"({str(doc.get('ledger_hash', ''))[:16]})")
    if doc.get("checkpoint"):
        lines.append(f"  last checkpoint: {doc['checkpoint']} (sequence "
                     f"{doc.get('checkpoint_seq')}), {_when(doc.get('checkpoint_ns'))}")
    if doc.get("metrics"):
        lines.append(f"  metrics: http://{doc['metrics']}/metrics (watch: cryptfs stats)")
    if "warnings" in doc:
        lines.append(f"  errors since mount: {doc.get('read_errors', 0)} read, "
                     f"{doc.get('upload_errors', 0)} upload, {doc['warnings']} warnings logged"
                     + (f" (last: {doc['last_warning']})" if doc.get("last_warning") else ""))
    return "\n".join(lines)
