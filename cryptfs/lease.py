"""The mount lease: one read-write mount of a vault at a time, across machines.

A sealed object ``lease`` in the store names its holder (a random id, host, pid, machine id) and
an expiry. It is created with a conditional write (S3 ``If-None-Match: *``, an exclusive link
on a local store), renewed by a heartbeat every third of its lifetime, and deleted at a clean
unmount. Another mount is refused while the lease is fresh; it may take over a lease that
expired, or whose holder is a dead process on the same machine. A holder that finds its lease
taken over (it was frozen longer than the lifetime) stops writing.

Exception to "objects are immutable": the lease is overwritten by its holder's heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from cryptfs import crypto
from cryptfs.codec import Codec
from cryptfs.errors import IntegrityError, LockedError, ObjectNotFound
from cryptfs.stores import ObjectStore

log = logging.getLogger("cryptfs.lease")

LEASE_OBJECT = "lease"


def lease_seconds() -> float:
    """The lease lifetime; ``CRYPTFS_LEASE_SECONDS`` shortens it (tests), default 60 s."""
    try:
        return max(2.0, float(os.environ.get("CRYPTFS_LEASE_SECONDS", "60")))
    except ValueError:
        return 60.0


def machine_id() -> str:
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, killed but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Lease:
    def __init__(self, store: ObjectStore, codec: Codec) -> None:
        self.store = store
        self.codec = codec
        self.id = crypto.random_bytes(8).hex()
        self.ttl = lease_seconds()
        self.lost = False

    def _body(self) -> bytes:
        now = time.time_ns()
        doc = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
               "machine": machine_id(), "renewed_ns": now,
               "expires_ns": now + int(self.ttl * 1e9)}
        return self.codec.seal_blob(b"lease", LEASE_OBJECT, json.dumps(doc).encode())

    def _read(self) -> dict[str, Any] | None:
        """The current lease, or None if there is none or it is not authentic."""
        try:
            blob = self.store.get(LEASE_OBJECT)
        except ObjectNotFound:
            return None
        try:
            doc = json.loads(self.codec.open_blob(b"lease", LEASE_OBJECT, blob))
            _ = (doc["id"], doc["expires_ns"], doc["pid"], doc["machine"])
            return doc  # type: ignore[no-any-return]
        except (IntegrityError, ValueError, KeyError, TypeError):
            log.warning("ignoring a lease object that fails authentication")
            return {"id": "", "expires_ns": 0, "pid": 0, "machine": "", "host": "?"}

    @staticmethod
    def _stale(doc: dict[str, Any]) -> bool:
        if doc["expires_ns"] < time.time_ns():
            return True
        if doc["machine"] == machine_id():
            return not _alive(int(doc["pid"]))  # its holder died on this machine
        return False

    def acquire(self) -> None:
        """Take the lease or raise LockedError naming the holder."""
        for _ in range(5):
            if self.store.put_if_absent(LEASE_OBJECT, self._body()):
                cur = self._read()
                if cur is not None and cur["id"] == self.id:
                    return
                continue  # a server without conditional writes: someone else won
            cur = self._read()
            if cur is None:
                continue
            if cur["id"] == self.id:
                return  # our own write, confirmed after a lost response
            if self._stale(cur):
                log.info("taking over a stale lease of %s (pid %s)", cur.get("host"), cur["pid"])
                self.store.delete(LEASE_OBJECT)
                continue
            left = (cur["expires_ns"] - time.time_ns()) / 1e9
            raise LockedError(
                f"the vault is mounted on {cur.get('host', '?')} (pid {cur['pid']}); its lease "
                f"expires in {max(0, left):.0f}s unless renewed",
                hint="unmount it there first, or wait until that mount is gone")
        raise LockedError("could not take the vault lease (others keep taking it)")

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) if another mount took it over."""
        cur = self._read()
        if cur is not None and cur["id"] != self.id:
            self.lost = True
            log.error("the vault lease was taken over by %s (pid %s): this mount stops writing",
                      cur.get("host"), cur["pid"])
            return False
        self.store.put(LEASE_OBJECT, self._body())
        return True

    def release(self) -> None:
        cur = self._read()
        if cur is not None and cur["id"] == self.id:
            self.store.delete(LEASE_OBJECT)
