"""The journal (docs/FORMAT.md 5.3). An fsync on a vault one machine writes leaves a chunk that
changed little dirty and journals the bytes it changed in the metadata, in the commit's
transaction (:meth:`Journal._journal_rows`, called by :meth:`cryptfs.fs.writes.Writes._commit`);
the chunk is sealed later, normally while the file is still open. What a mount left journaled
when it ended without that (a crash, a power loss) is sealed into chunks when the vault is
next opened read-write (:meth:`Journal.replay_journal`), and read in place where nothing may
be written (a read-only mount of that metadata: a snapshot, a restore from the store:
:meth:`Journal._journaled`)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from cryptfs.errors import CryptfsError, IntegrityError
from cryptfs.format.codec import ChunkRef
from cryptfs.fs.base import FileSystemBase, OpenFile, log
from cryptfs.meta.ledger import Entry

# the metadata's state key that a commit with a place in an fsync log marks with it
# ("<checkpoint sequence> <record number>": which records the local metadata holds)
LOG_MARK = "fsync-log"


@dataclass
class Logged:
    """An fsync's commit that wrote nothing but one file's journal rows and chunk map entries
    (chunks it sealed, each a chunk object of its own), its size and times, ledger entries
    (of the objects stored since the last commit), and the mark of its place in an fsync log
    (cryptfs.vault.fsynclog): ``slot`` (checkpoint sequence, record number) that
    ``log_slot()`` gave it, ``rows`` ``(idx, seq, off, sealed)``, ``changes`` the engine's
    change count before and after the commit (what the log's owner checks nothing else was
    written since the record before), ``blocks`` ``(idx, ref or None: a hole)`` in the order
    set; ``entries``: every ledger entry since the checkpoint's head or the record before, in
    order (the log's owner fills them in; the objects they name are durable in the store
    before the record is)."""

    slot: tuple[int, int]
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    rows: list[tuple[int, int, int, bytes]]
    changes: tuple[int, int]
    blocks: list[tuple[int, ChunkRef | None]] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)


class Journal(FileSystemBase):
    """Journal rows written for an fsync; sealed into chunks after a crash, or read in place
    when read-only."""

    def _journals(self, f: OpenFile, idx: int) -> bool:
        """Whether an fsync journals dirty chunk ``idx`` of ``f`` (rather than seal it): on
        a vault one machine writes, one not written whole whose changes span at most
        ``journal_max`` bytes, and whose rows, with the next, hold at most that many."""
        changed = f.changed(idx, self.cs)
        lo, hi = f.fresh.get(idx, (0, self.cs))
        rows = f.row_bytes.get(idx, 0) + hi - lo
        return changed < self.cs and max(changed, rows) <= self.journal_max and \
            not self.meta.shared

    def _journal_rows(self, f: OpenFile) -> tuple[set[int], dict[int, tuple[int, int, bytes]]]:
        """For an fsync of ``f`` (caller holds f.lock): the dirty chunks it journals (they
        stay dirty), and for those changed since their last row, the new row ``(seq, off,
        sealed bytes)`` its commit writes."""
        kept: set[int] = set()
        rows: dict[int, tuple[int, int, bytes]] = {}
        for idx, buf in f.dirty.items():
            if self._journals(f, idx) and idx * self.cs < f.size:
                kept.add(idx)
                lo, hi = f.fresh.get(idx, (0, self.cs))
                hi = min(hi, len(buf))
                if lo < hi:  # (else nothing changed since its last row)
                    seq = f.rows.get(idx, 0)
                    rows[idx] = (seq, lo, self.chunks.codec.seal_journal(
                        f.ino, idx, seq, lo, bytes(buf[lo:hi])))
        return kept, rows

    def _log_mark(self, refs: dict[int, ChunkRef | None],
                  rows: dict[int, tuple[int, int, bytes]]) -> tuple[int, int, int] | None:
        """In an fsync's commit transaction (caller holds the filesystem lock), after its
        chunk map entries, journal rows, inode and ledger entries: if it journals or seals
        something (no chunk in a pack: a pack is stored later), its place in the fsync log
        (``log_slot()``), marked in the metadata, and the engine's change count after the
        mark (the commit is logged only if nothing is written after it); else None."""
        if not refs and not rows or \
                any(r is not None and r.pack is not None for r in refs.values()):
            return None
        slot = self.log_slot()
        if slot is None:
            return None
        self.meta.set_state(LOG_MARK, f"{slot[0]} {slot[1]}")
        return (*slot, self.meta.change_count())

    def _journal_bytes(self, ino: int, idx: int, base: bytes,
                       rows: list[tuple[int, int, bytes]], size: int) -> bytearray:
        """Chunk ``idx`` of file ``ino`` as its journal rows ``(seq, off, sealed)`` make it:
        the chunk the map holds (``base``), then each row in ``seq`` order: zeros up to its
        ``off`` where the chunk is shorter, its bytes from there on; cut at the file's
        ``size``. IntegrityError if a row is not authentic for its place."""
        buf = bytearray(base)
        for seq, off, sealed in sorted(rows):
            data = self.chunks.codec.open_journal(ino, idx, seq, off, sealed)
            buf.extend(bytes(max(0, off - len(buf))))
            buf[off:off + len(data)] = data
        del buf[max(0, size - idx * self.cs):]
        return buf

    def replay_journal(self) -> int:
        """After a crash (a read-write open, before the filesystem is served): each chunk with
        journal rows is sealed with their bytes and committed, which drops them. Rows past
        their file's end, or of a file gone (never expected: those changes drop them), are
        dropped. Returns the chunks sealed. A chunk under rows that cannot be read keeps its
        rows (logged; its reads fail as they would anyway). A row that fails authentication
        (the local database damaged) raises IntegrityError (one line); the rows not replayed
        stay."""
        with self.lock:
            chunks: dict[tuple[int, int], list[tuple[int, int, bytes]]] = {}
            for ino, idx, seq, off, sealed in self.meta.journaled():
                chunks.setdefault((ino, idx), []).append((seq, off, sealed))
        done = 0
        for (ino, idx), rows in chunks.items():
            with self.lock:
                node = self.meta.get_inode(ino)
                if node is None or not stat.S_ISREG(node.mode) or idx * self.cs >= node.size:
                    log.warning("journal rows of inode %d, chunk %d: no such chunk; dropped",
                                ino, idx)
                    with self.meta.transaction():
                        self.meta.remove_blocks_range(ino, idx, idx + 1)
                    continue
                fh = self._open_locked(node, os.O_RDWR)
                f = self.files[ino]
            try:
                with f.lock:
                    try:
                        plain = self._plain(f, idx, journal=False)
                    except OSError:  # (logged: EIO for its reads, as for any lost chunk)
                        log.error("journal rows of inode %d, chunk %d: the chunk under them "
                                  "cannot be read; kept", ino, idx)
                        continue
                    try:
                        f.dirty[idx] = self._journal_bytes(ino, idx, plain, rows, f.size)
                    except IntegrityError as e:
                        raise IntegrityError(
                            f"the metadata journal of inode {ino}, chunk {idx}: {e}",
                            hint="the local metadata database is damaged: move it away to "
                            "rebuild it from the store") from None
                    self._commit(f)
            finally:
                self.release(fh)
            done += 1
        return done

    def _journaled(self, f: OpenFile, idx: int) -> bytes | None:
        """On a read-only mount: chunk ``idx`` of the open file as its journal rows make it,
        or None if it has none. Raises EIO (logged) if a row or the chunk is unreadable."""
        rows = self.journal_rows.get((f.ino, idx))
        if rows is None:
            return None
        if isinstance(rows, bytes):
            return rows
        base = self._plain(f, idx, journal=False)
        try:
            plain = bytes(self._journal_bytes(f.ino, idx, base, rows, f.size))
        except CryptfsError as e:
            raise self._read_failed(f.ino, e) from None
        self.journal_rows[(f.ino, idx)] = plain
        return plain
