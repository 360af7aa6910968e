"""Crash recovery when a vault is opened read-write: what a crash of the last mount left behind
is repaired before the filesystem is served, and the metadata is marked unclean until the
mount's final checkpoint (``close``) marks it clean again.

Safe because the lease excludes other writers and the anchors agreed before it runs. On a
PostgreSQL vault other machines may be mounted: files they hold open are kept, and objects
the metadata does not know are swept only when no other machine's session is live.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.format.layout import DATA_PREFIX, MAX_CHECKPOINT, META_PREFIX, PACK_PREFIX
from cryptfs.format.vaultconfig import CONFIG_OBJECT, VaultConfig
from cryptfs.fs import FileSystem
from cryptfs.meta.ledger import Ledger
from cryptfs.meta.sqlite import MetaStore
from cryptfs.stores import ObjectStore
from cryptfs.vault.checkpoints import checkpoint_objects, read_checkpoints
from cryptfs.vault.fsynclog import replay_log

if TYPE_CHECKING:
    from cryptfs.meta.postgres import PgMetaStore

log = logging.getLogger("cryptfs.vault.recovery")


def recover(fs: FileSystem, meta: MetaStore | PgMetaStore, ledger: Ledger, chunks: ChunkStore,
            store: ObjectStore, codec: Codec, cfg: VaultConfig) -> list[str]:
    """Repair what a crash left, in this order: the fsyncs a power loss took from the local
    metadata, applied from the store's fsync log (:func:`replay_log`); entries hidden or
    inodes left nameless (files unlinked while open), staged uploads (resumed; stray staged
    files removed), if the last mount did not close cleanly, objects stored but never committed
    (:func:`sweep_orphans`), and chunks journaled but not sealed (``fs.replay_journal``).
    Then record the config generation in the ledger (once per generation) and mark the
    metadata unclean. Returns one line per kind of repair made."""
    done: list[str] = []
    logged = replay_log(fs.lock, meta, store, codec)  # (docs/FORMAT.md 6.7)
    ledger.invalidate()  # (records append ledger entries)
    if logged:
        done.append(f"fsyncs of {len(logged)} files the local metadata lost: applied from "
                    "the store's fsync log")
    dropped = fs.recover()  # files unlinked while open, then a crash
    if dropped:
        done.append(f"{dropped} hidden entries or nameless inodes left by a crash: removed")
    with fs.lock:
        staged = meta.objects_in_state("staged")
    resumed, stray = chunks.resume(staged)
    if resumed:
        log.info("resuming %d staged uploads", resumed)
        done.append(f"{resumed} staged uploads: resumed")
    if stray:
        done.append(f"{stray} stray staged files: removed")
    with fs.lock:  # resumed upload workers use the same connection; with other machines
        # mounted, objects unknown to the metadata may be their uploads in flight
        unclean = meta.get_state("clean") == "0" and not meta.live_sessions()
    if unclean:
        swept = sweep_orphans(fs.lock, meta, ledger, store, codec)
        if swept:
            done.append(f"{swept} objects stored before a crash but never committed: deleted")
    sealed = fs.replay_journal()
    if sealed:
        done.append(f"{sealed} chunks fsync'd but not yet sealed before a crash: sealed from "
                    "the journal")
    for line in done:
        log.info("crash recovery: %s", line)
    record_config(fs.lock, meta, ledger, cfg)
    with fs.lock:
        meta.set_state("clean", "0")  # until close() finishes its checkpoint
    return done


def sweep_orphans(lock: threading.RLock, meta: MetaStore | PgMetaStore, ledger: Ledger,
                  store: ObjectStore, codec: Codec) -> int:
    """After a crash: delete chunk objects and snapshots the metadata does not know (stored
    for data never committed: a file still open, a flush or checkpoint cut short) and adopt
    an authentic checkpoint that was written but not recorded. Returns how many it deleted."""
    with lock:  # (a pack whose own row a crash left unwritten is known by its members)
        known = {r.name for r, _, _ in meta.all_objects()} | meta.packs_in_use()
    # a checkpoint written just before the crash but not recorded: adopt it if authentic
    cks, _forged = read_checkpoints(store, codec, newest_only=False)
    for ck in cks:
        if ck.name not in known:
            blob = store.get(ck.name, MAX_CHECKPOINT)
            ref = ChunkRef(ck.name, len(blob), crypto.sha256(blob))
            with lock, meta.transaction():
                meta.reference(ref, staged=False)
                ledger.append("put", ref.name, ref.size, ref.sha256)
            known.add(ck.name)
    for ck in cks[:1]:  # the newest checkpoint's snapshot and segments: adopt them
        for ref in checkpoint_objects(ck):
            if ref.name not in known:
                with lock, meta.transaction():
                    meta.reference(ref, staged=False)
                known.add(ref.name)
    n = 0
    for prefix in (DATA_PREFIX, META_PREFIX, PACK_PREFIX):
        for name, size in list(store.list(prefix)):
            if name in known:
                continue
            store.delete(name)
            with lock, meta.transaction():
                ledger.append("del", name, size, b"\0" * 32)
            n += 1
    return n


def record_config(lock: threading.RLock, meta: MetaStore | PgMetaStore, ledger: Ledger,
                  cfg: VaultConfig) -> None:
    """Record the config generation in the ledger once (so a rollback of the store's config
    is detected also by a machine that restores the metadata from the store)."""
    with lock:
        recorded = ledger.last_named("config", CONFIG_OBJECT)
        if cfg.generation > (recorded.size if recorded else 0):
            body = cfg.to_bytes()
            with meta.transaction():
                ledger.append("config", CONFIG_OBJECT, cfg.generation, crypto.sha256(body))
