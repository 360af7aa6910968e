"""The chunk store: sealing, deduplication, staging, background upload and caching.

Contract of :meth:`ChunkStore.put`: when it returns, the sealed object survives a crash of this
process (it is in the local store, or in the staging directory for a remote store) and
:meth:`get` can read it. For a remote store a pool of workers uploads staged objects in the
background, retrying with backoff until the store accepts them; :meth:`wait_uploaded` and
:meth:`drain` wait for that. Staged files left by a crash are resumed by :meth:`resume`.

Each name is guarded while it is written or deleted, and names handed out by ``put`` stay
*pinned* until the caller has recorded (or dropped) its reference, so garbage collection never
deletes an object that an uncommitted chunk map points to.

Several machines (``keep_dedup``): another machine's collection can delete an object this one
deduplicated a write against, before this one's commit references it; or one this one stored
itself, unrecorded, when another machine stored, committed, unreferenced and collected the
same content meanwhile (or ``cryptfs gc`` deleted it). So every put keeps the chunk
(:meth:`kept`) until the name is unpinned: its plaintext in memory up to ``keep_bytes``, beyond
that sealed in a file of the staging directory; the commit asks the metadata whether the object
is still live (``MetaEngine.claim_object``; :meth:`kept_new`: the put stored it, found no
record) and if not stores it again (:meth:`restore`).

Packs (``packing``: one machine's vault on one store; docs/FORMAT.md 4.3): the object of a
partial chunk (a closed file's last: ``put(..., pack=True)``) of at most PACK_MEMBER_MAX bytes
is appended to the open pack, a
file of the staging directory, instead of being stored alone; its ref names the pack and its
offset, so the metadata records where it lies before the pack is stored (staged until then, on
a local store too). The pack is closed (its sealed index appended) and stored once it reaches
PACK_TARGET bytes or PACK_MAX_MEMBERS members, PACK_LINGER seconds after it was opened, or when
:meth:`wait_uploaded` waits for a member: a tree of small files costs a request (a file) per
pack, not per file, to write and (:meth:`get` fetches a member's whole pack into the disk cache
of a remote store) to read back.

Longer than ~400 lines: a chunk's whole life (seal, dedup, stage, upload, fetch, cache,
delete) shares one set of locks and counters.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from cryptfs.chunks.diskcache import DiskCache, read_at_most, read_range_of
from cryptfs.errors import CryptfsError, IntegrityError, ObjectNotFound, StoreError, StoreFull
from cryptfs.format import crypto
from cryptfs.format.codec import ChunkRef, Codec, SegmentSpan
from cryptfs.format.layout import (
    MAX_PACK,
    PACK_MAX_MEMBERS,
    PACK_MEMBER_MAX,
    PACK_PREFIX,
    PACK_TARGET,
    pack_name,
)
from cryptfs.paths import private_dir
from cryptfs.stores import ObjectStore

if TYPE_CHECKING:
    from cryptfs.metrics import Metrics

log = logging.getLogger("cryptfs.chunks.chunkstore")

FAILED_FETCH_MEMORY = 1.0  # seconds a failed fetch is remembered (the kernel retries at once)
RANGED_MEMORY = 4096  # chunks range-read once, remembered: read whole the next time (read_range)
PACK_LINGER = 1.0  # seconds an open pack waits for more members before it is uploaded


class _Pack:
    """A pack being written: a staging file members are appended to (see the module doc).
    ``members``: those of a staged pack a crash left (it is closed with them), else a new one."""

    def __init__(self, path: Path, members: list[ChunkRef] | None = None) -> None:
        self.name = path.name.replace("_", "/", 1)  # (the staging name of packs/<hex>)
        self.path = path
        self.members = sorted(members or [], key=lambda m: m.offset)
        self.size = max((m.offset + m.size for m in self.members), default=0)
        self.fd = os.open(path, os.O_RDWR) if members else \
            os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.marker: Future[None] = Future()  # each member's entry in ChunkStore._uploads


class ChunkStore:
    """Moves sealed chunks between the filesystem layer and an object store.

    ``lookup(name)`` returns the recorded ref of an existing object (dedup); ``on_stored(ref)``
    is called once an object is in the store (the vault appends the ledger entry then).
    ``metrics`` (optional) counts cache hits and misses and objects failing their check.
    """

    def __init__(
        self,
        store: ObjectStore,
        codec: Codec,
        *,
        remote: bool,
        staging: Path,
        cache: Path | None,
        cache_bytes: int,
        lookup: Callable[[str], ChunkRef | None],
        on_stored: Callable[[ChunkRef], None],
        workers: int = 8,
        mem_bytes: int = 64 << 20,
        staging_limit: int = 1 << 30,
        metrics: Metrics | None = None,
        keep_dedup: bool = False,
        keep_bytes: int = 64 << 20,
        packing: bool = False,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.codec = codec
        self.remote = remote
        self.staging = staging
        self.cache = DiskCache(cache, cache_bytes, metrics) if cache is not None else None
        # a sequential read of a file bigger than this does not enter the disk cache, so that
        # streaming one big file does not evict everything else (scan resistance)
        self.stream_cache_limit = cache_bytes // 4 if cache is not None else 0
        self.lookup = lookup
        self.on_stored = on_stored
        self.staging_limit = staging_limit
        self._cv = threading.Condition()
        self._busy: set[str] = set()
        self._pins: collections.Counter[str] = collections.Counter()
        # wall-clock time since when each pinned (or being stored) name has been held
        # uncommitted: see horizon()
        self._since: dict[str, float] = {}
        # refs handed out but not yet committed by the caller, or still uploading: the metadata
        # does not know them yet, so dedup must find them here
        self._recent: dict[str, ChunkRef] = {}
        self._uploads: dict[str, Future[None]] = {}
        self._queued_at: dict[str, float] = {}  # name -> monotonic time, in queueing order
        self._staged_bytes = 0
        self._mem: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._mem_max = mem_bytes  # plaintext of recently read chunks, bounded in bytes
        self._mem_size = 0
        self._mem_lock = threading.Lock()
        # chunks range-read once, newest last, with their sizes: see read_range
        self._ranged: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._ranged_bytes = 0
        self._closing = False
        self._abort = False
        self.errors = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload")
        # reads ahead: remote fetches wait on the network, local ones on the disk and crypto
        self._fetch_pool = ThreadPoolExecutor(max_workers=8 if remote else 4,
                                              thread_name_prefix="fetch")
        self._seal_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="seal")
        self._seal_slots = threading.BoundedSemaphore(6)
        self._prefetching: dict[str, Future[None]] = {}
        # chunks a sequential reader fetches ahead: enough to keep the fetch workers busy
        self.readahead = 8 if remote else 4
        self._failed: dict[str, tuple[float, CryptfsError]] = {}
        # deduplicated chunks kept until their names are unpinned (see the module doc):
        # plaintext in memory, or sealed in a file of the staging directory past keep_bytes
        self.keep_dedup = keep_dedup
        self.keep_bytes = keep_bytes
        self._kept: dict[str, bytes] = {}
        self._kept_size = 0
        self._spilled: set[str] = set()
        self._new: set[str] = set()  # kept names whose puts all stored them (no record found)
        self._again: set[str] = set()  # uploading names staged again meanwhile: see _enqueue
        self.packing = packing
        self._pack: _Pack | None = None
        self._pack_lock = threading.Lock()  # the open pack; taken before _cv, never after
        self._pack_fetches: dict[str, Future[None]] = {}  # packs being fetched whole
        self._packs_storing = 0  # closed packs not stored (or failed) yet
        private_dir(staging)

    # -- naming guards ------------------------------------------------------------------------
    def _acquire(self, name: str) -> None:
        with self._cv:
            while name in self._busy:
                self._cv.wait()
            self._busy.add(name)

    def _release(self, name: str) -> None:
        with self._cv:
            self._busy.discard(name)
            self._cv.notify_all()

    def pin(self, names: Iterable[str]) -> None:
        with self._cv:
            now = time.time()
            for n in names:
                self._pins[n] += 1
                self._since.setdefault(n, now)

    def unpin(self, names: Iterable[str]) -> None:
        with self._cv:
            for n in names:
                self._pins[n] -= 1
                if self._pins[n] <= 0:
                    del self._pins[n]
                    self._since.pop(n, None)
                    self._forget(n)
                    self._unkeep(n)

    def _unkeep(self, name: str) -> None:
        """Drop what :meth:`_keep` kept of ``name`` (caller holds _cv)."""
        plain = self._kept.pop(name, None)
        self._new.discard(name)
        if plain is not None:
            self._kept_size -= len(plain)
        if name in self._spilled:
            self._spilled.discard(name)
            self._kept_path(name).unlink(missing_ok=True)

    def _kept_path(self, name: str) -> Path:
        return self.staging / (name.replace("/", "_") + ".kept")

    def _keep(self, name: str, plain: bytes | bytearray | memoryview,
              blob: bytes | None = None) -> None:
        """Keep a chunk until its name is unpinned (caller holds the name's guard): its
        plaintext in memory, or past keep_bytes sealed in a staging file (a stray file after a
        crash, removed by :meth:`resume`). ``blob``: the put stored this sealed object itself
        (no record found: :meth:`kept_new`); written as the staging file if it spills (the
        same bytes: sealing is convergent)."""
        with self._cv:
            if name in self._kept or name in self._spilled:
                if blob is None:  # deduplicated against a record once: no row means collected
                    self._new.discard(name)
                return
            if blob is not None:
                self._new.add(name)
            if self._kept_size + len(plain) <= self.keep_bytes:
                self._kept[name] = bytes(plain)
                self._kept_size += len(plain)
                return
        path = self._kept_path(name)
        try:
            linked = False
            if blob is not None and self.remote:  # the staged file holds it: a second name
                with contextlib.suppress(OSError):  # (unless uploaded and gone already)
                    path.unlink(missing_ok=True)
                    os.link(self.staged_path(name), path)
                    linked = True
            if not linked:
                path.write_bytes(blob if blob is not None else self.codec.seal_chunk(name, plain))
        except OSError as e:
            path.unlink(missing_ok=True)
            with self._cv:
                self._new.discard(name)
            raise StoreError(f"cannot keep {name} in {self.staging}: {e.strerror}") from None
        with self._cv:
            self._spilled.add(name)

    def _store_sealed(self, name: str, blob: bytes, partial: bool = False) -> ChunkRef:
        """Store chunk object ``blob`` under ``name``: staged for upload on a remote store, put
        (and reported stored) on a local one; a ``partial`` chunk's (shorter than the chunk
        size: a file's last) in the open pack if packing and it is small enough."""
        if partial and self.packing and len(blob) <= PACK_MEMBER_MAX:
            return self._append_to_pack(name, blob)
        ref = ChunkRef(name, len(blob), crypto.sha256(blob))
        if self.remote:
            self._stage(ref, blob)
        else:
            self.store.put(name, blob)
            self.on_stored(ref)
        return ref

    def kept(self, name: str) -> bool:
        """Whether ``name`` was handed out on a vault other machines write (``keep_dedup``):
        its commit must claim it (``MetaEngine.claim_object``), or store it again with
        :meth:`restore`."""
        with self._cv:
            return name in self._kept or name in self._spilled

    def kept_new(self, name: str) -> bool:
        """Whether every put of kept ``name`` stored the object itself, finding no record
        (its commit claims it with ``new``: no row is no collection)."""
        with self._cv:
            return name in self._new

    def restore(self, name: str) -> ChunkRef:
        """Store a kept chunk again (another machine's collection may have deleted its
        object): sealed anew (or the sealed copy kept), put in the store (staged for a remote
        one); returns its new ref, which the caller references (staged as for :meth:`put`).

        Without the name's guard: the caller holds the filesystem lock, which a :meth:`put`
        holding the guard may wait for (its lookup); the name is pinned, so this machine's
        collection does not touch it, and a concurrent put of it finds it in ``_recent``."""
        try:
            with self._cv:
                plain = self._kept.get(name)
            blob = self.codec.seal_chunk(name, plain) if plain is not None else \
                self._kept_path(name).read_bytes()
            ref = self._store_sealed(name, blob)
            with self._cv:
                self._recent[name] = ref
            log.info("stored %s again: it was collected while a write here was "
                     "deduplicated against it", name)
            return ref
        except OSError as e:
            raise StoreError(f"cannot read the kept copy of {name}: {e.strerror}") from None

    def horizon(self) -> float:
        """A wall-clock time before which every object this chunk store wrote is recorded
        in the metadata (committed): the oldest start of a put whose ref is still pinned
        (handed out, not committed by the caller) or still being stored; now if there is
        none. Another machine's ``cryptfs gc`` deletes no unrecorded object written after it
        (see :func:`cryptfs.admin.gc.find_garbage`)."""
        with self._cv:
            return min(self._since.values(), default=time.time())

    def _forget(self, name: str) -> None:
        """Drop a recent ref once nobody holds it uncommitted and it is not uploading."""
        if name not in self._pins and name not in self._uploads:
            self._recent.pop(name, None)

    def try_claim_for_delete(self, name: str) -> bool:
        """For garbage collection: claim ``name`` unless it is pinned or being written."""
        with self._cv:
            if name in self._busy or self._pins.get(name) or name in self._uploads:
                return False
            if name.startswith(PACK_PREFIX) and any(r.pack == name
                                                    for r in self._recent.values()):
                return False  # a member handed out, not yet committed (or still uploading)
            self._busy.add(name)
            return True

    # -- writing ------------------------------------------------------------------------------
    def put(self, plain: bytes | bytearray | memoryview, pack: bool = False) -> ChunkRef:
        """Seal and store one chunk (deduplicated); returns its pinned ref. ``pack``: a short
        chunk may go into the open pack (a closed file's last: see the module doc)."""
        name = self.codec.chunk_name(plain)
        self._acquire(name)
        with self._cv:  # before the object is written: see horizon()
            self._since.setdefault(name, time.time())
        try:
            with self._cv:
                ref = self._recent.get(name)
                # recorded, committed and only uploading: another machine may collect it
                recorded = ref is not None and not self._pins.get(name)
            if ref is None:
                ref = self.lookup(name)
                recorded = ref is not None
            if recorded and self.keep_dedup:
                self._keep(name, plain)
            if ref is None:
                blob = self.codec.seal_chunk(name, plain)
                cs = self.codec.chunk_size
                ref = self._store_sealed(name, blob,
                                         pack and cs is not None and len(plain) < cs)
                if self.keep_dedup:
                    self._keep(name, plain, blob)
            with self._cv:
                self._pins[name] += 1
                self._recent[name] = ref
            return ref
        finally:
            with self._cv:
                if name not in self._pins:  # (failed)
                    self._since.pop(name, None)
            self._release(name)

    def put_async(self, plain: bytearray, pack: bool = False) -> Future[ChunkRef | None]:
        """:meth:`put` on a sealing thread; an all-zero chunk becomes a hole (None). Blocks
        while too many chunks are being sealed (bounded memory)."""
        self._seal_slots.acquire()
        try:
            fut = self._seal_pool.submit(self.put_or_hole, plain, pack)
        except BaseException:
            self._seal_slots.release()
            raise
        fut.add_done_callback(lambda _f: self._seal_slots.release())
        return fut

    def put_or_hole(self, plain: bytearray, pack: bool = False) -> ChunkRef | None:
        """:meth:`put`, or None (a hole) for an all-zero chunk."""
        if not plain or (plain[0] == 0 and plain[-1] == 0 and plain == bytes(len(plain))):
            return None
        return self.put(plain, pack)

    def staged_path(self, name: str) -> Path:
        return self.staging / name.replace("/", "_")

    def _stage(self, ref: ChunkRef, blob: bytes) -> None:
        with self._cv:
            while self._staged_bytes > self.staging_limit and not self._closing:
                self._cv.wait(1.0)  # backpressure: wait for uploads to make room
            self._staged_bytes += ref.size
        path = self.staged_path(ref.name)
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            with self._cv:
                self._staged_bytes -= ref.size
                self._cv.notify_all()
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise (StoreFull if full else StoreError)(
                f"cannot stage {ref.name} in {self.staging}: {e.strerror}") from None
        self._enqueue(ref)

    # -- packs --------------------------------------------------------------------------------
    def _append_to_pack(self, name: str, blob: bytes) -> ChunkRef:
        """Append a small chunk object to the open pack (opening one if none is): when this
        returns it survives a crash of this process, as a staged object does. Returns its ref
        (pack and offset)."""
        with self._cv:
            while self._staged_bytes > self.staging_limit and not self._closing:
                self._cv.wait(1.0)  # backpressure: wait for uploads to make room
            self._staged_bytes += len(blob)
        sha = crypto.sha256(blob)
        try:
            with self._pack_lock:
                p = self._pack
                if p is None:
                    path = self.staged_path(pack_name(crypto.random_bytes(16).hex()))
                    p = self._pack = _Pack(path)
                    timer = threading.Timer(PACK_LINGER, self._linger, (p,))
                    timer.daemon = True
                    timer.start()
                ref = ChunkRef(name, len(blob), sha, p.name, p.size)
                view = memoryview(blob)
                while view:  # at the pack's end: a write cut short is overwritten by the next
                    view = view[os.pwrite(p.fd, view, p.size + len(blob) - len(view)):]
                p.size += len(blob)
                p.members.append(ref)
                with self._cv:
                    self._uploads[name] = p.marker
                    self._queued_at.setdefault(name, time.monotonic())
                if p.size >= PACK_TARGET or len(p.members) >= PACK_MAX_MEMBERS:
                    self._close_pack()
        except OSError as e:
            with self._cv:
                self._staged_bytes -= len(blob)
                self._cv.notify_all()
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise (StoreFull if full else StoreError)(
                f"cannot stage {name} in {self.staging}: {e.strerror}") from None
        return ref

    def repack(self, ref: ChunkRef, blob: bytes) -> ChunkRef:
        """Copy pack member ``ref`` (``blob``: its bytes, checked) into the open pack; returns
        its new ref, which the caller records (``MetaEngine.move_to_pack``)."""
        return self._append_to_pack(ref.name, blob)

    def _linger(self, p: _Pack) -> None:
        with self._pack_lock:
            if self._pack is p:
                self._close_pack()

    def _close_pack(self) -> None:
        """Queue the open pack for upload (caller holds _pack_lock)."""
        p, self._pack = self._pack, None
        if p is None:
            return
        with self._cv:
            self._packs_storing += 1
        try:
            self._pool.submit(self._upload_pack, p)
        except RuntimeError:  # shutting down without draining: resumed at the next mount
            os.close(p.fd)
            self._pack_done(p)

    def _pack_done(self, p: _Pack) -> None:
        with self._cv:
            self._packs_storing -= 1
            for m in p.members:
                if self._uploads.get(m.name) is p.marker:
                    self._uploads.pop(m.name, None)
                    self._queued_at.pop(m.name, None)
                self._forget(m.name)
            self._staged_bytes -= sum(m.size for m in p.members)
            self._cv.notify_all()

    def _upload_pack(self, p: _Pack) -> None:
        """Append the index, upload, report the pack stored (``on_stored``: its members are
        recorded stored then), keep the members in the disk cache, delete the staging file."""
        try:
            try:
                tail = self.codec.pack_tail(p.name, p.members)
                os.pwrite(p.fd, tail, p.size)
                os.ftruncate(p.fd, p.size + len(tail))
            finally:
                os.close(p.fd)
            blob = p.path.read_bytes()
            self._put_retrying(p.name, blob)
            self.on_stored(ChunkRef(p.name, len(blob), crypto.sha256(blob)))
            self._drop_staged(p.path, p.name)
        except BaseException as e:  # noqa: B036 - nothing may end an upload unseen
            self.errors += 1
            if not self._abort:
                log.error("upload of pack %s failed; it stays staged and is resumed at the "
                          "next mount: %s: %s", p.name, type(e).__name__, e)
            raise
        finally:
            self._pack_done(p)

    def _resume_pack(self, path: Path, members: list[ChunkRef]) -> None:
        """After a restart: close a staged pack with the members the metadata records (what
        lies past the last of them, or between, is dropped or left unlisted) and upload it."""
        p = _Pack(path, members)
        with self._cv:
            self._packs_storing += 1
            self._staged_bytes += sum(m.size for m in members)
            for m in members:
                self._uploads[m.name] = p.marker
                self._queued_at[m.name] = time.monotonic()
        self._pool.submit(self._upload_pack, p)

    def _put_retrying(self, name: str, blob: bytes) -> None:
        """Put an object, retrying with backoff until the store takes it (or the chunk store
        is abandoned)."""
        delay = 0.2
        warned = False
        while True:
            try:
                self.store.put(name, blob)
                return
            except StoreError as e:
                if self._abort:
                    raise
                if not warned:
                    log.warning("upload of %s failed, retrying: %s", name, e)
                    warned = True
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 15.0)

    def _member_bytes(self, ref: ChunkRef, lo: int, n: int) -> bytes | None:
        """Bytes ``[lo, lo + n)`` of pack member ``ref`` from its staged pack, if there."""
        assert ref.pack is not None
        try:
            fd = os.open(self.staged_path(ref.pack), os.O_RDONLY)
        except OSError:
            return None
        try:
            data = os.pread(fd, n, ref.offset + lo)
        except OSError:
            return None
        finally:
            os.close(fd)
        return data if len(data) == n else None

    def _fetch_pack(self, ref: ChunkRef) -> None:
        """Fetch member ``ref``'s whole pack (one request) into the disk cache: the files
        written together are read together. Concurrent callers for one pack wait for one
        fetch. Errors are the caller's to see: it reads the member by range then."""
        assert ref.pack is not None and self.cache is not None
        with self._mem_lock:
            fut = self._pack_fetches.get(ref.pack)
            mine = fut is None
            if mine:
                fut = self._pack_fetches[ref.pack] = Future()
        assert fut is not None
        if not mine:
            with contextlib.suppress(Exception):
                fut.result()
            return
        try:
            if self.metrics is not None:
                self.metrics.cache_misses.inc()
            self.cache.write(ref.pack, self.store.get(ref.pack, MAX_PACK))
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._mem_lock:
                self._pack_fetches.pop(ref.pack, None)

    def _enqueue(self, ref: ChunkRef) -> None:
        """Queue the staged ``ref`` for upload. If it is uploading already, that upload puts
        the staged file once more when done (:meth:`restore` staged it again: the upload
        may have reached the store before another machine's collection deleted it)."""
        with self._cv:
            if ref.name in self._uploads:
                self._again.add(ref.name)
                return
            self._queued_at[ref.name] = time.monotonic()
            self._uploads[ref.name] = self._pool.submit(self._upload, ref)

    def _upload(self, ref: ChunkRef) -> None:
        path = self.staged_path(ref.name)
        again = 0
        try:
            while True:
                self._put_retrying(ref.name, path.read_bytes())
                with self._cv:
                    if ref.name not in self._again:
                        break
                    self._again.discard(ref.name)
                    again += 1
            self.on_stored(ref)
            self._drop_staged(path, ref.name)
        except BaseException as e:  # noqa: B036 - nothing may end an upload unseen
            self.errors += 1
            if not self._abort:
                log.error("upload of %s failed; it stays staged and is resumed at the next "
                          "mount: %s: %s", ref.name, type(e).__name__, e)
            raise
        finally:
            with self._cv:
                self._uploads.pop(ref.name, None)
                self._queued_at.pop(ref.name, None)
                self._forget(ref.name)
                self._staged_bytes -= ref.size * (1 + again + (ref.name in self._again))
                self._again.discard(ref.name)
                self._cv.notify_all()

    def _drop_staged(self, path: Path, name: str) -> None:
        """A staging file whose object is stored: into the disk cache, or deleted."""
        if self.cache is not None:
            self.cache.adopt(path, name)
        else:
            path.unlink(missing_ok=True)

    def resume(self, staged: list[ChunkRef]) -> tuple[int, int]:
        """After a restart: re-queue the staged objects the metadata knows; delete stray files
        (sealed but never committed, or already uploaded). Returns (re-queued, deleted)."""
        known = {r.name.replace("/", "_"): r for r in staged if r.pack is None}
        packs: dict[str, list[ChunkRef]] = {}
        for r in staged:
            if r.pack is not None:
                packs.setdefault(r.pack, []).append(r)
        n = stray = 0
        for f in self.staging.iterdir():
            members = packs.get(f.name.replace("_", "/", 1))
            if members is not None:
                self._resume_pack(f, members)
                n += len(members)
                continue
            ref = known.get(f.name)
            if ref is None:
                f.unlink()
                stray += 1
                continue
            with self._cv:
                self._staged_bytes += ref.size
            self._enqueue(ref)
            n += 1
        return n, stray

    def pending(self) -> tuple[int, int]:
        """(objects, bytes) waiting for upload."""
        with self._cv:
            return len(self._uploads), self._staged_bytes

    def oldest_pending_age(self) -> float:
        """Seconds the oldest upload still waiting has been queued (0 when none)."""
        with self._cv:
            first = next(iter(self._queued_at.values()), None)
        return 0.0 if first is None else max(0.0, time.monotonic() - first)

    def memory_bytes(self) -> int:
        """Bytes of plaintext kept in memory for reading."""
        return self._mem_size

    def wait_uploaded(
        self, names: Iterable[str] | None = None, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Block until the named (default: all) staged objects are in the store."""
        wanted = None if names is None else set(names)
        with self._pack_lock:
            p = self._pack
            if p is not None and (wanted is None or any(m.name in wanted for m in p.members)):
                self._close_pack()
        while True:
            with self._cv:
                if not any(wanted is None or n in wanted for n in self._uploads):
                    return
                if progress:
                    progress(len(self._uploads), self._staged_bytes)
                self._cv.wait(timeout=0.5)

    def store_packs(self) -> None:
        """Close the open pack and wait until every closed pack is stored (or its upload
        failed): a checkpoint does this before it fixes the metadata it ships, so that the
        packs' records (``on_stored``) are in it, and the next fsync has nothing new to ship."""
        with self._pack_lock:
            self._close_pack()
        with self._cv:
            while self._packs_storing > 0:
                self._cv.wait(timeout=0.5)

    def upload_pending(self, ref: ChunkRef) -> bool:
        """Whether a staged object (or the pack of a member) still waits for (or is in) its
        upload."""
        with self._cv:
            if ref.name in self._uploads:
                return True
        return self.staged_path(ref.pack or ref.name).exists()

    def local_copy(self, ref: ChunkRef) -> bytes | None:
        """The sealed object from the staging area or the chunk cache, if it has the recorded
        size and hash (to re-upload what a store lost); None for a pack member (it is no
        object of its own)."""
        if ref.pack is not None:
            return None
        try:
            blob = read_at_most(self.staged_path(ref.name), ref.size)
            if blob is not None and ref.matches(blob):
                return blob
        except OSError:
            pass
        blob = self.cache.read(ref) if self.cache is not None else None
        return blob if blob is not None and ref.matches(blob) else None

    def member_copy(self, ref: ChunkRef) -> bytes | None:
        """A pack member's bytes from the staged pack or the chunk cache, if they have the
        recorded size and hash (to store again what a store lost: :meth:`repack`)."""
        blob = self._local_blob(ref)
        return blob if blob is not None and ref.matches(blob) else None

    def _local_blob(self, ref: ChunkRef) -> bytes | None:
        """The staged or cached object if it has the recorded size (not yet checked further)."""
        if ref.pack is not None:
            blob = self._member_bytes(ref, 0, ref.size)
            if blob is not None:
                return blob
            return self.cache.read_member(ref) if self.cache is not None else None
        try:
            blob = read_at_most(self.staged_path(ref.name), ref.size)
            if blob is not None and len(blob) == ref.size:
                return blob
        except OSError:
            pass
        return self.cache.read(ref) if self.cache is not None else None

    def release_claim(self, name: str) -> None:
        """Give back a claim from :meth:`try_claim_for_delete` without deleting."""
        self._release(name)

    # -- reading ------------------------------------------------------------------------------
    def get(self, ref: ChunkRef, keep: bool = True) -> bytes:
        """Plaintext of a chunk, verified against ``ref``; raises IntegrityError or
        StoreError naming the object. ``keep``: put a fetched object in the disk cache."""
        with self._mem_lock:
            plain = self._mem.get(ref.name)
            if plain is not None:
                self._mem.move_to_end(ref.name)
                if self.metrics is not None:
                    self.metrics.memory_hit()
                return plain
            inflight = self._prefetching.get(ref.name)
        if inflight is not None:  # being fetched ahead: wait for it instead of fetching twice
            with contextlib.suppress(CancelledError):  # (cancelled at unmount)
                inflight.result()
            with self._mem_lock:
                plain = self._mem.get(ref.name)
            if plain is not None:
                if self.metrics is not None:
                    self.metrics.memory_hit()
                return plain
        return self._load(ref, keep)

    def read_range(self, ref: ChunkRef, offset: int, length: int, keep: bool = True) -> bytes:
        """Bytes ``[offset, offset + length)`` of a chunk's plaintext for a random read: from
        the memory cache if the chunk is there, else only the segments covering them, fetched as
        one byte range (of the staged or disk-cached object if there, else of the store's) and
        authenticated, nothing cached (the chunk is not whole). A chunk read so once already,
        recently, is read whole through :meth:`get` instead, and so cached, also after the
        memory cache dropped it: random reads that come back to a chunk then find it in memory
        (or a remote store's disk cache) rather than paying a range read each. Recently: among
        the last :data:`RANGED_MEMORY` chunks so read on a remote store, where each range read
        is a request; on the local store, among the last that the memory cache could hold
        together (their sizes summed). A range read there is one pread of 16 KiB, the whole
        chunk sixteen times that: one that comes back only after more chunks than the memory
        cache holds would be evicted again before its next read, so a working set larger than
        the cache (random reads over a big file) would pay a whole chunk at nearly every read,
        while a chunk read often (the same database pages, a chunk many files share) comes
        back within it and is cached. Past the chunk's data the bytes are its padding (zeros:
        a file reads zeros there) and the answer may be cut short past the padding. Raises
        IntegrityError (a segment failing authentication, an object of another size or
        missing) or StoreError naming the object.

        A version 1 object (older vaults), or bytes that fail, are read again through
        :meth:`get` (``keep`` as there): the whole object, opened as its version byte says, so a
        segment that fails here fails there too, but a version 1 object opens (its chunk is
        then in memory, for the next reads). A whole read that fails is followed by the range
        read: a damaged segment fails only the reads that need it."""
        with self._mem_lock:
            plain = self._mem.get(ref.name)
            if plain is not None:
                self._mem.move_to_end(ref.name)
            again = ref.name in self._ranged or ref.name in self._prefetching
            if ref.name in self._ranged:  # kept: evicted from memory, it is read whole again
                self._ranged.move_to_end(ref.name)
            elif plain is None and not again:
                self._ranged[ref.name] = ref.size
                self._ranged_bytes += ref.size
                while len(self._ranged) > RANGED_MEMORY or \
                        not self.remote and self._ranged_bytes > self._mem_max:
                    self._ranged_bytes -= self._ranged.popitem(last=False)[1]
        if plain is not None:
            if self.metrics is not None:
                self.metrics.memory_hit()
            return plain[offset : offset + length]
        span = self.codec.chunk_span(ref.size, offset, length)
        if again or span is None:
            try:
                return self.get(ref, keep)[offset : offset + length]
            except IntegrityError:
                if span is None:
                    raise
                # a damaged segment, maybe elsewhere in the chunk: read the ones wanted
        if span.take == 0:
            return b""
        try:
            return self.codec.open_span(ref.name, ref.size, span, self._fetch_span(ref, span))
        except IntegrityError:
            if again:
                raise
            return self.get(ref, keep)[offset : offset + length]

    def _fetch_span(self, ref: ChunkRef, span: SegmentSpan) -> bytes:
        """The object bytes of ``span``: from the staging area or disk cache (a copy whose
        bytes fail is dropped from the cache by :meth:`get`), else a range read of the store."""
        lo, n = span.lo, span.hi - span.lo
        m = self.metrics
        if self.remote or ref.pack is not None:
            with contextlib.suppress(OSError):
                data = self._member_bytes(ref, lo, n) if ref.pack is not None else \
                    read_range_of(self.staged_path(ref.name), ref.size, lo, n)
                if data is not None:
                    return data
            data = None if self.cache is None else self.cache.read_member(ref, lo, n) \
                if ref.pack is not None else self.cache.read_range(ref, lo, n)
            if data is not None:
                if m is not None:
                    m.disk_hit()
                return data
        if m is not None:
            m.cache_misses.inc()
        try:
            if ref.pack is not None:
                return self.store.get_range(ref.pack, ref.offset + lo, n, None)
            return self.store.get_range(ref.name, lo, n, ref.size)
        except ObjectNotFound:
            raise IntegrityError(f"object {ref.pack or ref.name} is missing from the "
                                 "store") from None

    def _load(self, ref: ChunkRef, keep: bool) -> bytes:
        failed = self._failed.get(ref.name)
        if failed is not None and time.monotonic() - failed[0] < FAILED_FETCH_MEMORY:
            raise failed[1]  # the kernel retries a failed read at once: answer from memory
        try:
            plain = self._fetch(ref, keep)
        except CryptfsError as e:
            self._failed[ref.name] = (time.monotonic(), e)
            raise
        self._failed.pop(ref.name, None)
        self.remember(ref.name, plain)
        return plain

    def remember(self, name: str, plain: bytes | bytearray) -> None:
        """Keep the plaintext of chunk ``name`` in the memory cache (bounded, least recently
        used first out): one fetched, or one just stored that a small write will change
        again (then it is not read back and decrypted). ``plain`` must be that chunk's."""
        with self._mem_lock:
            if name in self._mem:
                self._mem.move_to_end(name)
                return
            self._mem[name] = bytes(plain)
            self._mem_size += len(plain)
            while self._mem_size > self._mem_max and self._mem:
                self._mem_size -= len(self._mem.popitem(last=False)[1])

    def prefetch(self, refs: list[ChunkRef], keep: bool = True) -> None:
        """Start fetching chunks that a reader will want next (``keep`` as for :meth:`get`)."""
        for ref in refs:
            with self._mem_lock:
                if ref.name in self._mem or ref.name in self._prefetching:
                    continue
                try:
                    fut = self._fetch_pool.submit(self._prefetch_one, ref, keep)
                except RuntimeError:  # shutting down
                    return
                self._prefetching[ref.name] = fut

    def _prefetch_one(self, ref: ChunkRef, keep: bool) -> None:
        try:
            self._load(ref, keep)
        except Exception:  # noqa: BLE001 - a failed prefetch is retried by the real read
            self._failed.pop(ref.name, None)
        finally:
            with self._mem_lock:
                self._prefetching.pop(ref.name, None)

    def _fetch(self, ref: ChunkRef, keep: bool) -> bytes:
        """The plaintext of ``ref`` (IntegrityError if no authentic object of the recorded size
        is there): from the staging area or cache, else the store.

        Checked by size and AEAD only, not by the recorded SHA-256 (see
        :meth:`Codec.open_chunk`): an authentic object under this name holds this plaintext."""
        m = self.metrics
        if self.remote or ref.pack is not None:  # (a member's pack may still be staged)
            blob = self._local_blob(ref)
            if blob is not None:
                try:
                    plain = self.codec.open_chunk(ref, blob)
                except IntegrityError:  # a bad local copy: drop it, read the store's
                    if self.cache is not None:
                        self.cache.discard(ref.pack or ref.name)
                else:
                    if m is not None:
                        m.disk_hit()
                    return plain
        if ref.pack is not None:
            return self._fetch_member(ref)
        if m is not None:
            m.cache_misses.inc()
        opened: list[bytes] = []

        def authentic(blob: bytes) -> bool:  # the store calls it on one copy at a time
            try:
                opened.append(self.codec.open_chunk(ref, blob))
            except IntegrityError:
                return False
            return True

        try:
            # a bad copy: IntegrityError, or with several stores another copy (and a repair)
            blob = self.store.get(ref.name, ref.size, check=authentic)
        except ObjectNotFound:
            if m is not None:
                m.integrity_errors.inc()
            raise IntegrityError(f"object {ref.name} is missing from the store") from None
        except IntegrityError:
            if m is not None:
                m.integrity_errors.inc()
            raise
        if keep and self.cache is not None:
            self.cache.write(ref.name, blob)
        return opened[-1]

    def _fetch_member(self, ref: ChunkRef) -> bytes:
        """A pack member not found locally: its whole pack into the disk cache (then the
        member from there), else (no cache, or that failed) the member's own byte range."""
        assert ref.pack is not None
        if self.cache is not None:
            try:
                self._fetch_pack(ref)
            except CryptfsError as e:
                log.debug("whole fetch of pack %s failed (%s); reading member %s alone",
                          ref.pack, e, ref.name)
            blob = self.cache.read_member(ref)
            if blob is not None:
                try:
                    return self.codec.open_chunk(ref, blob)
                except IntegrityError:
                    self.cache.discard(ref.pack)
        try:
            blob = self.store.get_range(ref.pack, ref.offset, ref.size, None)
        except ObjectNotFound:
            if self.metrics is not None:
                self.metrics.integrity_errors.inc()
            raise IntegrityError(f"object {ref.pack} is missing from the store") from None
        try:
            return self.codec.open_chunk(ref, blob)
        except IntegrityError:
            if self.metrics is not None:
                self.metrics.integrity_errors.inc()
            raise

    # -- deleting -----------------------------------------------------------------------------
    def delete_claimed(self, name: str) -> None:
        """Delete an object claimed with :meth:`try_claim_for_delete`, then release it."""
        try:
            self.store.delete(name)
            with self._mem_lock:
                dropped = self._mem.pop(name, None)
                if dropped is not None:
                    self._mem_size -= len(dropped)
            if self.cache is not None:
                self.cache.discard(name)
        finally:
            self._release(name)

    def close(self, drain: bool = True) -> None:
        """Stop the workers. With ``drain`` wait for every upload first; without, abandon them
        (staged files stay and are resumed at the next mount)."""
        if drain:
            self.wait_uploaded()
        self._closing = True
        self._abort = not drain
        with self._cv:
            self._cv.notify_all()
        self._seal_pool.shutdown(wait=True)
        self._pool.shutdown(wait=drain)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
