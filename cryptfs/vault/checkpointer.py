"""Checkpoints: making a vault's committed state durable in its store, and collecting what the
newest checkpoint no longer needs.

Checkpoint contract: when :meth:`Checkpointer.sync` returns, every chunk committed before the
call is in the store, metadata (a snapshot and the segments after it) that references exactly
what the local metadata referenced at that moment is in the store, and a checkpoint naming it
(with the authenticated ledger head) is in the store and recorded in the local ledger (in the
local head file too, at most a second later: HEAD_INTERVAL). A vault can then be opened on a
new machine from the store alone. A checkpoint stores only the metadata changed since the one
before (a segment; past MAX_SEGMENTS, one merged segment replaces them all); while the pages
changed since the last stored segment are few (DELTA_MAX) it stores none: the checkpoint
carries them itself (its delta, docs/FORMAT.md 6.1), its ledger head the newest entry they
hold. The first of a mount, and one whenever the segments grow past a fraction of their
snapshot, stores a full snapshot.

Order of the durability steps of one checkpoint (:meth:`Checkpointer._checkpoint`), in the
round's own thread, in two waits on the disk: the open pack closed and every pack stored, with
its records (docs/FORMAT.md 4.3); the queued ledger entries of stored chunks; the
uploads the metadata references; the metadata (segment or snapshot) put and its ledger entry
committed; first wait: the store synced (chunks and metadata durable), then the local
database's log (so its ledger reaches the checkpoint's head), and the last round's head file
rename; second wait: the checkpoint object and the temp file of the head file naming it
synced together; the temp file renamed into place (made durable by the next round's first
wait, or by :meth:`anchor`); the checkpoint's own ledger entry; the snapshot policy;
collection (not in every round: see COLLECT_INTERVAL). Those last entries are committed, so
they survive a crash of the process; the next round's local sync and head file anchor them
(the final round of a mount anchors them at once: :meth:`finish`). One fsync per file written
and one of the head file's directory: on ext4 and xfs the store's directories need none for
the names put in them (:func:`cryptfs.paths.names_durable_with_files`).
Disk waits of a round that stores one chunk, in that order: the chunk, the segment, the local
log (first wait); the checkpoint (second wait) — a round of an fsync that journaled its bytes
(cryptfs.fs.journal) with its changes inline stores neither chunk nor segment: the local log,
then the checkpoint; and in a round that writes the head file (once
HEAD_INTERVAL passed since one did, and the final round) its temp file in the second wait and
its directory in the next round's first. Each is needed: a checkpoint durable before what it
names could name objects a power loss took, or a ledger head the local log lost (the anchors
would refuse the mount); the head file must never name a checkpoint the store may not have,
nor be torn; on ext4 without a journal (and on any filesystem, by POSIX) a rename is durable
only with its directory.
Collection of chunks in packs drops their rows; a pack is deleted once no row names it (and no
snapshot holds it), which ``cryptfs gc`` also does for one a pinned member kept at that moment.
Collection stays in the round (after its checkpoint is durable): run after the fsync returned,
in a thread of its own, it raced the background levelling of a replicated vault (a copy made
again, or recorded missing, of an object it was deleting: tests/test_97). But the round of an
fsync collects only a little (at most COLLECT_FSYNC chunks: a database's replaced chunks and the
old checkpoints): an fsync after a big file was deleted would wait for the deletion of its
chunks (on S3 a request each). Finding more, it leaves all of it to the checkpointer's own thread
(:meth:`Checkpointer.run`), asking it for a round, and the fsyncs after it leave it too; a
round collects at most COLLECT_MAX chunks, several at once (DELETE_THREADS), and asks for the
next if more are left (unless asked to collect everything: a snapshot deleted, the final round
of a mount), so that an fsync coming meanwhile waits at most for such a batch. Both counts are
of the chunks that may go: those a snapshot holds stay recorded and unreferenced, never
deleted, and are not counted.

fsync (:meth:`Checkpointer.fsync`): on one machine's vault (SQLite) a checkpoint (:meth:`sync`),
or, where the store appends and the fsync's commit only journaled, a record of the newest
checkpoint's fsync log (:mod:`cryptfs.vault.fsynclog`: one wait on the disk, no round) while
every commit since that checkpoint is in the log; :meth:`sync` itself always writes a
checkpoint holding what the log held (a snapshot, an unmount).
On a PostgreSQL vault the database is the metadata's durability point, on every machine: an
fsync returns once the metadata is committed there and every chunk it names is durable in the
store (:meth:`Checkpointer.persist`), and asks for a checkpoint in the background
(:meth:`Checkpointer.request`: the elected writer's runs soon after, spaced so that background
checkpoints take at most about 1/REQUEST_SPACING of the time; the others' metadata reaches the
store with it). A checkpoint of such a vault is a full image of the database (about a second at
a few thousand files): paid per fsync, it made every fsync of the writer that slow.

A full image is read without the filesystem lock: under it the round only fixes the state the
image will be of (:meth:`MetaEngine.freeze`: on PostgreSQL a snapshot on a connection of its
own; SQLite reads it all there), and everything the round records with the image is of that
same state: the ledger head its checkpoint's tail follows, the staged objects it waits for (and
leaves out, if another machine's upload does not come), the unreferenced objects its collection
may delete (the image names none of them; one referenced again meanwhile is kept by
:meth:`MetaEngine.collect_objects`). File operations go on meanwhile; what they commit goes
into the next checkpoint.

Longer than ~400 lines: the order of a checkpoint's durability steps is its contract; the
group commit, the round and the collection after it are kept in one reading order.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.errors import CryptfsError, IntegrityError, StoreError
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.format.layout import (
    CHECKPOINT_PREFIX,
    MAX_CHECKPOINT,
    META_PREFIX,
    PACK_PREFIX,
    SNAPSHOT_PREFIX,
    checkpoint_name,
    checkpoint_seq,
    log_name,
)
from cryptfs.meta.engine import MetaEngine
from cryptfs.meta.ledger import Entry, Ledger, head_mac
from cryptfs.meta.wal import MergedSegments, WalError
from cryptfs.paths import (
    VaultPaths,
    fsync_path,
    replace_private,
    stage_private,
    write_private,
)
from cryptfs.stores import ObjectStore
from cryptfs.vault.checkpoints import CHECKPOINT_VERSION, ref_json
from cryptfs.vault.fsynclog import FsyncLog
from cryptfs.vault.localstate import Head, read_head

if TYPE_CHECKING:
    from cryptfs.fs.journal import Logged
    from cryptfs.metrics import Metrics

log = logging.getLogger("cryptfs.vault.checkpointer")

KEEP_CHECKPOINTS = 3
# a checkpoint stores a full snapshot instead of one more segment once the segments would add
# up to more than 1/COMPACT_RATIO of their snapshot's size (of COMPACT_FLOOR if the snapshot is
# smaller: small snapshots are no reason to compact often), or their pages merged (below) to
# more than MAX_MERGED bytes; and, once the segments would be more than MAX_SEGMENTS, one
# segment of all of them merged (wal.MergedSegments: the pages they changed, each once)
# replaces them. Both cost what changed since the snapshot, not the whole database: a round
# pays for a full snapshot only once its segments grew to a share of it.
MAX_SEGMENTS = 128
# the pages changed since the end of the chain (snapshot and segments) go inline in the
# checkpoint (its delta, no object of their own: one object and one disk wait fewer per round)
# until they add up to more than this; that round stores them as one more segment
DELTA_MAX = 64 << 10
MAX_MERGED = 64 << 20
COMPACT_RATIO = 2
COMPACT_FLOOR = 1 << 20
CHECKPOINT_INTERVAL = 60.0
# collection (deleting what the newest checkpoint no longer needs) runs in a round once this
# many seconds passed or this many rounds went by since it last ran, and in the final round of a
# mount: a burst of fsyncs (a database committing) does not pay for store deletes each time
COLLECT_INTERVAL = 1.0
COLLECT_ROUNDS = 16
# chunks a round collects at most, unless asked to collect everything (the rest: in the next
# round, requested at once), and the round of an fsync at all (more: none, see the module doc)
COLLECT_MAX = 1024
COLLECT_FSYNC = 64
# the head file is rewritten by a round once this many seconds passed since it last was, and by
# the final round of a mount (and :meth:`Checkpointer.anchor`): between, the local ledger
# (synced in every round's first wait) records each checkpoint, which the anchors take as the
# bar as they take the head file's; a burst of fsyncs does not pay its two disk waits each time
HEAD_INTERVAL = 1.0
# seconds a checkpoint of a shared vault waits for the uploads of other machines that its
# metadata image names (then it leaves out those still missing)
STAGED_WAIT = 10.0
# a requested checkpoint (:meth:`Checkpointer.request`) starts no sooner after the last round
# ended than REQUEST_SPACING times that round's duration (at least COLLECT_INTERVAL, so that a
# requested round also collects): background checkpoints take a bounded share of the time
REQUEST_SPACING = 10
# unreferenced chunks collected per transaction on a shared (PostgreSQL) vault: their store
# deletes run under the filesystem lock, which is let go between batches, DELETE_THREADS at a
# time (a batch of S3 deletes costs about one request's time, not 8)
COLLECT_BATCH = 8
DELETE_THREADS = 8
BATCH_PAUSE = 0.005  # seconds between two batches, the lock let go


class Checkpointer:
    """Writes a vault's checkpoints (group commit, incremental segments, the head file) and
    collects after each; one per mount, built once the filesystem exists.

    Collaborators, all given here: ``meta``, ``ledger``, ``chunks``, ``store``, ``codec``,
    ``paths`` (the head file), ``lock`` (the filesystem lock: it guards the engine's
    connection), ``metrics`` (or None). Hooks into the vault: ``flush_stored()`` writes the
    queued ledger entries of stored chunks (caller holds ``lock``), ``queued()`` says whether
    any are queued; ``gate()`` raises (LockedError) when the mount may not write to the store
    now; ``fence(why)`` stops the mount writing; ``on_checkpoint(name, blob)`` runs after each
    checkpoint is recorded, before collection (the snapshot policy); ``held(pins)`` returns
    what those snapshot pins hold, or None when that cannot be worked out now.
    ``elected()``: whether this mount writes checkpoints (several machines on one PostgreSQL
    vault elect one writer; the others' :meth:`sync` is :meth:`persist`: their metadata is
    durable in the database, the writer's next checkpoint takes it to the store)."""

    def __init__(
        self,
        *,
        meta: MetaEngine,
        ledger: Ledger,
        chunks: ChunkStore,
        store: ObjectStore,
        codec: Codec,
        paths: VaultPaths,
        lock: threading.RLock,
        metrics: Metrics | None,
        flush_stored: Callable[[], None],
        queued: Callable[[], bool],
        gate: Callable[[], None],
        fence: Callable[[str], None],
        on_checkpoint: Callable[[str, bytes], None],
        held: Callable[[list[str]], set[str] | None],
        elected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.meta = meta
        self.ledger = ledger
        self.chunks = chunks
        self.store = store
        self.codec = codec
        self.paths = paths
        self.lock = lock
        self.metrics = metrics
        self.flush_stored = flush_stored
        self.queued = queued
        self.gate = gate
        self.fence = fence
        self.on_checkpoint = on_checkpoint
        self.held = held
        self.elected = elected
        self._ckpt_lock = threading.Lock()
        self._ticket_lock = threading.Lock()
        self._ckpt_requested = 0
        self._ckpt_done = 0
        self.last_seq = 0  # the ledger head the last checkpoint of this mount anchored
        # when the newest checkpoint this machine knows of was written (time.time_ns): the
        # head file's age when the mount began (a machine of a PostgreSQL vault also rewrites
        # its head file when it verifies a newer ledger head), then each checkpoint it writes
        try:
            self.last_ns = paths.head.stat().st_mtime_ns
        except OSError:
            self.last_ns = 0
        # the metadata objects of the last checkpoint this mount wrote (snapshot, segments),
        # and the change count it shipped (plus its own writes since: see _dirty)
        self._chain: list[ChunkRef] | None = None
        self._listed: list[str] = []  # its segments as the checkpoint lists them (JSON)
        # the pages the chain's segments changed, merged on its snapshot (None: not known)
        self._merged: MergedSegments | None = None
        # the pages changed since the chain's end that the last checkpoint carried inline
        self._delta: MergedSegments | None = None
        self._put_seq = 0  # the head of the last checkpoint this mount put (or tried to)
        self._clean_at: int | None = None
        self._own_writes = 0
        self._collected_at = float("-inf")  # the first round collects
        self._uncollected = 0  # rounds since collection last ran
        self._final = False  # the mount is ending: collect in the round, whatever the interval
        self._force_collect = False  # the next round collects, whatever the interval
        self._packs_swept = False  # a collection of this mount looked at every pack
        self._head_renamed = False  # the head file was renamed, its directory not synced
        self._head_at = float("-inf")  # (time.monotonic) when a round last wrote the head file
        self.newest: str | None = None  # the newest checkpoint this mount wrote
        self.fsync_log = FsyncLog(store, codec, lock)  # (an fsync's record, not a round)
        self._logged = 0  # the changes the fsync log holds since the last checkpoint
        self._log_seq = 0  # the last ledger entry the checkpoint or the log's records hold
        self._wake = threading.Event()  # a checkpoint was requested (or the mount ends)
        self._spaced_until = 0.0  # (time.monotonic) no requested round before then
        self._deferred = False  # more to collect than an fsync's round takes: run()'s rounds

    def request(self) -> None:
        """Ask :meth:`run` for a checkpoint soon (spaced: see REQUEST_SPACING); also wakes it
        to see that its ``stop`` was set. Returns at once."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Checkpoint every CHECKPOINT_INTERVAL, and after a :meth:`request` once the spacing
        since the last round allows, while anything besides the last checkpoint's own entries
        was written (the ledger moved: data stored or deleted, here or on another machine),
        until ``stop`` is set (then :meth:`request` wakes it). A failure the vault reports
        (CryptfsError) is logged and retried; anything else fences the mount and ends it."""
        due = time.monotonic() + CHECKPOINT_INTERVAL
        while True:
            if self._wake.wait(max(0.0, due - time.monotonic())):
                stop.wait(max(0.0, min(due, self._spaced_until) - time.monotonic()))
            if stop.is_set():
                return
            self._wake.clear()
            due = time.monotonic() + CHECKPOINT_INTERVAL
            if not self.elected() or self.ledger.forked:
                continue
            try:
                with self.lock:
                    self.ledger.invalidate()  # (other machines may have appended)
                    head = self.ledger.head()
            except CryptfsError as e:  # (a fork found here: on_fork said it, nothing to do)
                if not self.ledger.forked:
                    log.warning("background checkpoint: %s", e)
                continue
            if head is not None and head.seq > self.last_seq + 1 or self._uncollected:
                try:
                    self.sync()
                except CryptfsError as e:  # (a metadata database out of reach, too)
                    log.warning("background checkpoint failed: %s", e)
                except BaseException as e:  # noqa: B036 - never die silently, never go on
                    self.fence(f"a checkpoint failed unexpectedly ({type(e).__name__}: {e})")
                    return

    def sync(self, progress: Callable[[int, int], None] | None = None,
             collect: bool = False, logged: bool = False) -> None:
        """Make everything committed so far durable in the store (group commit: concurrent
        callers share one checkpoint that started after they called), in a checkpoint.
        Nothing happens when the newest checkpoint holds everything committed, or, with
        ``logged`` (an fsync), when it and its fsync log do. ``collect``: the round collects
        everything, due or not (deleting a snapshot frees what it alone held at once);
        otherwise a round collects at most COLLECT_MAX chunks when due, and an fsync's round
        at most COLLECT_FSYNC, or none (the module docstring)."""
        self.gate()
        if collect:
            self._force_collect = True
        if not self.elected():
            self.persist(progress)
            return
        with self.lock:
            if not self._dirty(logged):
                return  # the store holds everything committed so far
        with self._ticket_lock:
            self._ckpt_requested += 1
            ticket = self._ckpt_requested
        with self._ckpt_lock:
            if self._ckpt_done >= ticket:
                return  # a checkpoint that started after our call has finished
            with self._ticket_lock:
                target = self._ckpt_requested
            with self.lock:
                dirty = self._dirty(logged)  # a checkpoint that ended meanwhile may have
                # shipped it
            if not dirty:
                self._ckpt_done = target
                return
            started = time.perf_counter()
            try:
                collect_next = self._checkpoint(progress, logged)
            except BaseException:
                if self.metrics is not None:
                    self.metrics.checkpoint_failures.inc()
                raise
            took = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.checkpoint_seconds.observe(took)
            self._spaced_until = time.monotonic() + max(COLLECT_INTERVAL, REQUEST_SPACING * took)
            self._ckpt_done = target
            if collect_next:  # (once the spacing is known: run() waits for it)
                self.request()

    def fsync(self, logged: Logged | None = None,
              progress: Callable[[int, int], None] | None = None) -> None:
        """What an fsync makes durable (the module docstring): one machine's vault, a
        checkpoint (:meth:`sync`), or for a commit that only journaled (``logged``) and has
        the next place in the fsync log, that record (:mod:`cryptfs.vault.fsynclog`); a
        shared (PostgreSQL) vault, on every machine, what the database and the store must
        hold (:meth:`persist`), and a checkpoint is requested in the background
        (:meth:`request`). Nothing new: returns at once."""
        if not self.meta.shared:
            if logged is not None and self._log_record(logged):
                return
            self.sync(progress, logged=True)
            return
        self.gate()
        self.persist(progress)
        self.request()

    def persist(self, progress: Callable[[int, int], None] | None = None) -> None:
        """A shared vault's durability point: everything committed so far (with the queued
        ledger entries of stored chunks) is committed in the database, every chunk is in the
        store (uploads finished) and durable there (the local store synced). A vault can then
        be opened by any machine of the database; from the store alone only up to the last
        checkpoint."""
        with self.lock:
            self.flush_stored()
            self.meta.commit()
        self.chunks.wait_uploaded(None, progress)
        self.store.sync()

    def _log_record(self, logged: Logged) -> bool:
        """Append the record of ``logged`` to the fsync log if it is the next one and every
        commit since the last checkpoint is in the log before it (the change count: nothing
        else written; and no ledger entry queued, no collection due that an fsync's round
        would run); True once it is durable. The record carries the ledger entries since the
        checkpoint's head or the record before (the round's own, and those its commit wrote:
        the objects of its sealed chunks, made durable in the store first). Its writes then
        call for no round at an fsync (they do for :meth:`sync`)."""
        self.gate()
        with self._ckpt_lock:
            before, after = logged.changes
            with self.lock:
                if not self.fsync_log.fits(logged) or self._clean_at is None or \
                        self.queued() or \
                        before != self._clean_at + self._own_writes + self._logged or \
                        (self._uncollected and self._collects(True)):
                    return False
                # (nothing committed since its commit: the ledger ends with its entries)
                head = self.ledger.head()
                if head is not None and head.seq > self._log_seq:
                    logged.entries = list(self.ledger.entries(self._log_seq))
            if logged.blocks or logged.entries:  # (the objects they name first)
                self.store.sync()
            if not self.fsync_log.append(logged):
                return False
            with self.lock:
                self._logged += after - before
                if logged.entries:
                    self._log_seq = logged.entries[-1].seq
            return True

    def finish(self, progress: Callable[[int, int], None] | None = None) -> None:
        """The final checkpoint of a mount: :meth:`sync`, collecting whatever the interval
        (a round runs for that alone if needed), then :meth:`anchor`."""
        self._final = True
        self.sync(progress)
        self.anchor()

    def _collect_due(self) -> bool:
        return self._final or self._force_collect or self._uncollected >= COLLECT_ROUNDS or \
            time.monotonic() - self._collected_at >= COLLECT_INTERVAL

    def _collects(self, logged: bool) -> bool:
        """Whether a round collects (works out what it may delete): asked to (``collect``,
        the mount's final round), or due, unless it is the round of an fsync (``logged``)
        while more is left than such a round takes (:attr:`_deferred`)."""
        return self._final or self._force_collect or \
            self._collect_due() and not (logged and self._deferred)

    def _dirty(self, logged: bool = False) -> bool:
        """Whether anything was written since the last checkpoint shipped the metadata, other
        than that checkpoint's own bookkeeping (and, with ``logged``, the commits its fsync
        log holds), or a collection that was put off is due and this round would run it
        (caller holds the filesystem lock)."""
        if self._clean_at is None or self.queued() or self.meta.shared:
            return True  # (shared: other machines' commits are not counted here)
        if self._uncollected and self._collects(logged) or self._logged and not logged:
            return True
        return self.meta.change_count() != self._clean_at + self._own_writes + self._logged

    @contextlib.contextmanager
    def _own(self) -> Iterator[None]:
        """The filesystem lock, for the checkpoint's own writes (its ledger entries and
        collection): counted, so that they alone do not call for another checkpoint."""
        with self.lock:
            before = self.meta.change_count()
            try:
                yield
            finally:
                self._own_writes += self.meta.change_count() - before

    def _segment(self) -> tuple[bytes, MergedSegments | None, MergedSegments | None] | None:
        """The metadata changes since the end of the last checkpoint's chain (caller holds the
        filesystem lock): the pages changed since the last checkpoint, with those its delta
        carried folded in, as a segment; then None, or (the chain has MAX_SEGMENTS segments)
        every segment of the chain and this one merged, the merge (the segment that replaces
        them); then those pages merged (to go inline, as the delta: None when not known).
        None when a full image is due: this mount has shipped nothing yet, the segments add
        up to a fraction of their snapshot, their merged pages would pass MAX_MERGED, or the
        engine ships none."""
        chain = self._chain
        if chain is None or \
                sum(r.size for r in chain[1:]) * COMPACT_RATIO >= max(chain[0].size, COMPACT_FLOOR):
            return None
        seg = self.meta.changes()
        if seg is None:
            return None
        delta = None
        if self._merged is None:
            if self._delta is not None:  # (never expected) what it carried goes in an image
                return None
        else:  # (its database size: where the chain ends)
            try:
                delta = (self._delta or MergedSegments(
                    self._merged.page_size, self._merged.db_pages)).with_segment(seg)
            except WalError as e:  # (never expected: the engine wrote them)
                log.warning("cannot merge the metadata segments (%s); storing a snapshot", e)
                return None
            if self._delta is not None:
                seg = delta.segment()
        if len(chain) <= MAX_SEGMENTS:
            return seg, None, delta
        if self._merged is None:
            return None
        try:
            merged = self._merged.with_segment(seg)
        except WalError as e:  # (never expected: the engine wrote them)
            log.warning("cannot merge the metadata segments (%s); storing a snapshot", e)
            return None
        return None if merged.nbytes > MAX_MERGED else (merged.segment(), merged, None)

    def _checkpoint(self, progress: Callable[[int, int], None] | None = None,
                    logged: bool = False) -> bool:
        """Store the metadata changes (a segment, now and then a full snapshot), then a
        checkpoint naming the snapshot and its segments with the ledger head (see
        docs/FORMAT.md 8), in the order the module docstring gives; then collect what it no
        longer needs, if this round collects (:meth:`_collects`; ``logged``: the round of an
        fsync). Whether it left chunks to collect for a round of :meth:`run`. Callers hold
        off other checkpoints (:meth:`sync`)."""
        meta, led = self.meta, self.ledger
        self.chunks.store_packs()  # (their records go into the metadata shipped below)
        with self.lock:
            self.flush_stored()
            # An upload can finish before the file's chunk map is committed: on_stored then
            # finds no row to mark, and the row is inserted as 'staged'. Such a row is stored
            # (its ledger entry was written) once no upload and no staged file is left for it.
            # With other machines mounted a staged row may be one of their uploads, which this
            # machine cannot see: such rows wait until it is alone.
            if not meta.live_sessions():
                for ref in meta.objects_in_state("staged"):
                    if not self.chunks.upload_pending(ref):
                        meta.mark_stored(ref.name)
            collect = self._collects(logged)  # (what it may delete is worked out only then)
            seg = self._segment()
            # a full image: its state is fixed here and read below, without the lock (a
            # PostgreSQL vault's takes about a second at a few thousand files, and every
            # file operation waited for it); what is recorded with it is of that state
            frozen = meta.freeze() if seg is None else None
            merged = seg[1] if seg is not None else None
            shipped_at = meta.change_count()
            self._own_writes = self._logged = 0
            last = None
            if seg is not None:
                staged = {r.name for r in meta.objects_in_state("staged")}
                last = led.head()
                snap_seq = last.seq if last else 0
                garbage = meta.unreferenced_objects() if collect else []
        if frozen is None:
            assert seg is not None
            data, full = seg[0], False
            self.chunks.wait_uploaded(staged, progress)
        else:
            with contextlib.closing(frozen):
                data, full = frozen.image(), True
                staged = {r.name for r in frozen.staged()}
                snap_seq = frozen.ledger_seq  # the image's newest entry: the tail follows it
                garbage = frozen.unreferenced_objects()  # none of it in the image
                self.chunks.wait_uploaded(staged, progress)
                if meta.shared and not self._in_store(staged):  # (rarely: an upload of
                    # another machine slow or dead)
                    data = frozen.image(leave_out=lambda r: not self.store.exists(r.name))
        # the changes since the chain's end, if few, go inline (the checkpoint's delta: no
        # object of their own), the ledger head then the newest entry they hold (a round
        # that failed after putting its checkpoint left no entry of its own: not that head
        # again, its name is taken)
        delta = seg[2] if seg is not None and seg[1] is None else None
        inline = delta is not None and delta.nbytes <= DELTA_MAX and last is not None \
            and last.seq > self._put_seq
        if inline:
            assert last is not None
            e, tail, ref = last, [], None
            if self.metrics is not None:
                self.metrics.checkpoint_bytes.set(len(data))
        else:
            name = META_PREFIX + crypto.random_bytes(16).hex()
            blob = self.codec.seal_blob(b"meta", name, data, compress=True)
            self.store.put(name, blob)
            ref = ChunkRef(name, len(blob), crypto.sha256(blob))
            if self.metrics is not None:
                self.metrics.checkpoint_bytes.set(len(blob))
            with self._own():
                e = led.append("put", name, len(blob), ref.sha256)
                meta.reference(ref, staged=False)
                meta.commit()
                tail = [x.to_json() for x in led.entries(snap_seq)]
        # first wait on the disk: the chunks and the metadata durable before a checkpoint names
        # them, with the local ledger up to the checkpoint's head (a local ledger behind the
        # store's checkpoint is an anchor problem) and the rename of the last round's head file.
        # All in this thread, one after the other: no hand-offs to a helper thread (each cost
        # about as much as the fsyncs it overlapped, on a busy 2-core machine).
        self.store.sync()
        with self.lock:
            meta.sync()
        self._settle_head()
        if ref is None:  # (inline)
            assert self._chain is not None
            chain, listed = self._chain, self._listed
        elif full:
            chain, listed = [ref], []
        else:  # one more segment, or the merge of them all
            assert self._chain is not None
            seg_json = json.dumps(ref_json(ref))
            chain = [self._chain[0], ref] if merged is not None else [*self._chain, ref]
            listed = [seg_json] if merged is not None else [*self._listed, seg_json]
        ck_name = checkpoint_name(e.seq)
        body = {
            "version": CHECKPOINT_VERSION,
            "seq": e.seq,
            "hash": e.hash.hex(),
            "mac": head_mac(self.codec.ledger_key, e.seq, e.hash).hex(),
            "time_ns": time.time_ns(),
            "meta": ref_json(chain[0]),
            "tail": tail,
        }
        # "segments": the chain's, each encoded once (a chain of a hundred cost more to encode
        # every round than the rest of the body)
        # and "delta": base64 needs no JSON escapes, and the encoder's scan of a long string
        # cost as much as sealing it
        text = (json.dumps(body)[:-1] + ', "segments": [' + ", ".join(listed) + "]").encode()
        if inline:
            text += b', "delta": "' + base64.b64encode(data) + b'"'
        ck_blob = self.codec.seal_blob(b"checkpoint", ck_name, text + b"}")
        if len(ck_blob) > MAX_CHECKPOINT:  # readers refuse it: fail; the next one is smaller
            raise StoreError(f"checkpoint {ck_name} would have {len(ck_blob)} bytes, more than "
                             f"the {MAX_CHECKPOINT} readers accept ({len(tail)} ledger entries "
                             "since its snapshot)", hint="the next checkpoint retries")
        # second wait: the checkpoint, with (when due: HEAD_INTERVAL) the temp file of the head
        # file naming it, which is renamed into place once the checkpoint is durable;
        # the rename is made durable by the next round's first wait (or :meth:`anchor`). The
        # checkpoint's own ledger entry and the collections below are committed (they survive
        # a crash of this process) and anchored by the next round.
        head_due = self._final or time.monotonic() - self._head_at >= HEAD_INTERVAL
        head_tmp = stage_private(self.paths.head, self._head(e, ck_name), durable=False) \
            if head_due else None
        try:
            self._put_seq = e.seq
            if self.store.appendable and not meta.shared:  # (a log of a checkpoint of this
                self.store.delete(log_name(e.seq))  # number a rollback left: not this one's)
            self.store.put(ck_name, ck_blob)
            self.store.sync()
            if head_tmp is not None:
                fsync_path(head_tmp)
        except BaseException:
            if head_tmp is not None:
                head_tmp.unlink(missing_ok=True)
            raise
        with self._own():  # one connection, one thread at a time
            meta.shipped()  # the next segment starts where this one ends...
            self._chain = chain  # ...and is added to this list
            self._listed = listed
        self._delta = delta if inline else None  # (stored: the chain holds it now)
        try:  # (an inline round's pages are not in the chain: its merge stays as it was)
            if full:  # (an engine that ships no segments has no use for it)
                self._merged = MergedSegments.after(data) if not meta.shared else None
            elif merged is not None:
                self._merged = merged
            elif self._merged is not None and not inline:
                self._merged.add(data)
        except WalError as e:  # (never expected: the engine wrote them)
            log.warning("cannot merge metadata segment %s (%s); storing a snapshot when the "
                        "segments are too many", name, e)
            self._merged = None
        self.newest = ck_name
        if head_tmp is not None:
            replace_private(head_tmp, self.paths.head, durable=False)
            self._head_renamed = True
            self._head_at = time.monotonic()
        self.last_ns = time.time_ns()
        ck_ref = ChunkRef(ck_name, len(ck_blob), crypto.sha256(ck_blob))
        with self._own():
            led.append("put", ck_name, ck_ref.size, ck_ref.sha256)
            meta.reference(ck_ref, staged=False)
            meta.commit()
        self.on_checkpoint(ck_name, ck_blob)  # automatic snapshots, before what they hold is
        if collect:  # worked out
            # everything if asked to; an fsync's round (a caller waits): a little, or none
            most = None if self._final or self._force_collect else \
                COLLECT_FSYNC if logged else COLLECT_MAX
            left = self._collect({r.name for r in chain}, garbage, most, partial=not logged)
            self._force_collect = False
            # what is left goes in the next round of run(), as soon as it may run
            self._collected_at = float("-inf") if left else time.monotonic()
            self._uncollected = 1 if left else 0
            self._deferred = left
        else:
            self._uncollected += 1
            left = self._deferred
        with self._own():
            meta.commit()
            last = led.head()
            self._clean_at = shipped_at
        assert last is not None
        self.last_seq = last.seq
        self.fsync_log.restart(None if meta.shared else e.seq, e.hash)
        self._log_seq = e.seq  # (its log's first record carries the entries after its head)
        return left

    def _in_store(self, names: set[str]) -> bool:
        """Whether the objects ``names`` (the image's staged ones) are all in the store by
        now, waiting up to STAGED_WAIT for the uploads of other machines (their metadata
        names objects before they are uploaded). False: the image must leave out those still
        missing (a checkpoint names only what the store holds: a vault opened from the store
        alone then has every object it names, the missing chunks are holes there)."""
        missing = set(names)
        deadline = time.monotonic() + STAGED_WAIT
        while True:
            missing = {n for n in missing if not self.store.exists(n)}
            if not missing:
                return True
            if time.monotonic() >= deadline:
                log.warning("checkpoint: %d chunks another machine is uploading are not in the "
                            "store after %.0f s; this checkpoint leaves them out (the next one "
                            "names them once they are there)", len(missing), STAGED_WAIT)
                return False
            time.sleep(0.2)

    def _settle_head(self) -> None:
        """Make the last rename of the head file durable: an fsync of its directory (also on
        ext4 and xfs: without a journal, ext4 syncs the parent of a file at its fsync only if
        the file is new since its last fsync, and the temp file was synced before the rename)."""
        if self._head_renamed:
            fsync_path(self.paths.head.parent)
            self._head_renamed = False

    def anchor(self, wait: bool = True, force: bool = False) -> None:
        """Make the local ledger durable and record its newest entry in the head file (after
        the final checkpoint of a mount: a round anchors only up to its checkpoint's entry).
        Several machines (``meta.shared``): record the head this machine verified
        (:attr:`Ledger.verified`, committed first) with the newest checkpoint recorded up to
        it. ``wait=False``: nothing if a checkpoint is being written (it writes the head).
        ``force`` (shared only: ``verify --accept``): write it even if the file's is newer."""
        if not self._ckpt_lock.acquire(blocking=wait):
            return
        try:
            if self.meta.shared:
                self._anchor_verified(force)
            else:
                head = read_head(self.paths)
                ck = self._newest(head)
                if ck:
                    with self.lock:
                        self.meta.sync()
                        last = self.ledger.head()
                    if last is not None and (head is None or last.seq > head.seq or
                                             ck != head.checkpoint):
                        self._write_head(last, ck)
            self._settle_head()
        finally:
            self._ckpt_lock.release()

    def _anchor_verified(self, force: bool = False) -> None:
        """The head file of a machine sharing the database: the verified ledger head, if
        newer than the file's or ``force`` (caller holds _ckpt_lock)."""
        head = read_head(self.paths) if not force else None
        with self.lock:
            self.meta.commit()  # (an append of this machine's counts once committed)
            last, ck = self.ledger.verified, self.ledger.checkpoint
            if self.ledger.forked:
                return
        if head is not None and (checkpoint_seq(head.checkpoint) or 0) > (checkpoint_seq(ck) or 0):
            ck = head.checkpoint
        if last is not None and ck and (head is None or last.seq > head.seq):
            self._write_head(last, ck)
        elif force:  # nothing verified to anchor (no checkpoint recorded yet)
            self.paths.head.unlink(missing_ok=True)

    @contextlib.contextmanager
    def checkpoints_held(self) -> Iterator[str]:
        """Hold off checkpoints (and so collection) while the body runs; yields the name of the
        newest checkpoint, whose metadata image stays in the store meanwhile."""
        with self._ckpt_lock:
            ck = self._newest(read_head(self.paths))
            if not ck:
                raise IntegrityError("this vault has no checkpoint yet")
            yield ck

    def _newest(self, head: Head | None) -> str | None:
        """The newest checkpoint this machine knows of: the last this mount wrote (the head
        file names it only once HEAD_INTERVAL passed) or the head file's, whichever is newer."""
        named = head.checkpoint if head is not None and head.checkpoint else None
        if named is None or self.newest is None:
            return self.newest or named
        return max(named, self.newest, key=lambda n: checkpoint_seq(n) or 0)

    def _write_head(self, e: Entry, ck_name: str) -> None:
        """Record the ledger head this machine has seen (MAC'd) and the newest checkpoint."""
        write_private(self.paths.head, self._head(e, ck_name))

    def _head(self, e: Entry, ck_name: str) -> bytes:
        """The head file's content naming entry ``e`` and checkpoint ``ck_name``."""
        mac = head_mac(self.codec.ledger_key, e.seq, e.hash)
        return json.dumps(Head(e.seq, e.hash, mac, ck_name).to_json()).encode()

    def _collect(self, current: set[str], garbage: list[ChunkRef], most: int | None = None,
                 partial: bool = True) -> bool:
        """Delete what the newest checkpoint no longer needs: snapshots and segments it does
        not name (``current``), checkpoints beyond the newest few, and chunk objects that were
        unreferenced at snapshot time; never anything a snapshot pin holds (:mod:`.snapshots`),
        and nothing at all while that cannot be worked out. Of the chunks that may go, at most
        ``most`` (without ``partial``: none if there are more); whether some were left. Its
        writes are the checkpoint's own (see _own)."""
        meta = self.meta
        prefixes = (CHECKPOINT_PREFIX, META_PREFIX, SNAPSHOT_PREFIX)
        if meta.shared:  # PostgreSQL reads and unseals every object row for it (0.07 to
            with self.lock:  # 0.2 s at 3,000 files): as of now, without the filesystem lock
                frozen = meta.freeze()
            with contextlib.closing(frozen):
                named = frozen.objects_named(*prefixes)
        else:
            with self.lock:  # by the name index: not every object of a big vault
                named = meta.objects_named(*prefixes)
        cks = sorted((r for r in named if r.name.startswith(CHECKPOINT_PREFIX)),
                     key=lambda r: r.name, reverse=True)
        metas = [r for r in named if r.name.startswith(META_PREFIX)]
        pins = [r.name for r in named if r.name.startswith(SNAPSHOT_PREFIX)]
        held = self.held(pins)
        if held is None:
            return False
        # (a snapshot holds a chunk in a pack by its pack: the pack's members stay recorded)
        garbage = [r for r in garbage if r.name not in held and r.pack not in held]
        left = most is not None and len(garbage) > most  # (counted past the held ones)
        if left:
            garbage = garbage[:most] if partial else []
        # other machines commit meanwhile on a shared vault: see _collect_shared
        local = [] if meta.shared else garbage
        # pack members: their rows go; a pack goes once no row names it (_collect_packs)
        members = [r for r in local if r.pack is not None]
        local = [r for r in local if r.pack is None]
        old: list[ChunkRef] = [r for r in cks if r.name not in held][KEEP_CHECKPOINTS:]
        old.extend(r for r in metas if r.name not in current and r.name not in held)
        # deletions first, then their records in one transaction (one commit for all: each
        # commit writes its pages to the log, and the next segment ships them)
        gone: list[ChunkRef] = []
        for ref in old:  # cleanup: a failure is retried at the next checkpoint, never fatal
            try:
                self.store.delete(ref.name)
            except StoreError as e:
                log.warning("could not delete %s: %s", ref.name, e.line())
                continue
            gone.append(ref)
        claimed: list[ChunkRef] = []
        try:
            with self._own(), meta.transaction():
                for ref in gone:
                    meta.forget_object(ref.name)
                    self.ledger.append("del", ref.name, ref.size, ref.sha256)
                for ref in local:  # their rows go before the objects (committed first)
                    if not self.chunks.try_claim_for_delete(ref.name):
                        continue
                    claimed.append(ref)
                    if not meta.drop_object_if_unreferenced(ref.name):
                        self.chunks.release_claim(claimed.pop().name)
                for ref in members:
                    if self.chunks.try_claim_for_delete(ref.name):
                        meta.drop_object_if_unreferenced(ref.name)
                        self.chunks.release_claim(ref.name)
        except BaseException:
            for ref in claimed:
                self.chunks.release_claim(ref.name)
            raise
        done = self._delete_claimed(claimed)
        deleted = [ref for ref in claimed if ref.name in done]
        for ref in claimed:
            if ref.name not in done:
                with self._own(), meta.transaction():
                    meta.unreference_object(ref)
        if meta.shared:  # (their ledger entries: written with the rows' removal)
            self._collect_shared(garbage)
        packs = {r.pack for r in members if r.pack}
        if not self._packs_swept and not meta.shared:
            # once a mount, every pack no row names, not only those this round emptied: a
            # crash between the deletion of a pack and of its row, or of its last members'
            # rows and of the pack, or a member pinned when the others went, left it
            with self.lock:
                packs.update(r.name for r in meta.objects_named(PACK_PREFIX))
        self._packs_swept = True
        if packs:
            deleted += self._collect_packs(packs, held)
        if deleted:
            with self._own(), meta.transaction():
                for ref in deleted:
                    self.ledger.append("del", ref.name, ref.size, ref.sha256)
        return left

    def _collect_packs(self, packs: set[str], held: set[str]) -> list[ChunkRef]:
        """Delete the packs among ``packs`` that no object row names any more (their rows go
        once they are gone from the store); none a snapshot holds, nor one with a member this
        machine has handed out and not committed."""
        with self.lock:
            empty = [r for r in self.meta.empty_packs(packs) if r.name not in held]
        deleted: list[ChunkRef] = []
        for ref in empty:
            if not self.chunks.try_claim_for_delete(ref.name):
                continue
            try:
                self.chunks.delete_claimed(ref.name)
            except StoreError as e:
                log.warning("could not delete %s: %s", ref.name, e)
                continue
            with self._own(), self.meta.transaction():
                self.meta.forget_object(ref.name)
            deleted.append(ref)
        return deleted

    def _delete_claimed(self, claimed: list[ChunkRef]) -> set[str]:
        """Delete the objects ``claimed`` (:meth:`ChunkStore.try_claim_for_delete`) from the
        store, DELETE_THREADS at a time, releasing each claim; the names deleted (one that
        could not be is logged)."""

        def delete_one(ref: ChunkRef) -> str | None:
            try:
                self.chunks.delete_claimed(ref.name)
            except StoreError as e:
                log.warning("could not delete %s: %s", ref.name, e)
                return None
            return ref.name

        if len(claimed) < 2:
            return {n for n in map(delete_one, claimed) if n}
        with ThreadPoolExecutor(min(DELETE_THREADS, len(claimed)),
                                thread_name_prefix="collect") as pool:
            return {n for n in pool.map(delete_one, claimed) if n}

    def _collect_shared(self, garbage: list[ChunkRef]) -> None:
        """Collect unreferenced chunks of a vault other machines write
        (:meth:`MetaEngine.collect_objects`: each object is deleted while its row is locked,
        so a commit of another machine deduplicating against it either keeps it or stores it
        again), COLLECT_BATCH at a time, the filesystem lock let go in between (store deletes
        happen under it, a batch's at once). Each deletion's ``del`` ledger entry is written in
        the transaction that buries the row: a machine storing the object again waits for the
        row, so its ``put`` comes after (written later, the ``del`` would follow that ``put``:
        the ledger would call a stored object deleted). What this machine has pinned stays.
        Then the tombstones (:meth:`MetaEngine.drop_tombstones`) no machine needs any more are
        dropped."""

        def delete(refs: list[ChunkRef]) -> set[str]:  # (the filesystem lock is held: at once)
            done = self._delete_claimed([r for r in refs
                                         if self.chunks.try_claim_for_delete(r.name)])
            for ref in refs:  # (in the rows' transaction, see above)
                if ref.name in done:
                    self.ledger.append("del", ref.name, ref.size, ref.sha256)
            return done

        for i in range(0, len(garbage), COLLECT_BATCH):
            if i:  # a lock let go and taken again at once is seldom won by a thread waiting
                time.sleep(BATCH_PAUSE)  # for it: the file operations come first
            with self._own():
                self.meta.collect_objects(garbage[i:i + COLLECT_BATCH], delete)
        with self._own():  # the tombstones of deletions no live session can need any more
            self.meta.drop_tombstones()
