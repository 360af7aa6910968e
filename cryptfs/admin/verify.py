"""``cryptfs verify``: check the ledger chain and anchors, and every object against metadata.

Read-only unless ``accept`` is given. Each problem is one line that names the affected file
paths; the result says whether the vault is clean.

Longer than ~400 lines: one check per kind of damage (objects, chunk maps, ledger, anchors,
replicas), each with its one-line report; split, they would share all their state.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptfs.errors import CryptfsError, IntegrityError, StoreError
from cryptfs.format.codec import ChunkRef
from cryptfs.format.layout import (
    CHECKPOINT_PREFIX,
    CONFIG,
    DATA_PREFIX,
    LEASE,
    META_PREFIX,
    PACK_PREFIX,
    PER_STORE,
    SNAPSHOT_PREFIX,
    STORE_ID,
    TRACKED_PREFIXES,
    log_name,
    log_seq,
)
from cryptfs.vault.checkpoints import open_checkpoint, read_checkpoints
from cryptfs.vault.core import Vault
from cryptfs.vault.fsynclog import read_log
from cryptfs.vault.lease import check_lease
from cryptfs.vault.snapshots import open_snapshot
from cryptfs.vault.storelist import read_store_id

_REJECTED = re.compile(r"^checkpoint (\S+): rejected")
_BROKEN_AT = re.compile(r"chain broken at sequence (\d+) \(")


@dataclass
class Problem:
    kind: str
    message: str
    object: str = ""
    paths: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f" (files: {', '.join(self.paths)})" if self.paths else ""
        return f"{self.kind}: {self.message}{where}"

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "message": self.message,
            "object": self.object,
            "paths": self.paths,
        }


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    ledger_entries: int = 0
    objects_checked: int = 0
    objects_downloaded: int = 0
    store_objects: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "clean" if self.clean else f"{len(self.problems)} problem(s)"
        return (
            f"verify: {state} - {self.ledger_entries} ledger entries, "
            f"{self.objects_checked} objects checked, {self.objects_downloaded} downloaded "
            f"and authenticated, {self.store_objects} objects in the store"
        )


class Progress:
    """A one-line progress bar on a terminal (stderr); silent in a pipe."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._lock = threading.Lock()

    def step(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.enabled and (self.done % 50 == 0 or self.done >= self.total):
                pct = 100 * self.done // self.total
                bar = "#" * (pct // 4)
                sys.stderr.write(f"\r{self.label} [{bar:<25}] {self.done}/{self.total} ")
                sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def verify(
    vault: Vault, full: bool = False, workers: int = 16, progress: bool | None = None
) -> Report:
    """Check ``vault`` against its store and ledger (see the module docstring). Runs under the
    filesystem lock, which guards the engine's connection: the change-notice thread of a
    shared vault checks the ledger on it meanwhile (without the lock, the two used one
    PostgreSQL connection at once: a ``cryptfs verify`` hung in test_37)."""
    assert vault.fs is not None
    with vault.fs.lock:
        return _verify(vault, full, workers, progress)


def _verify(vault: Vault, full: bool, workers: int, progress: bool | None) -> Report:
    assert vault.meta is not None and vault.ledger is not None
    meta, led = vault.meta, vault.ledger
    rep = Report()

    def paths_for(name: str) -> list[str]:
        return [p for ino in meta.object_users(name) for p in meta.paths_of(ino)]

    rep.ledger_entries = led.count()
    rejected: set[str] = set()
    for msg in vault.anchor_problems():
        kind = "ledger" if msg.startswith("ledger") else "anchor"
        p = Problem(kind, msg.removeprefix("ledger: "))
        m = _REJECTED.match(msg)
        if m:
            p.object = m.group(1)
            rejected.add(p.object)
        m = _BROKEN_AT.search(msg)
        if m:  # name the object and the files of the entry where the chain breaks
            e = led.entry(int(m.group(1)))
            if e is not None:
                p.object = e.name
                p.paths = paths_for(e.name)
        rep.problems.append(p)

    # what the ledger says about each object: its last operation
    last_op: dict[str, tuple[str, int, bytes]] = {}
    for e in led.entries():
        if e.op in ("put", "del"):  # copy@/lost@ entries say where copies are, not what
            last_op[e.name] = (e.op, e.seq, e.sha256)

    in_store = dict(vault.store.list(""))
    rep.store_objects = len(in_store)
    rows = meta.all_objects()
    known = {ref.name for ref, _, _ in rows}
    referenced: list[ChunkRef] = []
    named_packs = {ref.pack for ref, refcount, _st in rows if ref.pack and refcount > 0}
    for ref, refcount, state in rows:
        if state == "staged" and _staged_file(vault, ref.pack or ref.name).exists():
            continue  # not uploaded yet: it is in the staging area
        if ref.name.startswith(DATA_PREFIX) and refcount <= 0:
            continue  # garbage the next checkpoint deletes
        if ref.pack is not None:  # a pack member: its pack has its own row and ledger entry
            rep.objects_checked += 1
            referenced.append(ref)
            size = in_store.get(ref.pack)
            if size is None or size < ref.offset + ref.size:
                why = "is missing from the store" if size is None else \
                    f"has {size} bytes, too few for member {ref.name}"
                rep.problems.append(Problem("missing" if size is None else "changed",
                                            f"pack {ref.pack} {why}", ref.name,
                                            paths_for(ref.name)))
            continue
        # chunks, the metadata snapshot and every checkpoint the metadata still records: the
        # recovery copy must be as sound as the data

        rep.objects_checked += 1
        referenced.append(ref)
        size = in_store.get(ref.name)
        if size is None and ref.name in named_packs:
            pass  # reported above with the files of each member it held
        elif size is None:
            rep.problems.append(
                Problem(
                    "missing",
                    f"object {ref.name} is missing from the store",
                    ref.name,
                    paths_for(ref.name),
                )
            )
        elif size != ref.size:
            rep.problems.append(
                Problem(
                    "changed",
                    f"object {ref.name} has {size} bytes, {ref.size} recorded",
                    ref.name,
                    paths_for(ref.name),
                )
            )
        op = last_op.get(ref.name)
        if ref.name.startswith(CHECKPOINT_PREFIX):
            continue  # stored before its own ledger entry exists; its head MAC vouches for it
        if op is None or op[0] != "put":
            rep.problems.append(
                Problem(
                    "ledger",
                    f"object {ref.name} has no ledger entry",
                    ref.name,
                    paths_for(ref.name),
                )
            )
        elif op[2] != ref.sha256:
            rep.problems.append(
                Problem(
                    "ledger",
                    f"object {ref.name}: its recorded hash differs from ledger entry {op[1]}",
                    ref.name,
                    paths_for(ref.name),
                )
            )

    rep.problems.extend(_per_store_problems(vault))
    # the newest checkpoint's fsync log (docs/FORMAT.md 6.7): each record authenticated (the
    # logs of older checkpoints are left over, deleted with the next checkpoint)
    cks, _ = read_checkpoints(vault.store, vault.codec)
    if cks and log_name(cks[0].seq) in in_store:
        try:
            read_log(vault.store, vault.codec, cks[0])
        except CryptfsError as e:
            rep.problems.append(Problem("corrupt", f"fsync log {log_name(cks[0].seq)}: {e}",
                                        log_name(cks[0].seq)))
    for name in sorted(in_store):
        if name in known or name in PER_STORE:
            continue
        if name in rejected:
            continue  # reported above: a checkpoint that fails authentication
        op = last_op.get(name)
        if op is not None and op[0] == "del":
            rep.problems.append(
                Problem(
                    "replayed",
                    f"object {name} was deleted at ledger "
                    f"sequence {op[1]} but is in the store again",
                    name,
                )
            )
        elif name.startswith(TRACKED_PREFIXES):
            rep.problems.append(
                Problem(
                    "unreferenced", f"object {name} is in the store but nothing references it", name
                )
            )
        elif log_seq(name) is not None:  # an fsync log: the newest checkpoint's, below
            continue
        else:
            rep.problems.append(Problem("unknown", f"object {name} is not a cryptfs object", name))

    replicated = bool(vault.store.members)  # copies on each store, surveyed there
    if replicated:
        _check_copies(vault, rep, full, progress, paths_for)
    if full:
        # every copy's hash was checked by the survey; authenticate the recovery objects too
        todo = [r for r in referenced if (r.pack or r.name) in in_store
                and not (replicated and r.name.startswith(DATA_PREFIX))]
        bar = Progress("verify", len(todo), progress)
        lock = threading.Lock()

        def check(ref: ChunkRef) -> None:
            try:
                blob = vault.store.get(ref.name, ref.size) if ref.pack is None else \
                    vault.store.get_range(ref.pack, ref.offset, ref.size, None)
                _authenticate(vault, ref, blob)
            except CryptfsError as e:
                with lock:
                    rep.problems.append(Problem("corrupt", str(e), ref.name, []))
            finally:
                with lock:
                    rep.objects_downloaded += 1
                bar.step()

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(check, todo))
        bar.finish()
        for p in rep.problems:
            if p.kind == "corrupt" and not p.paths:
                p.paths = paths_for(p.object)
    return rep


def _authenticate(vault: Vault, ref: ChunkRef, blob: bytes) -> None:
    """Raise a CryptfsError naming the object unless ``blob`` is the recorded object and opens
    as what its name says it is (chunk, metadata snapshot or checkpoint)."""
    if len(blob) != ref.size or not ref.matches(blob):
        raise CryptfsError(f"object {ref.name} does not match its recorded hash")
    if ref.name.startswith(DATA_PREFIX):
        vault.codec.open_chunk_unchecked(ref.name, blob)
    elif ref.name.startswith(META_PREFIX):
        vault.codec.open_blob(b"meta", ref.name, blob)
    elif ref.name.startswith(SNAPSHOT_PREFIX):
        open_snapshot(vault.codec, ref.name, blob)
    elif ref.name.startswith(PACK_PREFIX):
        vault.codec.pack_index(ref.name, blob)  # (its members are checked one by one)
    else:
        try:
            open_checkpoint(vault.codec, ref.name, blob)
        except IntegrityError as e:
            raise IntegrityError(f"checkpoint {ref.name}: {e}") from None


def _per_store_problems(vault: Vault) -> list[Problem]:
    """The objects each store has its own of: the lease must be authentic if present, and
    with several stores each must carry its own sealed store id (the config is checked with
    the anchors)."""
    out: list[Problem] = []
    members = vault.store.members
    for m in members:
        try:
            sid = read_store_id(m.store, vault.codec)
        except StoreError:
            continue  # reported as unreachable by the copy survey
        except IntegrityError as e:
            out.append(Problem("store-id", f"store {m.id}: {e}", STORE_ID))
            continue
        if sid != m.id:
            found = "has none" if sid is None else f"claims to be store {sid}"
            out.append(Problem("store-id", f"store {m.id} ({m.url}) {found}: it must carry "
                               "its own sealed store-id object (run 'cryptfs repair')", STORE_ID))
    for store in [m.store for m in members] or [vault.store]:
        try:
            check_lease(store, vault.codec)
        except StoreError:
            continue
        except IntegrityError as e:
            out.append(Problem("lease", f"{e} in {store.url}", LEASE))
    return out


def _check_copies(
    vault: Vault,
    rep: Report,
    full: bool,
    progress: bool | None,
    paths_for: Callable[[str], list[str]],
) -> None:
    """Every copy on every store of a replicated vault (see
    :func:`cryptfs.vault.replicas.survey`)."""
    from cryptfs.vault.replicas import survey

    bar: Progress | None = None

    def step(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress("verify", total, progress)
        bar.step()

    assert vault.replicas is not None
    found = survey(vault.replicas, full=full, progress=step)
    if bar is not None:
        bar.finish()
    rep.objects_downloaded += found.downloaded
    urls = {m.id: m.url for m in vault.store.members}
    for sid, err in found.unreachable.items():
        rep.problems.append(Problem("store", f"store {sid} ({urls[sid]}) is unreachable: {err}"))
    for kind, items, what in (("replica", found.missing, "is missing"),
                              ("corrupt", found.corrupt, "is corrupt")):
        for ref, sid in items:
            rep.problems.append(Problem(
                kind, f"the copy of object {ref.name} on store {sid} {what} "
                "(run 'cryptfs repair')", ref.name, paths_for(ref.name)))


def accept(vault: Vault, say: Callable[[str], None]) -> None:
    """Re-anchor on the local state: make the store match it, record an 'accept' ledger entry
    and write a fresh checkpoint, so the current state becomes the reference for later checks.

    Objects the local state references but the store lacks are uploaded again from the local
    staging area or chunk cache when a copy with the recorded hash is there; cryptfs objects in
    the store that the local state does not know (left by a rollback, by a history that is
    being discarded, or forged) are deleted. Each step is recorded in the ledger."""
    assert vault.ledger is not None and vault.fs is not None and vault.meta is not None
    fs, meta, led = vault.fs, vault.meta, vault.ledger
    if vault.config_problems():  # forged or rolled back: this machine's copy is the truth
        vault.store.put(CONFIG, vault.cfg.to_bytes())
        say(f"verify: wrote this machine's vault config (generation {vault.cfg.generation}) "
            "to the store")
    with fs.lock:
        head = led.head()
        seq = head.seq if head else 0
    for name, size in list(vault.store.list(CHECKPOINT_PREFIX)):
        tail = name[len(CHECKPOINT_PREFIX) :]
        if tail.isdigit() and int(tail) > seq:  # ahead of the ledger being accepted
            vault.store.delete(name)
            with fs.lock:
                led.append("del", name, size, b"\0" * 32)

    in_store = dict(vault.store.list(""))
    with fs.lock:
        rows = meta.all_objects()
    restored, lost = 0, []
    for ref, refcount, state in rows:
        if ref.pack is not None:  # a pack member: the pack must hold it
            if ref.pack in in_store and in_store[ref.pack] >= ref.offset + ref.size:
                continue
            if state != "stored" or refcount <= 0:
                continue
            blob = vault.chunks.member_copy(ref) if vault.chunks is not None else None
            if blob is None:
                lost.append(ref)
                continue
            moved = vault.chunks.repack(ref, blob)  # into a new pack
            with fs.lock, meta.transaction():
                meta.move_to_pack(moved)
            restored += 1
            continue
        if ref.name in in_store:
            continue
        if ref.name.startswith(PACK_PREFIX):
            continue  # its members are stored again above (or lost); it goes once empty
        if not ref.name.startswith(DATA_PREFIX):
            # a snapshot or checkpoint the store lost (the rollback took it): the new
            # checkpoint below supersedes it; forget it
            with fs.lock, meta.transaction():
                meta.forget_object(ref.name)
                led.append("del", ref.name, ref.size, ref.sha256)
            continue
        if state != "stored" or refcount <= 0:
            continue
        blob = _local_copy(vault, ref)
        if blob is None:
            lost.append(ref)
            continue
        vault.store.put(ref.name, blob)
        with fs.lock:
            led.append("put", ref.name, ref.size, ref.sha256)
        restored += 1
    if restored:
        say(f"verify: uploaded {restored} missing object(s) again from the local cache")
    if lost:
        with fs.lock:
            files = sorted(
                {p for r in lost for i in meta.object_users(r.name) for p in meta.paths_of(i)}
            )
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        say(
            f"verify: {len(lost)} object(s) are lost from the store and have no local copy; "
            f"files with lost data: {shown or 'none'}"
        )

    with fs.lock:
        led.append("accept", f"seq-{seq}", 0, b"\0" * 32)
    vault.sync()
    with fs.lock, meta.transaction():  # packs the store lost whose members were stored again
        for ref in meta.empty_packs([r.name for r, _rc, _st in rows
                                     if r.name.startswith(PACK_PREFIX)
                                     and r.name not in in_store]):
            meta.forget_object(ref.name)
            led.append("del", ref.name, ref.size, ref.sha256)

    with fs.lock:
        known = {ref.name for ref, _, _ in meta.all_objects()} | meta.packs_in_use()
    stray = [
        (name, size)
        for name, size in vault.store.list("")
        if name not in known and name.startswith(TRACKED_PREFIXES)
    ]
    for name, size in stray:
        vault.store.delete(name)
        with fs.lock:
            led.append("del", name, size, b"\0" * 32)
    if stray:
        say(
            f"verify: deleted {len(stray)} object(s) in the store that the accepted state "
            "does not reference"
        )
        vault.sync()
    vault.reanchor()  # (a shared database's ledger: this machine's head file follows it)
    say("verify: accepted the current state; a new checkpoint anchors it")


def _staged_file(vault: Vault, name: str) -> Path:
    if vault.chunks is not None:
        return vault.chunks.staged_path(name)
    return vault.paths.staging / name.replace("/", "_")


def _local_copy(vault: Vault, ref: ChunkRef) -> bytes | None:
    """A sealed object from the staging area or the chunk cache, if it has the recorded hash."""
    return vault.chunks.local_copy(ref) if vault.chunks is not None else None
