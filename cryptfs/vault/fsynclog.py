"""The fsync log (docs/FORMAT.md 6.7): on a store that appends (a local directory), an fsync whose
commit journaled bytes of one file and wrote nothing else (:class:`cryptfs.fs.journal.Logged`)
is made durable in the store by one record appended to the log of the newest checkpoint,
``logs/<its sequence>``, and one wait on the disk, instead of a checkpoint (a new object, and
the local database's log synced before it).

Contract: when :meth:`FsyncLog.append` returns True the record is durable in the store; the
vault opened from the store alone (:func:`apply_records` after the checkpoint is materialized)
or after a power loss that took the local database's last commits (:func:`replay_log`) holds
the fsync'd bytes. The commit the record repeats was made first (unsynced): the local database
is never ahead of the log without holding the mark of its place (the metadata's ``fsync-log``
state: ``<checkpoint sequence> <record number>``), so replay applies exactly the records after
that mark. A record has its place only when every commit since the checkpoint was
a logged one (the engine's change count tells): applied on that checkpoint's metadata and the
records before it, it gives exactly the metadata its commit left.

The log of a checkpoint takes records while it has at most LOG_TARGET bytes; then (and on any
other change, any store failure) an fsync makes a checkpoint, whose log starts empty, and the
old log is deleted once that checkpoint is durable. A store can withhold the log's last records
(as it can withhold the newest checkpoint): a vault restored from it alone then lacks them; a
machine whose local database holds them keeps them.
"""

from __future__ import annotations

import json
import logging
import struct
import threading

from cryptfs.errors import CryptfsError, IntegrityError, ObjectNotFound, ObjectTooLarge
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.format.layout import (
    LOG_AHEAD,
    LOG_PREFIX,
    LOG_RECORD_MAX,
    LOG_TARGET,
    MAX_LOG,
    log_name,
    log_seq,
)
from cryptfs.fs.journal import LOG_MARK, Logged
from cryptfs.meta.engine import MetaEngine
from cryptfs.meta.ledger import GENESIS, Entry
from cryptfs.stores import ObjectStore
from cryptfs.vault.checkpoints import (
    AHEAD_VERSION,
    LOG_VERSION,
    SEAL_VERSION,
    Checkpoint,
    read_checkpoints,
    ref_json,
    ref_of_json,
)

log = logging.getLogger("cryptfs.vault.fsynclog")

_LEN = struct.Struct(">I")
_RECORD = struct.Struct(">QQqqI")  # ino, size, mtime_ns, ctime_ns, rows
_ROW = struct.Struct(">QQII")  # idx, seq, off, length of the sealed bytes that follow
_NOTHING_SEALED = b'{"blocks":[],"entries":[]}'


def encode(logged: Logged) -> bytes:
    """A record's plaintext (docs/FORMAT.md 6.7; from checkpoint version 5 on: the rows,
    then the chunks it sealed and the ledger entries its commit wrote, as JSON)."""
    parts = [_RECORD.pack(logged.ino, logged.size, logged.mtime_ns, logged.ctime_ns,
                          len(logged.rows))]
    for idx, seq, off, sealed in logged.rows:
        parts += [_ROW.pack(idx, seq, off, len(sealed)), sealed]
    if not logged.blocks and not logged.entries:  # (most records: no JSON encoder)
        parts.append(_NOTHING_SEALED)
        return b"".join(parts)
    sealing = {
        "blocks": [[idx, None if ref is None else ref_json(ref)] for idx, ref in logged.blocks],
        "entries": [e.to_json() for e in logged.entries],
    }
    parts.append(json.dumps(sealing, separators=(",", ":")).encode())
    return b"".join(parts)


def decode(slot: tuple[int, int], plain: bytes, version: int = SEAL_VERSION) -> Logged:
    """A record's plaintext read back (from the log of a checkpoint of ``version``: before
    version 5 the record ends after its rows, from it a JSON document of the chunks it
    sealed and its ledger entries follows); IntegrityError if malformed (it was authentic:
    never expected)."""
    where = f"record {slot[1]} of {log_name(slot[0])}"
    try:
        ino, size, mtime, ctime, count = _RECORD.unpack_from(plain)
        at, rows = _RECORD.size, []
        for _ in range(count):
            idx, seq, off, n = _ROW.unpack_from(plain, at)
            at += _ROW.size
            if at + n > len(plain):
                raise struct.error("a row past the record's end")
            rows.append((idx, seq, off, plain[at:at + n]))
            at += n
    except struct.error as e:
        raise IntegrityError(f"{where} is malformed ({e})") from None
    blocks: list[tuple[int, ChunkRef | None]] = []
    entries: list[Entry] = []
    if version >= SEAL_VERSION:
        try:
            doc = json.loads(plain[at:])
            blocks = [(int(idx), None if ref is None else ref_of_json(ref))
                      for idx, ref in doc["blocks"]]
            entries = [Entry.from_json(e) for e in doc["entries"]]
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{where} is malformed (its sealed chunks: {e})") from None
    elif at != len(plain):
        raise IntegrityError(f"{where} is malformed (bytes after its last row)")
    return Logged(slot, ino, size, mtime, ctime, rows, (0, 0), blocks, entries)


def read_log(store: ObjectStore, codec: Codec, ck: Checkpoint) -> list[Logged]:
    """The records of the log of checkpoint ``ck`` in order (none if it has no log). The
    object is read bounded (MAX_LOG), each record authenticated for its place (the
    checkpoint's number and ledger head, its number in the log) before use; a last record cut
    short or, in a log written ahead with zeros (version 6), torn (:func:`_torn`) is left
    out: its append was not acknowledged (a power loss). IntegrityError (one line) for a
    record that fails, or a log larger than readers accept."""
    seq = ck.seq
    name = log_name(seq)
    try:
        blob = store.get(name, MAX_LOG)
    except ObjectNotFound:
        return []
    except ObjectTooLarge as e:
        raise IntegrityError(f"the fsync log: {e}") from None
    out: list[Logged] = []
    at = 0
    ahead = ck.version >= AHEAD_VERSION
    while at < len(blob):
        if at + _LEN.size > len(blob):
            break  # (a torn length)
        (n,) = _LEN.unpack_from(blob, at)
        if n == 0 and ahead:
            break  # (the zeros written ahead)
        if n > LOG_RECORD_MAX:
            raise IntegrityError(f"record {len(out)} of {name} claims {n} bytes, more than "
                                 f"a record may have ({LOG_RECORD_MAX})")
        if at + _LEN.size + n > len(blob):
            log.info("%s: its last record was cut short (not acknowledged): left out", name)
            break
        slot = (seq, len(out))
        end = at + _LEN.size + n
        try:
            plain = codec.open_log_record(seq, ck.hash, len(out), blob[at + _LEN.size:end])
        except IntegrityError:
            if not ahead or not _torn(blob, at, end):
                raise
            log.info("%s: its last record was torn (not acknowledged): left out", name)
            break
        out.append(decode(slot, plain, ck.version))
        at = end + (-end % 4 if ahead else 0)
    return out


def _torn(blob: bytes, at: int, end: int) -> bool:
    """Whether the frame ``blob[at:end]``, which fails authentication, is an append a power
    loss tore (6.7): nothing but zeros after it (the zeros written ahead), and a 512-byte
    sector of the file where its write did not land (the frame's part of it still zeros).
    A record changed otherwise, or followed by another, is not."""
    if blob.count(0, end) != len(blob) - end:
        return False
    for sector in range(at - at % 512, end, 512):
        lo, hi = max(at, sector), min(end, sector + 512)
        if blob.count(0, lo, hi) == hi - lo:
            return True
    return False


def apply_records(meta: MetaEngine, records: list[Logged]) -> set[int]:
    """Apply records, in order, to metadata holding their checkpoint and the records before
    them (caller holds the engine and commits, and drops any ledger head it cached): its
    ledger entries (continuing the chain), the chunks it sealed (chunk map entries, with
    their reference counts and objects), each file's size and times, its journal rows, and
    the mark. Returns the inodes changed. IntegrityError if a record names a file that is
    not there, or its entries do not continue the ledger (never expected of an authentic log
    over its checkpoint)."""
    changed: set[int] = set()
    for r in records:
        where = f"record {r.slot[1]} of {log_name(r.slot[0])}"
        node = meta.get_inode(r.ino)
        if node is None:
            raise IntegrityError(f"{where} names inode {r.ino}, which its checkpoint does "
                                 "not hold")
        if r.entries:
            newest = meta.ledger_newest(1)
            seq, prev = (newest[0][0], bytes(newest[0][7])) if newest else (0, GENESIS)
            new = []
            for e in r.entries:
                if e.seq <= seq:  # held already (a local database that kept the commit)
                    held = meta.ledger_get(e.seq)
                    if held is None or bytes(held[7]) != e.hash:
                        raise IntegrityError(f"{where}: its ledger entry {e.seq} is not the "
                                             "one the ledger holds")
                    continue
                if not e.follows(seq, prev):
                    raise IntegrityError(f"{where}: its ledger entry {e.seq} does not "
                                         "continue the ledger")
                seq, prev = e.seq, e.hash
                new.append(e.row())
            meta.ledger_insert(new)
        for idx, ref in r.blocks:
            meta.set_block(r.ino, idx, ref, staged=False)
        node.size, node.mtime_ns, node.ctime_ns = r.size, r.mtime_ns, r.ctime_ns
        meta.update_inode(node)
        for idx, seq, off, sealed in r.rows:
            meta.journal_chunk(r.ino, idx, seq, off, sealed)
        meta.set_state(LOG_MARK, f"{r.slot[0]} {r.slot[1]}")
        changed.add(r.ino)
    return changed


def unapplied(lock: threading.RLock, meta: MetaEngine, store: ObjectStore,
              codec: Codec) -> tuple[int, list[Logged]]:
    """The newest checkpoint's sequence and the records of its log after the local metadata's
    mark (none for a checkpoint before version 4, a store that does not append, or metadata
    in a shared database: its fsyncs are never logged)."""
    cks, _ = read_checkpoints(store, codec) if store.appendable and not meta.shared else ([], [])
    if not cks or cks[0].version < LOG_VERSION:
        return 0, []
    newest = cks[0].seq
    with lock:
        mark = (meta.get_state(LOG_MARK) or "").split()
    first = int(mark[1]) + 1 if len(mark) == 2 and mark[0] == str(newest) and \
        mark[1].isdigit() else 0
    return newest, read_log(store, codec, cks[0])[first:]


def replay_log(lock: threading.RLock, meta: MetaEngine, store: ObjectStore,
               codec: Codec) -> set[int]:
    """After a crash (a read-write open): the :func:`unapplied` records, applied and
    committed. Returns the inodes changed."""
    newest, records = unapplied(lock, meta, store, codec)
    if not records:
        return set()
    with lock, meta.transaction():
        changed = apply_records(meta, records)
    log.info("crash recovery: %d fsyncs the local metadata lost applied from %s",
             len(records), log_name(newest))
    return changed


class FsyncLog:
    """The log this mount appends to: that of the last checkpoint it wrote, from when that
    checkpoint is durable (:meth:`restart`) until the next. ``lock`` is the filesystem lock;
    callers of :meth:`append` and :meth:`restart` hold off checkpoints."""

    def __init__(self, store: ObjectStore, codec: Codec, lock: threading.RLock) -> None:
        self.store = store
        self.codec = codec
        self.lock = lock
        self.seq: int | None = None  # the checkpoint whose log takes records (None: none)
        self.head = b""  # its ledger head hash
        self._given = 0  # places handed out (slot), under the filesystem lock
        self._next = 0  # the next record to append
        self._bytes = 0  # where it goes
        self._room = 0  # the object's size (its records and the zeros written ahead)
        self._failed = False  # an append failed: no more records until the next checkpoint
        self._swept = False  # the logs of earlier mounts were deleted

    def slot(self) -> tuple[int, int] | None:
        """The next place in the log, for a commit being made (caller holds the lock)."""
        if self.seq is None or self._failed or self._bytes >= LOG_TARGET:
            return None
        self._given += 1
        return self.seq, self._given - 1

    def fits(self, logged: Logged) -> bool:
        """Whether ``logged`` is the next record (caller holds the lock)."""
        return not self._failed and logged.slot == (self.seq, self._next)

    def append(self, logged: Logged) -> bool:
        """Append the record of ``logged`` (which :meth:`fits`), durably; False if it is too
        big or the store failed (the log then takes no more records: a checkpoint follows).
        Zeros go LOG_AHEAD bytes ahead of the records, written with the record that passes
        the last of them: an append then overwrites them (the disk syncs one write, not a
        file that grew)."""
        seq, n = logged.slot
        sealed = self.codec.seal_log_record(seq, self.head, n, encode(logged))
        frame = _LEN.pack(len(sealed)) + sealed
        frame += bytes(-len(frame) % 4)
        if len(frame) > LOG_RECORD_MAX:  # (so the log stays within MAX_LOG)
            return False
        end = self._bytes + len(frame)
        if end > self._room:
            frame += bytes(min(MAX_LOG, end + LOG_AHEAD) - end)
        try:
            if n == 0:
                self.store.put(log_name(seq), frame)
                self.store.sync()
            else:
                self.store.append(log_name(seq), self._bytes, frame)
        except CryptfsError as e:
            log.warning("fsync log %s: %s; a checkpoint instead", log_name(seq), e)
            self._failed = True
            return False
        self._next += 1
        self._room = max(self._room, self._bytes + len(frame))
        self._bytes = end
        return True

    def restart(self, seq: int | None, head: bytes = b"") -> None:
        """Checkpoint ``seq`` (ledger head hash ``head``) is durable (None: a checkpoint of a
        vault whose store does not append): its log takes the next records; the older logs
        are deleted."""
        with self.lock:
            old, used = self.seq, self._next > 0 or self._failed
            self.seq = seq if self.store.appendable else None
            self.head = head
            self._given = self._next = self._bytes = self._room = 0
            self._failed = False
        if not self.store.appendable:
            return
        if not self._swept:  # (those earlier mounts left; and the restored one)
            stale = [name for name, _ in self.store.list(LOG_PREFIX)
                     if (log_seq(name) or 0) < (seq or 0)]
            self._swept = True
        else:
            stale = [log_name(old)] if used and old is not None else []
        for name in stale:
            try:
                self.store.delete(name)
            except CryptfsError as e:
                log.warning("cannot delete the old fsync log %s: %s", name, e)
