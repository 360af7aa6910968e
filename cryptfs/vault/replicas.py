"""Bringing the stores of a replicated vault level: pending copies, back-fill and repair.

The copies table (metadata) says, for each object, which stores hold a good copy ('ok') and which
should but do not yet ('pending'); the ledger has a ``copy@id`` or ``lost@id`` entry for each
change. :func:`copy_pending` makes pending copies from a good one (the local staging area or
cache, or another store, checked against the recorded hash); the mount runs it in the
background, ``cryptfs repair`` and ``cryptfs store add`` in the foreground with progress.
:func:`survey` lists every store and finds copies that are missing, the wrong size or (with
``full``) corrupt, and objects a store keeps that nothing references.

A store's copy reports reach the metadata through a :class:`CopyLog`: it exists before the
store (which is built with its ``copied`` and ``stray`` methods as callbacks) and before the
metadata (whose connection records the queued events at the next commit). The functions here
work on a :class:`Replicas`, the few parts of an open vault they need. With a plain store
(no members) there is nothing to level and each of them does nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cryptfs.errors import CryptfsError, StoreError
from cryptfs.format.codec import ChunkRef
from cryptfs.format.layout import PER_STORE, TRACKED_PREFIXES
from cryptfs.meta import MetaEngine
from cryptfs.meta.ledger import Ledger
from cryptfs.stores.base import Member, ObjectStore

log = logging.getLogger("cryptfs.vault.replicas")


class CopyLog:
    """Copy events reported by a store (from any thread), queued until the metadata records
    them: ``copied(name, store id, ok)`` says where a copy landed or is missing, ``stray(name,
    store id)`` that a delete did not reach a store (its copy is deleted later). Only objects
    the vault tracks (:data:`cryptfs.format.layout.TRACKED_PREFIXES`) are queued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[str, str, str]] = []

    def copied(self, name: str, store_id: str, ok: bool) -> None:
        if name.startswith(TRACKED_PREFIXES):
            with self._lock:
                self._events.append((name, store_id, "ok" if ok else "pending"))

    def stray(self, name: str, store_id: str) -> None:
        if name.startswith(TRACKED_PREFIXES):
            with self._lock:
                self._events.append((name, store_id, "delete"))

    def record(self, meta: MetaEngine, ledger: Ledger) -> None:
        """Record the queued events: the copies table, and a ``copy@id`` / ``lost@id`` ledger
        entry for each change (caller holds the lock of ``meta``'s connection). Events whose
        records are rolled back are queued again."""
        with self._lock:
            events, self._events = self._events, []
        if not events:
            return
        with meta.transaction():
            for name, sid, st in events:
                if meta.record_copy(name, sid, st) and st != "delete":
                    op = ("copy@" if st == "ok" else "lost@") + sid
                    ledger.append(op, name, 0, b"\0" * 32)
            meta.undo_on_rollback(lambda: self._requeue(events))

    def _requeue(self, events: list[tuple[str, str, str]]) -> None:
        with self._lock:
            self._events[:0] = events


@dataclass(frozen=True)
class Replicas:
    """What levelling the stores works with: the vault's store, its metadata and ledger with
    the lock that serialises their connection (the filesystem's), the copy log, and where a
    local copy of an object may be (the staging area or cache)."""

    store: ObjectStore
    meta: MetaEngine
    ledger: Ledger
    lock: threading.RLock
    copies: CopyLog
    local_copy: Callable[[ChunkRef], bytes | None]

    def flush(self) -> None:
        """Record the queued copy events now."""
        with self.lock:
            self.copies.record(self.meta, self.ledger)

    def member(self, store_id: str) -> Member | None:
        return next((m for m in self.store.members if m.id == store_id), None)


def _everywhere(store: ObjectStore, name: str) -> bool:
    """Whether every member should hold ``name`` (the policy ``copies`` = all)."""
    return len(store.targets(name)) >= len(store.members)


def expected_holders(store: ObjectStore, name: str, recorded: dict[str, str]) -> dict[str, str]:
    """``{store id: 'ok' | 'pending'}`` object ``name`` should have: with ``copies`` = all every
    store (an unrecorded one counts as pending), otherwise the recorded ones."""
    if _everywhere(store, name):
        return {m.id: recorded.get(m.id, "pending") for m in store.members}
    ids = {m.id for m in store.members}
    return {sid: st for sid, st in recorded.items() if sid in ids}


def copy_one(r: Replicas, ref: ChunkRef, m: Member) -> bool:
    """Copy ``ref`` to member ``m`` from a good copy; True on success (recorded as an event)."""
    blob = r.local_copy(ref)
    if blob is None:
        others = sorted((x for x in r.store.members if x is not m),
                        key=lambda x: (x.down(), x.latency))
        for src in others:
            try:
                got = src.call(lambda src=src: src.store.get(ref.name, ref.size))
            except CryptfsError:
                continue
            if ref.matches(got):
                blob = got
                break
    if blob is None:
        log.warning("no good copy of %s is reachable to copy to store %s", ref.name, m.id)
        return False
    try:
        m.call(lambda: m.store.put(ref.name, blob))
    except StoreError:
        return False
    r.copies.copied(ref.name, m.id, True)
    return True


def copy_pending(
    r: Replicas,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    probe_down: bool = True,
    workers: int = 8,
) -> tuple[int, int]:
    """Make the pending copies (all of them, in batches); returns (copied, failed). Members
    believed down get one probe per call; if it fails their copies wait for the next call."""
    if not r.store.members:
        return 0, 0
    _delete_strays(r, probe_down)
    with r.lock:
        todo = r.meta.pending_copies(limit=1 << 30)
    if not todo:
        return 0, 0
    copied = failed = 0
    skip: set[str] = set()
    for sid in {sid for _r, sid in todo}:
        m = r.member(sid)
        if m is None:
            with r.lock, r.meta.transaction():
                r.meta.forget_store_copies(sid)  # a store that was removed
            skip.add(sid)
        elif m.down() and not probe_down:
            skip.add(sid)
    todo = [(ref, sid) for ref, sid in todo if sid not in skip]
    lock = threading.Lock()
    dead: set[str] = set()

    def one(item: tuple[ChunkRef, str]) -> None:
        nonlocal copied, failed
        ref, sid = item
        m = r.member(sid)
        ok = False
        if m is not None and sid not in dead and not (stop is not None and stop.is_set()):
            ok = copy_one(r, ref, m)
            if not ok and m.down():
                dead.add(sid)  # one failure is enough: the rest wait for the next pass
        with lock:
            copied += ok
            failed += not ok
            if progress is not None:
                progress(copied + failed, len(todo))

    for i in range(0, len(todo), 512):
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, todo[i : i + 512]))
        r.flush()
        if stop is not None and stop.is_set():
            break
    if copied:
        log.info("replicated %d pending copies (%d still pending)", copied, failed)
    return copied, failed


def _delete_strays(r: Replicas, probe_down: bool) -> None:
    """Delete the copies a store kept because it was down when their object was deleted."""
    with r.lock:
        todo = r.meta.pending_deletes()
    dead: set[str] = set()
    for name, sid in todo:
        m = r.member(sid)
        if m is not None and (sid in dead or (m.down() and not probe_down)):
            continue
        with r.lock:
            if r.meta.copies_of(name).get(sid) != "delete":
                continue  # stored again since
        if m is not None:
            try:
                m.call(lambda m=m, name=name: m.store.delete(name))
            except StoreError:
                dead.add(sid)
                continue
        with r.lock, r.meta.transaction():
            if r.meta.copies_of(name).get(sid) == "delete":
                r.meta.forget_copy(name, sid)


@dataclass
class Survey:
    """What :func:`survey` found, per store."""

    unreachable: dict[str, str] = field(default_factory=dict)  # store id -> error
    missing: list[tuple[ChunkRef, str]] = field(default_factory=list)  # (object, store id)
    corrupt: list[tuple[ChunkRef, str]] = field(default_factory=list)
    stray: list[tuple[str, str]] = field(default_factory=list)  # (name, store id)
    checked: int = 0
    downloaded: int = 0


def survey(
    r: Replicas,
    full: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 16,
) -> Survey:
    """Check every copy every store should hold against the metadata: listed with the right
    size, and with ``full`` downloaded and matching the recorded hash."""
    store = r.store
    out = Survey()
    if not store.members:
        return out
    with r.lock:  # (a pack member is no object of its own: its pack has the copies)
        rows = [row for row in r.meta.all_objects() if row[0].pack is None]
        recorded = r.meta.all_copies()
    listings: dict[str, dict[str, int]] = {}
    for m in store.members:
        try:
            listings[m.id] = dict(m.call(lambda m=m: list(m.store.list(""))))
        except StoreError as e:
            out.unreachable[m.id] = e.line()
    known = set()
    todo: list[tuple[ChunkRef, Member]] = []
    for ref, refcount, state in rows:
        known.add(ref.name)
        if state == "staged" or (refcount <= 0 and ref.name.startswith("data/")):
            continue
        holders = expected_holders(store, ref.name, recorded.get(ref.name, {}))
        targets = store.targets(ref.name)
        for m in targets + list(store.members):  # too few copies (a store removed)
            if len(holders) >= len(targets):
                break
            holders.setdefault(m.id, "pending")
        for sid in holders:
            m = r.member(sid)
            if m is None or sid not in listings:
                continue
            out.checked += 1
            size = listings[sid].get(ref.name)
            if size is None:
                out.missing.append((ref, sid))
            elif size != ref.size:
                out.corrupt.append((ref, sid))
            elif full:
                todo.append((ref, m))
    for sid, names in listings.items():
        for name in names:
            if name not in known and name not in PER_STORE:
                out.stray.append((name, sid))
    lock = threading.Lock()

    def fetch(item: tuple[ChunkRef, Member]) -> None:
        ref, m = item
        try:
            good = ref.matches(m.call(lambda: m.store.get(ref.name, ref.size)))
        except CryptfsError:
            good = False
        with lock:
            out.downloaded += 1
            if not good:
                out.corrupt.append((ref, m.id))
            if progress is not None:
                progress(out.downloaded, len(todo))

    if todo:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fetch, todo))
    return out


def mark_pending(r: Replicas, found: list[tuple[ChunkRef, str]]) -> None:
    """Record copies a survey found missing or corrupt as pending (with a ``lost@`` entry),
    of the objects the metadata still knows: one collected since the survey listed the stores
    (its delete may have reached one store before the listing, the other after) needs no copy,
    and a pending record would outlive its object's (they go together when it is dropped)."""
    with r.lock:
        for ref, sid in found:
            if r.meta.get_object(ref.name) is not None:
                r.copies.copied(ref.name, sid, False)
        r.flush()


def adopt(r: Replicas) -> int:
    """Objects stored before the vault had several stores have no copy records: record the
    stores that list them as holders. Returns the number of objects adopted."""
    store = r.store
    if not store.members:
        return 0
    with r.lock:
        rows = [row for row in r.meta.all_objects() if row[0].pack is None]
        recorded = r.meta.all_copies()
    bare = [ref for ref, _rc, state in rows if ref.name not in recorded and state == "stored"]
    if not bare:
        return 0
    for m in store.members:
        try:
            listed = dict(m.call(lambda m=m: list(m.store.list(""))))
        except StoreError:
            continue
        for ref in bare:
            if listed.get(ref.name) == ref.size:
                r.copies.copied(ref.name, m.id, True)
    r.flush()
    return len(bare)
