"""Bringing the stores of a replicated vault level: pending copies, back-fill and repair.

The copies table (metadata) says, for each object, which stores hold a good copy ('ok') and which
should but do not yet ('pending'); the ledger has a ``copy@id`` or ``lost@id`` entry for each
change. :func:`copy_pending` makes pending copies from a good one (the local staging area or
cache, or another store, checked against the recorded hash); the mount runs it in the
background, ``cryptfs repair`` and ``cryptfs store add`` in the foreground with progress.
:func:`survey` lists every store and finds copies that are missing, the wrong size or (with
``full``) corrupt, and objects a store keeps that nothing references.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cryptfs.codec import ChunkRef
from cryptfs.errors import CryptfsError, StoreError
from cryptfs.layout import PER_STORE
from cryptfs.stores.replicated import Member, ReplicatedStore

log = logging.getLogger("cryptfs.replicas")



def expected_holders(store: ReplicatedStore, recorded: dict[str, str]) -> dict[str, str]:
    """``{store id: 'ok' | 'pending'}`` an object should have: with ``copies`` = all every
    store (an unrecorded one counts as pending), otherwise the recorded ones."""
    if store.copies >= len(store.members):
        return {m.id: recorded.get(m.id, "pending") for m in store.members}
    return {sid: st for sid, st in recorded.items() if store.member(sid) is not None}


def copy_one(vault, ref: ChunkRef, m: Member) -> bool:  # type: ignore[no-untyped-def]
    """Copy ``ref`` to member ``m`` from a good copy; True on success (recorded as an event)."""
    store = vault.store
    assert isinstance(store, ReplicatedStore)
    blob = vault.chunks.local_copy(ref) if vault.chunks is not None else None
    if blob is None:
        others = [x for x in store.read_order() if x is not m]
        for src in others:
            try:
                got = src.call(lambda src=src: src.store.get(ref.name, ref.size))
            except CryptfsError:
                continue
            assert isinstance(got, bytes)
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
    vault._on_copy(ref.name, m.id, True)
    return True


def copy_pending(
    vault,  # type: ignore[no-untyped-def]
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    probe_down: bool = True,
    workers: int = 8,
) -> tuple[int, int]:
    """Make the pending copies (all of them, in batches); returns (copied, failed). Members
    believed down get one probe per call; if it fails their copies wait for the next call."""
    store = vault.store
    if not isinstance(store, ReplicatedStore):
        return 0, 0
    _delete_strays(vault, store, probe_down)
    with vault.fs.lock:
        todo = vault.meta.pending_copies(limit=1 << 30)
    if not todo:
        return 0, 0
    copied = failed = 0
    skip: set[str] = set()
    for sid in {sid for _r, sid in todo}:
        m = store.member(sid)
        if m is None:
            with vault.fs.lock, vault.meta.transaction():
                vault.meta.forget_store_copies(sid)  # a store that was removed
            skip.add(sid)
        elif m.down() and not probe_down:
            skip.add(sid)
    todo = [(r, sid) for r, sid in todo if sid not in skip]
    lock = threading.Lock()
    dead: set[str] = set()

    def one(item: tuple[ChunkRef, str]) -> None:
        nonlocal copied, failed
        ref, sid = item
        m = store.member(sid)
        ok = False
        if m is not None and sid not in dead and not (stop is not None and stop.is_set()):
            ok = copy_one(vault, ref, m)
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
        vault.flush_copies()
        if stop is not None and stop.is_set():
            break
    if copied:
        log.info("replicated %d pending copies (%d still pending)", copied, failed)
    return copied, failed


def _delete_strays(vault, store: ReplicatedStore, probe_down: bool) -> None:  # type: ignore[no-untyped-def]
    """Delete the copies a store kept because it was down when their object was deleted."""
    with vault.fs.lock:
        todo = vault.meta.pending_deletes()
    dead: set[str] = set()
    for name, sid in todo:
        m = store.member(sid)
        if m is not None and (sid in dead or (m.down() and not probe_down)):
            continue
        with vault.fs.lock:
            if vault.meta.copies_of(name).get(sid) != "delete":
                continue  # stored again since
        if m is not None:
            try:
                m.call(lambda m=m, name=name: m.store.delete(name))
            except StoreError:
                dead.add(sid)
                continue
        with vault.fs.lock, vault.meta.transaction():
            if vault.meta.copies_of(name).get(sid) == "delete":
                vault.meta.forget_copy(name, sid)


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
    vault,  # type: ignore[no-untyped-def]
    full: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 16,
) -> Survey:
    """Check every copy every store should hold against the metadata: listed with the right
    size, and with ``full`` downloaded and matching the recorded hash."""
    store = vault.store
    assert isinstance(store, ReplicatedStore)
    out = Survey()
    with vault.fs.lock:
        rows = vault.meta.all_objects()
        recorded = vault.meta.all_copies()
    listings: dict[str, dict[str, int]] = {}
    for m in store.members:
        try:
            listings[m.id] = dict(m.call(lambda m=m: list(m.store.list(""))))  # type: ignore[arg-type]
        except StoreError as e:
            out.unreachable[m.id] = e.line()
    known = set()
    todo: list[tuple[ChunkRef, Member]] = []
    for ref, refcount, state in rows:
        known.add(ref.name)
        if state == "staged" or (refcount <= 0 and ref.name.startswith("data/")):
            continue
        holders = expected_holders(store, recorded.get(ref.name, {}))
        for m in store.targets(ref.name) + store.members:  # too few copies (a store removed)
            if len(holders) >= store.copies:
                break
            holders.setdefault(m.id, "pending")
        for sid in holders:
            m = store.member(sid)
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
            blob = m.call(lambda: m.store.get(ref.name, ref.size))
            good = isinstance(blob, bytes) and ref.matches(blob)
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


def mark_pending(vault, found: list[tuple[ChunkRef, str]]) -> None:  # type: ignore[no-untyped-def]
    """Record copies a survey found missing or corrupt as pending (with a ``lost@`` entry)."""
    for ref, sid in found:
        vault._on_copy(ref.name, sid, False)
    vault.flush_copies()


def adopt(vault) -> int:  # type: ignore[no-untyped-def]
    """Objects stored before the vault had several stores have no copy records: record the
    stores that list them as holders. Returns the number of objects adopted."""
    store = vault.store
    assert isinstance(store, ReplicatedStore)
    with vault.fs.lock:
        rows = vault.meta.all_objects()
        recorded = vault.meta.all_copies()
    bare = [ref for ref, _rc, state in rows if ref.name not in recorded and state == "stored"]
    if not bare:
        return 0
    for m in store.members:
        try:
            listed = dict(m.call(lambda m=m: list(m.store.list(""))))  # type: ignore[arg-type]
        except StoreError:
            continue
        for ref in bare:
            if listed.get(ref.name) == ref.size:
                vault._on_copy(ref.name, m.id, True)
    vault.flush_copies()
    return len(bare)
