"""The mount lease: one read-write mount of a vault at a time, across machines.

(A vault whose metadata is in PostgreSQL takes no lease: its mounts hold sessions in the
database instead, several at once; see :class:`cryptfs.meta.postgres.PgSession`.)

A sealed object ``lease`` in the store names its holder (a random id, host, pid, machine id) and
an expiry. It is created with a conditional write (S3 ``If-None-Match: *``, an exclusive link
on a local store), renewed by a heartbeat every third of its lifetime, and deleted at a clean
unmount. Another mount is refused while the lease is fresh; it may take over a lease that
expired, or whose holder is a dead process on the same machine. A holder that finds its lease
taken over (it was frozen longer than the lifetime) stops writing.

Exception to "objects are immutable": the lease is overwritten by its holder's heartbeat.

Against a hostile store: only an authentic lease (sealed under the vault key) names a holder. A
lease object that fails authentication (garbage, a forged or oversized object) names nobody, so
a mount treats it as held until it is older than the lease lifetime (a live holder rewrites it
within a third of that, and so keeps its lease); a lease deleted under its live holder is put
back with a conditional write (if another mount was quicker, the holder stops writing). A
holder that cannot renew its lease for two thirds of the lifetime stops writing (read-only) before
another machine could take over, and writes again only if its own lease is still in place.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from cryptfs.errors import IntegrityError, LockedError, ObjectNotFound
from cryptfs.format import crypto, layout
from cryptfs.format.codec import Codec
from cryptfs.paths import machine_id
from cryptfs.stores import ObjectStore

log = logging.getLogger("cryptfs.vault.lease")

LEASE_OBJECT = layout.LEASE


def lease_seconds() -> float:
    """The lease lifetime; ``CRYPTFS_LEASE_SECONDS`` shortens it (tests), default 60 s."""
    try:
        return max(2.0, float(os.environ.get("CRYPTFS_LEASE_SECONDS", "60")))
    except ValueError:
        return 60.0


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


def check_lease(store: ObjectStore, codec: Codec) -> dict[str, Any] | None:
    """The authentic lease in ``store``, None if there is none; IntegrityError if the object
    is not an authentic lease of this vault (garbage, forged, oversized)."""
    try:
        blob = store.get(LEASE_OBJECT, layout.MAX_LEASE)
    except ObjectNotFound:
        return None
    try:
        doc = json.loads(codec.open_blob(b"lease", LEASE_OBJECT, blob))
        ok = (isinstance(doc["id"], str) and type(doc["expires_ns"]) is int
              and type(doc["pid"]) is int and isinstance(doc["machine"], str))
    except (IntegrityError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise IntegrityError("the lease object fails authentication (written without the key)")
    return doc  # type: ignore[no-any-return]


class Lease:
    def __init__(self, store: ObjectStore, codec: Codec) -> None:
        self.store = store
        self.codec = codec
        self.id = crypto.random_bytes(8).hex()
        self.ttl = lease_seconds()
        self.lost = False
        self.renewed = time.monotonic()  # when the lease last reached the store

    def _body(self) -> bytes:
        now = time.time_ns()
        doc = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
               "machine": machine_id(), "renewed_ns": now,
               "expires_ns": now + int(self.ttl * 1e9)}
        return self.codec.seal_blob(b"lease", LEASE_OBJECT, json.dumps(doc).encode())

    def _age(self) -> float | None:
        """Seconds since the lease object was written, as the store reports it."""
        for name, _size, mtime in self.store.list_aged(LEASE_OBJECT):
            if name == LEASE_OBJECT:
                return max(0.0, time.time() - mtime)
        return None

    @staticmethod
    def _stale(doc: dict[str, Any]) -> bool:
        if doc["expires_ns"] < time.time_ns():
            return True
        if doc["machine"] == machine_id():
            return not _alive(int(doc["pid"]))  # its holder died on this machine
        return False

    def held(self) -> bool:
        """Whether this mount may write: its lease is not lost and was renewed recently
        enough that no other machine can have taken it over (two thirds of the lifetime)."""
        return not self.lost and time.monotonic() - self.renewed < self.ttl * 2 / 3

    def acquire(self) -> None:
        """Take the lease or raise LockedError naming the holder."""
        for _ in range(5):
            if self.store.put_if_absent(LEASE_OBJECT, self._body()):
                try:
                    cur = check_lease(self.store, self.codec)
                except IntegrityError:
                    continue
                if cur is not None and cur["id"] == self.id:
                    self.renewed = time.monotonic()
                    return
                continue  # a server without conditional writes: someone else won
            try:
                cur = check_lease(self.store, self.codec)
            except IntegrityError as e:
                age = self._age()
                if age is None:
                    continue  # gone meanwhile
                if age < self.ttl:
                    raise LockedError(
                        f"{e}; a mount holding the vault rewrites it within "
                        f"{self.ttl / 3:.0f}s, so it counts as held until it is "
                        f"{self.ttl:.0f}s old (now {age:.0f}s)",
                        hint="wait and retry; 'cryptfs verify' reports such objects") from None
                log.warning("replacing a lease object that fails authentication (%.0fs old)",
                            age)
                self.store.delete(LEASE_OBJECT)
                continue
            if cur is None:
                continue
            if cur["id"] == self.id:
                self.renewed = time.monotonic()
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
        """Extend the lease; False (and ``lost``) if another mount took it over, or if it was
        gone or replaced after it expired (another mount may have held the vault meanwhile).
        A lease object that fails authentication, or none at all, while this mount's lease is
        still valid is replaced with a conditional write. StoreError if the store fails."""
        expired = time.monotonic() - self.renewed >= self.ttl * 2 / 3
        try:
            cur = check_lease(self.store, self.codec)
        except IntegrityError as e:
            if expired:
                return self._lose(f"{e}, found after this mount's lease expired")
            # Overwritten in place: no other mount can hold the vault meanwhile, since one
            # counts such an object as held until it is older than the lifetime, and it is
            # younger than this mount's last renewal (two thirds of the lifetime at most).
            log.warning("%s: replacing it with this mount's lease", e)
            self.store.put(LEASE_OBJECT, self._body())
            self.renewed = time.monotonic()
            return True
        if cur is None:
            if expired:
                return self._lose("the lease object was gone after this mount's lease expired")
            if not self.store.put_if_absent(LEASE_OBJECT, self._body()):
                return self._lose("another mount took the lease while it was missing")
            self.renewed = time.monotonic()
            return True
        if cur["id"] != self.id:
            return self._lose(f"the vault lease was taken over by {cur.get('host')} "
                              f"(pid {cur['pid']})")
        self.store.put(LEASE_OBJECT, self._body())
        self.renewed = time.monotonic()
        return True

    def _lose(self, why: str) -> bool:
        self.lost = True
        log.error("%s: this mount stops writing", why)
        return False

    def release(self) -> None:
        try:
            cur = check_lease(self.store, self.codec)
        except IntegrityError:
            return
        if cur is not None and cur["id"] == self.id:
            self.store.delete(LEASE_OBJECT)
