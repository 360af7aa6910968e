"""Every object name and prefix in a vault's store, and the most bytes cryptfs reads of each.

This is the one place that names what a store holds (docs/FORMAT.md section 2); gc, verify,
the survey of several stores and crash recovery derive what they keep, check and delete from it.

Every read from a store is bounded before the body is read (see
:meth:`cryptfs.stores.base.ObjectStore.get`): objects whose size the metadata or a checkpoint
records (chunks, metadata snapshots and segments, checkpoints) by that size, the others by the
fixed maxima below. A store that returns something bigger gets an
:class:`~cryptfs.errors.ObjectTooLarge` error naming the
object, never a memory spike.
"""

from __future__ import annotations

CONFIG = "config"  # the vault config (JSON, MAC'd), one per store
LEASE = "lease"  # the sealed mount lease, one per store
STORE_ID = "store-id"  # a store's sealed id, in vaults with several stores
DATA_PREFIX = "data/"  # chunk objects: data/<2 hex>/<64 hex>
META_PREFIX = "meta/"  # sealed metadata snapshots and segments: meta/<32 hex>
CHECKPOINT_PREFIX = "checkpoints/"  # sealed ledger checkpoints: checkpoints/<16 digits>
SNAPSHOT_PREFIX = "snapshots/"  # sealed snapshot pins on a checkpoint: snapshots/<32 hex>
PACK_PREFIX = "packs/"  # short chunk objects of closed files, bundled: packs/<32 hex>
LOG_PREFIX = "logs/"  # fsync logs, appended to, one per checkpoint: logs/<16 digits>

PER_STORE = (CONFIG, LEASE, STORE_ID)  # objects each store has its own of; not in the metadata
# recorded in the metadata (an fsync log is not: its records are authenticated one by one,
# and it is deleted once a newer checkpoint holds what it carried)
TRACKED_PREFIXES = (DATA_PREFIX, META_PREFIX, CHECKPOINT_PREFIX, SNAPSHOT_PREFIX, PACK_PREFIX)

# Fixed bounds for objects whose size nothing records (bytes as stored).
MAX_CONFIG = 256 << 10  # 32 key slots of RSA-4096 take about 40 KiB
MAX_LEASE = 4 << 10  # a sealed JSON document of about 250 bytes
MAX_STORE_ID = 4 << 10  # a sealed JSON document of about 80 bytes
MAX_CHECKPOINT = 64 << 20  # the head plus the ledger entries since its snapshot (~250 B each)
MAX_SNAPSHOT = 4 << 10  # a snapshot pin: a sealed JSON document of about 600 bytes
# An fsync log (docs/FORMAT.md 6.7) takes records while it has at most LOG_TARGET bytes, each
# at most LOG_RECORD_MAX sealed (with its length prefix and its padding); readers accept
# MAX_LOG. Its writer writes zeros LOG_AHEAD bytes ahead of its records (at most to MAX_LOG).
LOG_TARGET = 4 << 20
LOG_RECORD_MAX = 512 << 10
MAX_LOG = LOG_TARGET + LOG_RECORD_MAX
LOG_AHEAD = 1 << 20
# Packs (docs/FORMAT.md 4.3): a closed file's short last chunk, at most PACK_MEMBER_MAX bytes
# sealed, goes into a pack, which is closed once it reaches PACK_TARGET bytes or
# PACK_MAX_MEMBERS members (or is waited for); a pack has at most MAX_PACK bytes, its index at
# most MAX_PACK_INDEX.
PACK_MEMBER_MAX = 128 << 10
PACK_TARGET = 4 << 20
MAX_PACK = PACK_TARGET + PACK_MEMBER_MAX + (1 << 20)
MAX_PACK_INDEX = 1 << 20
PACK_MAX_MEMBERS = 4096  # (their index entries compress to well under MAX_PACK_INDEX)


def checkpoint_name(seq: int) -> str:
    return f"{CHECKPOINT_PREFIX}{seq:016d}"


def checkpoint_seq(name: str) -> int | None:
    """The sequence number a checkpoint object's name carries, or None if it is not one."""
    tail = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(tail) if len(tail) == 16 and tail.isdigit() else None


def log_name(seq: int) -> str:
    """The fsync log of the checkpoint with this sequence number."""
    return f"{LOG_PREFIX}{seq:016d}"


def log_seq(name: str) -> int | None:
    """The checkpoint sequence number an fsync log's name carries, or None if it is not one."""
    tail = name[len(LOG_PREFIX):] if name.startswith(LOG_PREFIX) else ""
    return int(tail) if len(tail) == 16 and tail.isdigit() else None


def snapshot_name(snap_id: str) -> str:
    """The object of the snapshot pin with this id (32 hex digits)."""
    return f"{SNAPSHOT_PREFIX}{snap_id}"


def snapshot_id(name: str) -> str | None:
    """The id a snapshot pin object's name carries, or None if it is not one."""
    tail = name[len(SNAPSHOT_PREFIX):] if name.startswith(SNAPSHOT_PREFIX) else ""
    ok = len(tail) == 32 and all(c in "0123456789abcdef" for c in tail)
    return tail if ok else None


def pack_name(pack_id: str) -> str:
    """The pack object with this id (32 hex digits)."""
    return f"{PACK_PREFIX}{pack_id}"


def kind(name: str) -> str:
    """What an object name is: ``chunk``, ``snapshot`` (a metadata image), ``checkpoint``,
    ``pin`` (a user's snapshot), ``pack``, ``log`` (an fsync log), ``config``, ``lease``,
    ``store-id``, or ``unknown`` (nothing cryptfs writes)."""
    if name.startswith(DATA_PREFIX):
        return "chunk"
    if name.startswith(META_PREFIX):
        return "snapshot"
    if name.startswith(PACK_PREFIX):
        return "pack"
    if checkpoint_seq(name) is not None:
        return "checkpoint"
    if snapshot_id(name) is not None:
        return "pin"
    if log_seq(name) is not None:
        return "log"
    return {CONFIG: "config", LEASE: "lease", STORE_ID: "store-id"}.get(name, "unknown")
