"""``cryptfs gc``: delete store objects that nothing references.

Normal operation deletes what it stops using at each checkpoint; objects can still be left
behind by a crash between an upload and the commit that would reference it, by an interrupted
deletion, or by something else writing into the store. ``gc`` opens the vault read-write (so it
holds the vault lock and the mount lease, and refuses when the local state disagrees with the
store's anchors: a stale database must never decide what is garbage), lists the store and
deletes every object that the local metadata does not record and no snapshot holds
(:mod:`cryptfs.vault.snapshots`), except the objects each store has
its own of (``config``, ``lease``, ``store-id``: :data:`cryptfs.format.layout.PER_STORE`) and except
objects younger than a grace period (default one hour): an upload of another process
is invisible to this one until it is committed. On a vault other machines have mounted (a
PostgreSQL one), also nothing written after the oldest *deletion horizon* their live sessions
published (each mount's heartbeat publishes the start of its oldest write not committed yet,
:meth:`cryptfs.chunks.chunkstore.ChunkStore.horizon`), less CLOCK_SKEW: their uploads in
flight stay, however long a file stays open, whatever the grace period. There each object is
first recorded as deleted (a tombstone row, committed; none if a row for it appeared meanwhile:
then it stays), so a machine whose write stored that content before the deletion and commits
after it stores it again (``PgMetaStore.bury_object``). Each deletion is a
``del`` ledger entry (size as listed, SHA-256 field all zero: the bytes were never recorded),
anchored by a checkpoint when the vault is closed.

Packs (docs/FORMAT.md 4.3): a pack whose recorded members take less than REPACK_BELOW of it
(the others' files deleted) is repacked: its members are copied into new packs, their rows
point there, a checkpoint naming the new places is stored, then the old pack is deleted (not
one a snapshot holds: that snapshot's metadata names the old places).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptfs.errors import CryptfsError, IntegrityError, StoreError
from cryptfs.format.layout import PACK_PREFIX, PER_STORE, SNAPSHOT_PREFIX, log_seq

DEFAULT_GRACE = 3600.0
REPACK_BELOW = 0.5
# how far the clocks of the machines and of the store may disagree (see the horizon)
CLOCK_SKEW = 60.0
ZERO_HASH = b"\0" * 32


@dataclass
class Candidate:
    name: str
    size: int
    age: float | None  # seconds; None if the store cannot tell


@dataclass
class GcReport:
    eligible: list[Candidate] = field(default_factory=list)
    too_new: list[Candidate] = field(default_factory=list)
    deleted: list[Candidate] = field(default_factory=list)
    failed: list[tuple[Candidate, str]] = field(default_factory=list)
    scanned: int = 0
    repacked: int = 0


def list_with_age(store: Any) -> Iterator[tuple[str, int, float | None]]:
    """(name, size, age in seconds) of every object in the store."""
    now = time.time()
    for name, size, mtime in store.list_aged(""):
        yield name, size, now - mtime


def find_garbage(vault: Any, grace: float) -> GcReport:
    """Unreferenced objects, split into those old enough to delete and those too new."""
    assert vault.meta is not None and vault.fs is not None
    if vault.warnings:
        raise IntegrityError(
            f"not collecting garbage: {vault.warnings[0]}",
            hint="run 'cryptfs verify' and resolve that first",
        )
    with vault.fs.lock:
        # other machines' horizons first: what they wrote before is recorded by now
        horizon = min(vault.meta.session_horizons(), default=None)
        known = {ref.name for ref, _, _ in vault.meta.all_objects()}
        known |= vault.meta.packs_in_use()  # (a pack's own row may be unwritten yet)
    if horizon is not None:
        horizon -= CLOCK_SKEW
    # everything a snapshot holds stays, whether or not the live metadata records it
    try:
        known |= vault.pins.held([n for n in known if n.startswith(SNAPSHOT_PREFIX)])
    except CryptfsError as e:
        raise IntegrityError(f"not collecting garbage: what the snapshots hold is unknown "
                             f"({e})", hint="see 'cryptfs snapshot list'") from None
    rep = GcReport()
    for name, size, age in list_with_age(vault.store):
        rep.scanned += 1
        if name in known or name in PER_STORE or log_seq(name) is not None:
            continue  # (an fsync log goes once a newer checkpoint holds what it carried)
        c = Candidate(name, size, age)
        after = horizon is not None and (age is None or time.time() - age >= horizon)
        if not after and (grace <= 0 or (age is not None and age >= grace)):
            rep.eligible.append(c)
        else:
            rep.too_new.append(c)
    return rep


def collect(vault: Any, rep: GcReport, progress: bool | None = None) -> None:
    """Delete the eligible objects, each recorded as a ``del`` ledger entry."""
    assert vault.ledger is not None and vault.fs is not None
    show = sys.stderr.isatty() if progress is None else progress
    total = len(rep.eligible)
    done_bytes = 0
    meta = vault.meta
    for i, c in enumerate(rep.eligible, 1):
        if meta.shared:  # the tombstone first: a commit referencing it then stores it again
            with vault.fs.lock:
                if not meta.atomically(lambda c=c: meta.bury_object(c.name, c.size)):
                    rep.too_new.append(c)  # recorded meanwhile: not garbage
                    continue
        try:
            vault.store.delete(c.name)
        except StoreError as e:
            rep.failed.append((c, e.line()))
            continue
        with vault.fs.lock:
            vault.ledger.append("del", c.name, c.size, ZERO_HASH)
        rep.deleted.append(c)
        done_bytes += c.size
        if show and (i % 20 == 0 or i == total):
            sys.stderr.write(f"\rgc: deleted {i}/{total} objects, {done_bytes / 1e6:.1f} MB ")
            sys.stderr.flush()
    if show and total:
        sys.stderr.write("\n")
    if meta.shared:
        with vault.fs.lock:
            meta.drop_tombstones()


def run_gc(
    vault: Any, grace: float, dry_run: bool, say: Callable[[str], None]
) -> GcReport:
    rep = find_garbage(vault, grace)
    size = sum(c.size for c in rep.eligible)
    if dry_run:
        for c in rep.eligible:
            say(f"would delete {c.name} ({c.size} bytes{_age(c)})")
        for c in rep.too_new:
            say(f"keeping {c.name} ({c.size} bytes{_age(c)}): younger than the grace period "
                "or than another machine's horizon")
        say(f"gc: dry run - {len(rep.eligible)} unreferenced objects ({size} bytes) would be "
            f"deleted, {len(rep.too_new)} kept as too new, {rep.scanned} objects in the store")
        return rep
    collect(vault, rep)
    rep.repacked, freed_packs = repack(vault)
    if rep.repacked:
        say(f"gc: repacked {rep.repacked} mostly deleted pack(s), {freed_packs} bytes freed")
    for c, why in rep.failed:
        say(f"could not delete {c.name}: {why}")
    freed = sum(c.size for c in rep.deleted)
    say(f"gc: deleted {len(rep.deleted)} unreferenced objects ({freed} bytes), "
        f"{len(rep.too_new)} kept as younger than the grace period or another machine's "
        "horizon, "
        f"{len(rep.failed)} failed, {rep.scanned} objects in the store")
    return rep


def repack(vault: Any) -> tuple[int, int]:
    """Repack the packs whose members take less than REPACK_BELOW of them (see the module
    doc). Returns (packs repacked, bytes freed)."""
    meta, chunks, fs = vault.meta, vault.chunks, vault.fs
    if chunks is None or not chunks.packing:
        return 0, 0
    with fs.lock:
        plan = []
        for p in meta.objects_named(PACK_PREFIX):
            members = meta.pack_members(p.name)
            if sum(m.size for m in members) < p.size * REPACK_BELOW:
                plan.append((p, members))
        pins = [r.name for r in meta.objects_named(SNAPSHOT_PREFIX)]
    if not plan:
        return 0, 0
    try:
        held = vault.pins.held(pins)
    except CryptfsError as e:
        raise IntegrityError(f"not repacking: what the snapshots hold is unknown ({e})",
                             hint="see 'cryptfs snapshot list'") from None
    plan = [(p, ms) for p, ms in plan if p.name not in held]
    for p, members in plan:
        for m in members:
            blob = vault.store.get_range(p.name, m.offset, m.size, None)
            if not m.matches(blob):
                raise IntegrityError(f"object {m.name} in pack {p.name} does not match its "
                                     "recorded hash", hint="run 'cryptfs verify'")
            ref = chunks.repack(m, blob)
            with fs.lock, meta.transaction():
                meta.move_to_pack(ref)
    chunks.wait_uploaded()
    vault.sync()  # a checkpoint naming the new places, before the old packs go (its collection
    with fs.lock:  # may delete them already)
        empty = meta.empty_packs([p.name for p, _ in plan])
    for p in empty:
        vault.store.delete(p.name)
        with fs.lock, meta.transaction():
            meta.forget_object(p.name)
            vault.ledger.append("del", p.name, p.size, p.sha256)
    with fs.lock:
        left = {r.name for r in meta.objects_named(PACK_PREFIX)}
    gone = [p for p, _ in plan if p.name not in left]
    return len(gone), sum(p.size for p in gone)


def _age(c: Candidate) -> str:
    if c.age is None:
        return ", age unknown"
    return f", {c.age:.0f} s old"
