"""Restoring the metadata from the store alone: the newest authentic checkpoint's snapshot,
segments and delta, each checked against the checkpoint, with the ledger entries written since
them and the records of its fsync log (docs/FORMAT.md 8). :func:`materialize` writes any
authentic checkpoint's database to a file."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from cryptfs.errors import IntegrityError, ObjectNotFound, ObjectTooLarge
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.format.layout import CHECKPOINT_PREFIX, MAX_CHECKPOINT, META_PREFIX
from cryptfs.meta.ledger import Ledger
from cryptfs.meta.sqlite import MetaStore, check_schema_version, image_schema_version
from cryptfs.meta.wal import WalError, apply_segment
from cryptfs.paths import VaultPaths, write_private
from cryptfs.stores import ObjectStore
from cryptfs.vault.checkpoints import (
    LOG_VERSION,
    Checkpoint,
    checkpoint_objects,
    read_checkpoints,
)
from cryptfs.vault.fsynclog import apply_records, read_log
from cryptfs.vault.localstate import Head

log = logging.getLogger("cryptfs.vault.restore")


def restore_from_store(paths: VaultPaths, store: ObjectStore, codec: Codec) -> list[str]:
    """Rebuild the local database from the newest authentic checkpoint in the store (a new
    machine, or local state moved away). Returns the problems with other checkpoints (one line
    each); IntegrityError or ConfigError (a newer schema) if nothing can be restored. Nothing is
    left at the database path unless the restore is complete."""
    cks, bad = read_checkpoints(store, codec)
    if not cks:
        raise IntegrityError(
            f"the store {store.url} has no valid checkpoint to restore the metadata from"
        )
    ck = cks[0]
    tmp = paths.db.with_name("metadata.db.restore")
    meta = materialize_newest(store, codec, ck, tmp)
    tail = [e for e in ck.tail if e.seq > ck.image_seq]
    authentic, _ = read_checkpoints(store, codec, newest_only=False)
    with meta.transaction():
        for e in tail:
            if e.op == "del":  # deleted after the snapshot (never a referenced chunk)
                meta.forget_deleted_object(e.name)
                continue
            if e.op != "put":
                continue
            found = meta.get_object(e.name)
            if found is not None:
                meta.mark_stored(e.name)
            elif not e.name.startswith("data/"):
                meta.reference(ChunkRef(e.name, e.size, e.sha256), staged=False)
        # checkpoints written after the snapshot; only authentic ones, so a forged
        # checkpoint never counts among the newest that garbage collection keeps
        for c in authentic:
            if meta.get_object(c.name) is None:
                try:
                    ck_blob = store.get(c.name, MAX_CHECKPOINT)
                except ObjectNotFound:
                    continue
                meta.reference(ChunkRef(c.name, len(ck_blob), crypto.sha256(ck_blob)), False)
        # older snapshots and checkpoints the writer deleted after this checkpoint (its
        # cleanup follows the checkpoint, so the tail does not record it): forget them
        listed = {n for p in (META_PREFIX, CHECKPOINT_PREFIX) for n, _ in store.list(p)}
        needed = {r.name for r in checkpoint_objects(ck)}
        for ref, _rc, _st in meta.all_objects():
            if ref.name.startswith((META_PREFIX, CHECKPOINT_PREFIX)) \
                    and ref.name not in needed and ref.name not in listed:
                meta.forget_object(ref.name)
    meta.sync()
    meta.close()
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    os.rename(tmp, paths.db)
    write_private(
        paths.head, json.dumps(Head(ck.seq, ck.hash, ck.mac, ck.name).to_json()).encode()
    )
    log.info("restored metadata from %s", ck.name)
    return bad


def materialize(store: ObjectStore, codec: Codec, ck: Checkpoint, path: Path) -> None:
    """Write the metadata database an authentic checkpoint names to ``path`` (mode 0600,
    replacing a file there, its ``-wal`` and ``-shm`` removed): its snapshot with its segments
    applied in order, then its delta. Each object is read bounded by the size the checkpoint
    records and checked against its hash before use. Raises IntegrityError (one line naming
    the object) if one is missing, differs or is malformed, ConfigError for a newer schema; on
    failure nothing is left at ``path``."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    objs = checkpoint_objects(ck)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i, ref in enumerate(objs):
            what = "metadata snapshot" if i == 0 else f"metadata segment {i} of {len(objs) - 1}"
            try:
                blob = store.get(ref.name, ref.size)
            except ObjectNotFound:
                raise IntegrityError(
                    f"{what} {ref.name} named by {ck.name} is missing from the store") from None
            except ObjectTooLarge as e:
                raise IntegrityError(f"{what} named by {ck.name}: {e}") from None
            if not ref.matches(blob):
                raise IntegrityError(f"{what} {ref.name} does not match its checkpoint {ck.name}")
            plain = codec.open_blob(b"meta", ref.name, blob)
            if i == 0:
                # the stamp travels in the image: refuse a newer schema before going on
                check_schema_version(image_schema_version(plain),
                                     f"metadata snapshot {ref.name} (from {ck.name})")
                os.write(fd, plain)
                continue
            try:
                apply_segment(fd, plain)
            except WalError as e:
                raise IntegrityError(f"{what} {ref.name} (from {ck.name}): {e}") from None
        if ck.delta is not None:  # authenticated with the checkpoint itself
            try:
                apply_segment(fd, ck.delta)
            except WalError as e:
                raise IntegrityError(f"the metadata delta of {ck.name}: {e}") from None
        check_schema_version(image_schema_version(os.pread(fd, 100, 0)),
                             f"the metadata of {ck.name}")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.chmod(path, 0o600)


def materialize_checkpoint(store: ObjectStore, codec: Codec, ck: Checkpoint,
                           dest: Path) -> MetaStore:
    """Write the metadata as of checkpoint ``ck`` into a new SQLite file ``dest`` (see
    :func:`materialize`) and return it opened, with the checkpoint's ledger entries appended;
    the ledger must end exactly at the checkpoint's MAC'd head. IntegrityError if anything
    fails (``dest`` is then removed), ConfigError for a newer schema. Sets ``ck.image_seq`` to
    the last ledger entry the database itself held. Nothing is durable until the caller
    syncs."""
    materialize(store, codec, ck, dest)
    meta = MetaStore(dest)
    led = Ledger(meta, codec.ledger_key)
    head = led.head()
    ck.image_seq = head.seq if head is not None else 0
    led.add_entries([e for e in ck.tail if e.seq > ck.image_seq])
    last = led.head()
    if last is None or last.seq != ck.seq or last.hash != ck.hash:
        meta.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(dest) + suffix).unlink(missing_ok=True)
        raise IntegrityError(
            f"the ledger in the metadata of {ck.name} does not lead to that checkpoint"
        )
    return meta


def materialize_newest(store: ObjectStore, codec: Codec, ck: Checkpoint,
                       dest: Path) -> MetaStore:
    """:func:`materialize_checkpoint` of the newest checkpoint, with the records of its fsync
    log applied (docs/FORMAT.md 6.7): the vault as its last fsync left it (a snapshot pins a
    checkpoint without the records that came after it). IntegrityError also for a record that
    fails authentication (``dest`` is then removed)."""
    meta = materialize_checkpoint(store, codec, ck, dest)
    try:
        if ck.version >= LOG_VERSION:
            with meta.transaction():
                apply_records(meta, read_log(store, codec, ck))
    except BaseException:
        meta.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(dest) + suffix).unlink(missing_ok=True)
        raise
    return meta


def objects_held(store: ObjectStore, codec: Codec, ck: Checkpoint,
                 workdir: Path) -> dict[str, int]:
    """Every object checkpoint ``ck`` needs to be read back, ``{name: size}``: itself, its
    metadata snapshot and segments, every chunk object its files reference (for a chunk in a
    pack, the pack: docs/FORMAT.md 4.3). Materializes the
    metadata in a scratch file in ``workdir`` (removed again); errors as
    :func:`materialize_checkpoint`."""
    tmp = workdir / f".objects.{os.getpid()}.{threading.get_ident()}.db"
    meta = materialize_checkpoint(store, codec, ck, tmp)
    try:
        rows = [ref for ref, _rc, _st in meta.all_objects()]
        sizes = {ref.name: ref.size for ref in rows}
        pack_of = {ref.name: ref.pack for ref in rows if ref.pack is not None}
        used = {pack_of.get(obj, obj) for _ino, _idx, obj in meta.all_blocks()}
    finally:
        meta.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
    out = {name: sizes.get(name, 0) for name in used}
    for ref in checkpoint_objects(ck):
        out[ref.name] = ref.size
    out[ck.name] = ck.size
    return out
