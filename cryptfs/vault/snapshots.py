"""Snapshots: named pins on checkpoints that the vault's collection and ``cryptfs gc`` keep
(issue 17; docs/FORMAT.md 6.5).

A snapshot is one small sealed object, ``snapshots/<32 hex>``, naming a checkpoint (its name,
size and SHA-256, its MAC'd ledger head) and that checkpoint's metadata image. It is recorded
in the metadata and the ledger like every other object. Creating one writes a checkpoint and
pins it: nothing is copied, so it costs one checkpoint and one small object whatever the size
of the vault.

What a snapshot *holds* is every object its checkpoint needs to be read back: the checkpoint,
its metadata image and every chunk a file of that image references
(:func:`cryptfs.vault.restore.objects_held`). The set is derived from the store once per
snapshot (the objects are immutable) and cached under the vault's local state directory,
``pins/<id>.json``; deleting the cache is always safe. The Vault's collection and ``cryptfs gc``
delete nothing a snapshot holds; if a snapshot's set cannot be worked out (the store is
unreachable, a pinned object fails its check), collection deletes nothing that round.

Longer than ~400 lines: the pin format, what pins hold, the operations on a live vault, the
retention policy and opening the past share the pin's reading and checks; splitting them would
spread one object's rules over several modules.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptfs.errors import CryptfsError, IntegrityError, ObjectNotFound, UsageError
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.format.layout import (
    MAX_CHECKPOINT,
    MAX_SNAPSHOT,
    SNAPSHOT_PREFIX,
    snapshot_id,
    snapshot_name,
)
from cryptfs.meta.ledger import check_head_mac
from cryptfs.paths import PastPaths, VaultPaths, private_dir, write_private
from cryptfs.stores import ObjectStore
from cryptfs.vault.checkpoints import Checkpoint, open_checkpoint
from cryptfs.vault.restore import materialize_checkpoint, objects_held

if TYPE_CHECKING:
    from cryptfs.vault.core import Vault

log = logging.getLogger("cryptfs.vault.snapshots")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}$")


@dataclass
class Snapshot:
    """A snapshot pin as stored (FORMAT.md 6.5)."""

    object: str  # snapshots/<id>
    name: str
    time_ns: int
    checkpoint: ChunkRef  # the pinned checkpoint object
    seq: int  # its authenticated ledger head
    hash: bytes
    mac: bytes
    meta: ChunkRef  # the metadata image it names

    @property
    def id(self) -> str:
        return self.object[len(SNAPSHOT_PREFIX):]

    def body(self) -> dict[str, object]:
        return {
            "name": self.name,
            "time_ns": self.time_ns,
            "checkpoint": {"name": self.checkpoint.name, "size": self.checkpoint.size,
                           "sha256": self.checkpoint.sha256.hex()},
            "seq": self.seq,
            "hash": self.hash.hex(),
            "mac": self.mac.hex(),
            "meta": {"name": self.meta.name, "size": self.meta.size,
                     "sha256": self.meta.sha256.hex()},
        }

    def when(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time_ns / 1e9))


def seal_snapshot(codec: Codec, snap: Snapshot) -> bytes:
    return codec.seal_blob(b"snapshot", snap.object, json.dumps(snap.body()).encode())


def open_snapshot(codec: Codec, name: str, blob: bytes) -> Snapshot:
    """Authenticate and parse a snapshot pin; IntegrityError naming it otherwise."""
    if snapshot_id(name) is None:
        raise IntegrityError(f"{name} is not a snapshot object name")
    try:
        b = json.loads(codec.open_blob(b"snapshot", name, blob))
        snap = Snapshot(
            name, str(b["name"]), int(b["time_ns"]),
            ChunkRef(str(b["checkpoint"]["name"]), int(b["checkpoint"]["size"]),
                     bytes.fromhex(b["checkpoint"]["sha256"])),
            int(b["seq"]), bytes.fromhex(b["hash"]), bytes.fromhex(b["mac"]),
            ChunkRef(str(b["meta"]["name"]), int(b["meta"]["size"]),
                     bytes.fromhex(b["meta"]["sha256"])),
        )
    except IntegrityError:
        raise IntegrityError(f"snapshot {name} fails authentication") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"snapshot {name} is malformed") from None
    if not check_head_mac(codec.ledger_key, snap.seq, snap.hash, snap.mac):
        raise IntegrityError(f"snapshot {name}: its head MAC is wrong")
    return snap


class Pins:
    """The snapshots of one vault in one store, and the objects they hold. Thread-safe."""

    def __init__(self, store: ObjectStore, codec: Codec, cache_dir: Path) -> None:
        self.store = store
        self.codec = codec
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._snaps: dict[str, Snapshot] = {}
        self._held: dict[str, dict[str, int]] = {}

    def snapshot(self, obj: str) -> Snapshot:
        """The authenticated pin ``obj`` (IntegrityError / ObjectNotFound otherwise)."""
        with self._lock:
            if obj in self._snaps:
                return self._snaps[obj]
        snap = open_snapshot(self.codec, obj, self.store.get(obj, MAX_SNAPSHOT))
        with self._lock:
            self._snaps[obj] = snap
        return snap

    def listed(self) -> tuple[list[Snapshot], list[str]]:
        """Every authentic snapshot in the store, oldest first, and one line per bad one."""
        good, bad = [], []
        for name, _size in self.store.list(SNAPSHOT_PREFIX):
            try:
                good.append(self.snapshot(name))
            except ObjectNotFound:
                continue
            except IntegrityError as e:
                bad.append(e.line())
        good.sort(key=lambda s: (s.time_ns, s.seq))
        return good, bad

    def checkpoint(self, snap: Snapshot) -> Checkpoint:
        """The checkpoint ``snap`` pins, checked against the pin and authenticated."""
        try:
            blob = self.store.get(snap.checkpoint.name, snap.checkpoint.size)
        except ObjectNotFound:
            raise IntegrityError(f"checkpoint {snap.checkpoint.name} of snapshot "
                                 f"'{snap.name}' is missing from the store") from None
        if not snap.checkpoint.matches(blob):
            raise IntegrityError(f"checkpoint {snap.checkpoint.name} of snapshot '{snap.name}' "
                                 "does not match its recorded hash")
        try:
            ck = open_checkpoint(self.codec, snap.checkpoint.name, blob)
        except IntegrityError as e:
            raise IntegrityError(f"checkpoint {snap.checkpoint.name}: rejected, {e}") from None
        if ck.seq != snap.seq or ck.hash != snap.hash or ck.meta != snap.meta:
            raise IntegrityError(f"checkpoint {ck.name} is not the one snapshot "
                                 f"'{snap.name}' pinned")
        return ck

    def held_by(self, obj: str) -> dict[str, int]:
        """``{name: size}`` of every object snapshot ``obj`` holds (itself included)."""
        with self._lock:
            if obj in self._held:
                return self._held[obj]
        cache = self.cache_dir / f"{obj[len(SNAPSHOT_PREFIX):]}.json"
        held: dict[str, int] | None = None
        try:
            loaded = json.loads(cache.read_bytes())
            if isinstance(loaded, dict) and all(isinstance(v, int) for v in loaded.values()):
                held = loaded
        except (OSError, ValueError):
            pass
        if held is None:
            snap = self.snapshot(obj)
            private_dir(self.cache_dir)
            held = objects_held(self.store, self.codec, self.checkpoint(snap),
                                      self.cache_dir)
            write_private(cache, json.dumps(held).encode())
        held = dict(held)
        held.setdefault(obj, 0)
        with self._lock:
            self._held[obj] = held
        return held

    def held(self, objs: list[str]) -> set[str]:
        """Every object any of the snapshots ``objs`` holds (CryptfsError if one cannot be
        worked out: callers then delete nothing)."""
        out: set[str] = set()
        for obj in objs:
            out.update(self.held_by(obj))
        return out

    def forget(self, obj: str) -> None:
        """Drop what is cached about a deleted snapshot."""
        with self._lock:
            self._snaps.pop(obj, None)
            self._held.pop(obj, None)
        (self.cache_dir / f"{obj[len(SNAPSHOT_PREFIX):]}.json").unlink(missing_ok=True)


# -- operations on an open, writable vault (the mount daemon's, or one opened by the CLI) -------
def recorded(vault: Vault) -> list[ChunkRef]:
    """The snapshot pins the vault's metadata records (by the name index: as cheap in a big
    vault as in a small one)."""
    assert vault.meta is not None and vault.fs is not None
    with vault.fs.lock:
        return vault.meta.objects_named(SNAPSHOT_PREFIX)


def create_snapshot(vault: Vault, name: str | None = None) -> Snapshot:
    """Write a checkpoint of everything committed so far and pin it. Durable when it returns:
    the pin is in the store and recorded in the metadata and ledger (a ``put`` entry), and
    nothing the pinned checkpoint needs is collected from then on."""
    assert vault.meta is not None and vault.fs is not None and vault.ledger is not None
    if vault.readonly or vault.readonly_reason is not None:
        raise UsageError("a read-only mount cannot create snapshots")
    now = time.time_ns()
    name = name or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9))
    if not NAME_RE.match(name) or name.startswith(AUTO_PREFIX):
        raise UsageError(f"invalid snapshot name {name!r}",
                         hint="letters, digits and . _ : + -, at most 100 characters, not "
                         f"starting with '{AUTO_PREFIX}' (the retention policy's)")
    if any(s.name == name for s in (vault.pins.snapshot(r.name) for r in recorded(vault))):
        raise UsageError(f"a snapshot named '{name}' exists already")
    vault.sync()
    with vault.checkpoints_held() as ck_name:  # no collection can drop its image meanwhile
        snap = _pin(vault, ck_name, vault.store.get(ck_name, MAX_CHECKPOINT), name, now)
    try:  # what it holds (its metadata read back: O(files)), worked out here, not by the
        vault.pins.held_by(snap.object)  # collection of some file's fsync after it
    except CryptfsError:
        pass  # (the collection tries again, and deletes nothing while it cannot tell)
    return snap


def _pin(vault: Vault, ck_name: str, blob: bytes, name: str, now: int) -> Snapshot:
    """Pin the checkpoint ``ck_name`` (stored bytes ``blob``; the caller keeps checkpoints
    from running): put the pin, record it and its ``put`` entry."""
    assert vault.meta is not None and vault.fs is not None and vault.ledger is not None
    ck = open_checkpoint(vault.codec, ck_name, blob)
    obj = snapshot_name(crypto.random_bytes(16).hex())
    snap = Snapshot(obj, name, now, ChunkRef(ck_name, len(blob), crypto.sha256(blob)),
                    ck.seq, ck.hash, ck.mac, ck.meta)
    sealed = seal_snapshot(vault.codec, snap)
    vault.store.put(obj, sealed)
    ref = ChunkRef(obj, len(sealed), crypto.sha256(sealed))
    with vault.fs.lock, vault.meta.transaction():
        vault.meta.reference(ref, staged=False)
        vault.ledger.append("put", obj, ref.size, ref.sha256)
    log.info("snapshot '%s' pins %s", name, ck_name)
    return snap


def find(vault: Vault, spec: str) -> Snapshot:
    """The recorded snapshot named ``spec`` (or whose id starts with it). A recorded pin that
    cannot be read (missing, or failing its checks) is found by its id alone, as a stand-in
    named by its id, so that it can be deleted."""
    snaps: list[Snapshot] = []
    for r in recorded(vault):
        try:
            snaps.append(vault.pins.snapshot(r.name))
        except CryptfsError:
            sid = r.name[len(SNAPSHOT_PREFIX):]
            snaps.append(Snapshot(r.name, sid, 0, ChunkRef("", 0, b""), 0, b"", b"",
                                  ChunkRef("", 0, b"")))
    hit = [s for s in snaps if s.name == spec] or \
        [s for s in snaps if len(spec) >= 4 and s.id.startswith(spec)]
    if len(hit) != 1:
        raise UsageError(f"no snapshot '{spec}'" if not hit else f"'{spec}' is ambiguous",
                         hint="see 'cryptfs snapshot list'")
    return hit[0]


def delete_snapshot(vault: Vault, spec: str) -> Snapshot:
    """Delete a snapshot pin (a ``del`` ledger entry) and write a checkpoint, whose collection
    deletes what only that snapshot held. Durable when it returns."""
    assert vault.meta is not None and vault.fs is not None and vault.ledger is not None
    if vault.readonly or vault.readonly_reason is not None:
        raise UsageError("a read-only mount cannot delete snapshots")
    snap = find(vault, spec)
    _unpin(vault, snap)
    vault.sync(collect=True)
    return snap


def _unpin(vault: Vault, snap: Snapshot) -> None:
    assert vault.meta is not None and vault.fs is not None and vault.ledger is not None
    with vault.fs.lock:
        found = vault.meta.get_object(snap.object)
    assert found is not None
    try:
        vault.store.delete(snap.object)
    except ObjectNotFound:
        pass  # gone already (the store lost it): forget it all the same
    with vault.fs.lock, vault.meta.transaction():
        vault.meta.forget_object(snap.object)
        vault.ledger.append("del", snap.object, found[0].size, found[0].sha256)
    vault.pins.forget(snap.object)


# -- the retention policy: automatic snapshots at checkpoints ----------------------------------
AUTO_PREFIX = "auto-"
RULES = ("hourly", "daily", "weekly", "monthly")  # finest first
POLICY_STATE = "snapshot-policy"  # the metadata's state key: JSON {rule: count}


def bucket(rule: str, t_ns: int) -> tuple[int, ...]:
    """The UTC hour, day, ISO week or month ``t_ns`` falls in."""
    tm = time.gmtime(t_ns // 10**9)
    if rule == "hourly":
        return (tm.tm_year, tm.tm_yday, tm.tm_hour)
    if rule == "daily":
        return (tm.tm_year, tm.tm_yday)
    if rule == "weekly":
        import datetime

        iso = datetime.date(tm.tm_year, tm.tm_mon, tm.tm_mday).isocalendar()
        return (iso[0], iso[1])
    return (tm.tm_year, tm.tm_mon)


def retained(times: list[int], policy: dict[str, int]) -> set[int]:
    """Which of the automatic snapshots taken at ``times`` the policy keeps, like restic's
    ``forget --keep-hourly/daily/weekly/monthly``: for each rule with count n, the newest
    snapshot of each of the n newest hours (days, ISO weeks, months) that have one; the union
    over the rules."""
    keep: set[int] = set()
    newest_first = sorted(set(times), reverse=True)
    for rule in RULES:
        n = policy.get(rule, 0)
        seen: set[tuple[int, ...]] = set()
        for t in newest_first:
            if len(seen) >= n:
                break
            b = bucket(rule, t)
            if b not in seen:
                seen.add(b)
                keep.add(t)
    return keep


def due(times: list[int], policy: dict[str, int], now: int) -> bool:
    """Whether a checkpoint at ``now`` gets an automatic snapshot: the first one in each unit
    of the finest rule the policy uses."""
    finest = next((r for r in RULES if policy.get(r, 0) > 0), None)
    if finest is None:
        return False
    return not times or bucket(finest, max(times)) != bucket(finest, now)


def get_policy(vault: Vault) -> dict[str, int]:
    assert vault.meta is not None and vault.fs is not None
    with vault.fs.lock:
        text = vault.meta.get_state(POLICY_STATE)
    try:
        got = json.loads(text) if text else {}
        return {r: int(got[r]) for r in RULES if int(got.get(r, 0)) > 0}
    except (ValueError, TypeError, AttributeError):
        return {}


def set_policy(vault: Vault, policy: dict[str, int]) -> dict[str, int]:
    """Set the vault's retention policy (kept in its metadata, so it travels with the vault);
    an empty one turns automatic snapshots off (existing ones stay)."""
    assert vault.meta is not None and vault.fs is not None
    if vault.readonly or vault.readonly_reason is not None:
        raise UsageError("a read-only mount cannot change the retention policy")
    counts = {r: policy.get(r, 0) or 0 for r in RULES}
    if any(type(n) is not int or not 0 <= n <= 10000 for n in counts.values()):
        raise UsageError("--keep-* counts must be whole numbers from 0 to 10000")
    clean = {r: n for r, n in counts.items() if n > 0}
    with vault.fs.lock:
        vault.meta.set_state(POLICY_STATE, json.dumps(clean))
    return clean


def apply_policy(vault: Vault, ck_name: str, blob: bytes, now: int | None = None) -> None:
    """At a checkpoint (the caller holds off other checkpoints): pin it as an automatic
    snapshot if the policy is due (:func:`due`), then delete the automatic snapshots the policy
    no longer keeps (:func:`retained`). Snapshots created by hand are never touched. A failure
    is logged and retried at the next checkpoint; it never fails the checkpoint."""
    try:
        policy = get_policy(vault)
        if not policy:
            return
        now = time.time_ns() if now is None else now
        autos = [s for s in (vault.pins.snapshot(r.name) for r in recorded(vault))
                 if s.name.startswith(AUTO_PREFIX)]
        if due([s.time_ns for s in autos], policy, now):
            name = AUTO_PREFIX + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9))
            if all(s.name != name for s in autos):
                autos.append(_pin(vault, ck_name, blob, name, now))
        keep = retained([s.time_ns for s in autos], policy)
        for s in autos:
            if s.time_ns not in keep:
                log.info("retention policy: deleting snapshot '%s'", s.name)
                _unpin(vault, s)
    except CryptfsError as e:
        log.warning("retention policy not applied at %s: %s", ck_name, e.line())


@dataclass
class Usage:
    snapshot: Snapshot
    objects: int  # objects it holds
    bytes: int
    only_objects: int  # held by it and by no other snapshot nor the live state
    only_bytes: int


def usage(vault: Vault, keep_checkpoints: int) -> list[Usage]:
    """Every recorded snapshot, oldest first, with what it holds and what it alone holds:
    objects neither another snapshot nor the live state needs (the live files' chunks, the
    newest checkpoint's image, the newest ``keep_checkpoints`` checkpoints), so what deleting
    it frees."""
    assert vault.meta is not None and vault.fs is not None
    with vault.fs.lock:
        rows = vault.meta.all_objects()
    from cryptfs.format.layout import CHECKPOINT_PREFIX, DATA_PREFIX

    cks = sorted((r.name for r, _, _ in rows if r.name.startswith(CHECKPOINT_PREFIX)),
                 reverse=True)
    live = {r.pack or r.name for r, rc, _ in rows if r.name.startswith(DATA_PREFIX) and rc > 0}
    live.update(cks[:keep_checkpoints])
    if cks:
        live.add(open_checkpoint(vault.codec, cks[0],
                                 vault.store.get(cks[0], MAX_CHECKPOINT)).meta.name)
    pins = [r.name for r, _, _ in rows if r.name.startswith(SNAPSHOT_PREFIX)]
    held = {}
    for p in pins:
        try:
            held[p] = vault.pins.held_by(p)
        except CryptfsError as e:
            raise IntegrityError(
                f"snapshot {p[len(SNAPSHOT_PREFIX):]} cannot be read: {e.line()}",
                hint=f"'cryptfs snapshot delete {p[len(SNAPSHOT_PREFIX):]}' drops it; until "
                "then nothing is collected") from None
    sizes = {r.name: r.size for r, _, _ in rows}
    out = []
    for p in pins:
        others: set[str] = set(live)
        for q in pins:
            if q != p:
                others.update(held[q])
        only = [n for n in held[p] if n not in others]
        out.append(Usage(vault.pins.snapshot(p), len(held[p]),
                         sum(sizes.get(n, s) for n, s in held[p].items()),
                         len(only), sum(sizes.get(n, held[p][n]) for n in only)))
    out.sort(key=lambda u: (u.snapshot.time_ns, u.snapshot.seq))
    return out


# -- the past, for --at ----------------------------------------------------------------------
def parse_time(text: str) -> int | None:
    """``YYYY-MM-DD[THH:MM[:SS]][Z]`` (UTC) or ``@SECONDS`` as ns since the epoch, or None if
    ``text`` is not a time."""
    if text.startswith("@"):
        try:
            return int(float(text[1:]) * 1e9)
        except ValueError:
            return None
    t = text.rstrip("Z").replace(" ", "T")
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(t, fmt)) * 10**9
        except ValueError:
            continue
    return None


def resolve_at(pins: Pins, spec: str) -> tuple[Snapshot, Checkpoint]:
    """The snapshot ``spec`` names (its name, an id prefix, or a time: the newest snapshot taken
    at or before it) and its authenticated checkpoint. Reads the store only (the vault may be
    mounted read-write meanwhile)."""
    snaps, bad = pins.listed()
    for line in bad:
        log.warning("%s", line)
    hit = [s for s in snaps if s.name == spec] or \
        [s for s in snaps if len(spec) >= 4 and s.id.startswith(spec)]
    when = parse_time(spec) if not hit else None
    if when is not None:
        hit = [s for s in snaps if s.time_ns <= when + 999_999_999][-1:]
    if len(hit) != 1:
        what = f"at or before {spec}" if when is not None else f"named '{spec}'"
        raise UsageError(f"no snapshot {what}" if not hit else f"'{spec}' is ambiguous",
                         hint="see 'cryptfs snapshot list'")
    return hit[0], pins.checkpoint(hit[0])


def held_or_none(vault: Vault, pins: list[str]) -> set[str] | None:
    """What the snapshots hold, or None (logged once) if that cannot be worked out now."""
    try:
        return vault.pins.held(pins)
    except CryptfsError as e:
        log.warning("not collecting this time: what the snapshots hold is unknown (%s)",
                    e.line())
        return None


def open_past(paths: VaultPaths, master: bytes, spec: str,
              cache_bytes: int) -> tuple[Vault, Snapshot, Checkpoint]:
    """Open the state snapshot ``spec`` pinned (see :func:`resolve_at`) read-only, with local
    state of its own (:class:`~cryptfs.paths.PastPaths`): its metadata materialized from the
    store and checked against the pinned checkpoint's MAC'd ledger head, every chunk checked
    against the SHA-256 that metadata records when read (EIO otherwise), as on a live mount.
    Can run beside the live read-write mount. IntegrityError (one line) if the pinned
    checkpoint or its metadata image fails a check. The caller removes the local state
    directory after closing."""
    from cryptfs.vault.core import Vault
    from cryptfs.vault.localstate import load_local_config

    stores, cfg = load_local_config(paths)
    store = stores.open()
    try:
        codec = Codec(master, cfg.vault_id)
        if not cfg.verify_mac(master):
            raise IntegrityError("the local vault config fails its MAC")
        _sweep_past(paths)
        sub = f"{os.getpid()}-{crypto.random_bytes(4).hex()}"
        past = PastPaths(paths.name, sub)
        private_dir(past.data_dir)
        pins = Pins(store, codec, past.data_dir / "pins")
        snap, ck = resolve_at(pins, spec)
        try:
            materialize_checkpoint(store, codec, ck, past.db).close()
        except CryptfsError:
            shutil.rmtree(past.data_dir, ignore_errors=True)
            raise
        write_private(past.data_dir / "at.json", json.dumps(
            {"snapshot": snap.name, "id": snap.id, "checkpoint": ck.name,
             "time_ns": snap.time_ns}).encode())
    finally:
        store.close()
    log.info("mounting snapshot '%s' (%s, ledger seq %d) read-only", snap.name, ck.name, ck.seq)
    vault = Vault.open(past, master=master, readonly=True, check=False, cache_bytes=cache_bytes)
    return vault, snap, ck


def _sweep_past(paths: VaultPaths) -> None:
    """Remove the local state of past mounts that ended without cleaning up (a crash)."""
    import fcntl

    root = paths.data_dir / "at"
    if not root.is_dir():
        return
    for d in root.iterdir():
        lock = d / "mount.lock"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live past mount
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
