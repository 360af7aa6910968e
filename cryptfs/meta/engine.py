"""The metadata engine interface: what the layers above need from a metadata database.

Modelled on JuiceFS's ``pkg/meta`` engine interface, in two levels. The namespace operations
(mknod, link, unlink, rmdir, rename, setattr, xattrs, readdir; lookup and getattr are
:meth:`MetaEngine.lookup_stat`, :meth:`MetaEngine.lookup` and :meth:`MetaEngine.get_inode`) are
each one atomic transaction that checks its POSIX preconditions against the database, keeps link
counts and libfuse's hidden entries, raises ``OSError(errno)`` and returns a :class:`Changed`;
they are written once, over the row-level primitives below, in
:class:`cryptfs.meta.namespace.NamespaceOps`, which an engine inherits. The hot ones use compound
primitives (:meth:`MetaEngine.touch_inode`, ``set_attrs``, ``add_dentry_if_absent``,
``pop_dentry``, ``lookup_stat``) that NamespaceOps builds from a read and a write and that an
engine may do in one statement each (the SQLite engine does: a file's create is then three
statements, a cold stat one). Transaction nesting is :class:`Transactions`, which engines share.
The filesystem layer (:mod:`cryptfs.fs`) keeps permissions, caches, open files and
group commit; the other primitives serve the write path, the vault, fsck and the ledger inside
:meth:`MetaEngine.transaction` blocks. An engine stores rows and makes each block atomic.
Every method may raise
:class:`cryptfs.errors.MetaError` (an errno-carrying one-line error) when the database fails; a
block that raises is rolled back whole.

Durability: a block is committed when it ends (or, with ``commit=False``, with the next commit);
a committed block survives a crash of the process; :meth:`MetaEngine.sync` makes every committed
block survive power loss. The engine is used by one thread at a time (the caller holds the
filesystem lock); its background work (the SQLite WAL checkpointer) uses its own connection,
and so does a :class:`Frozen` state that a checkpoint reads without the lock (PostgreSQL).

Names are bytes (any byte but ``/`` and NUL), inode numbers positive integers (``ROOT_INO`` is
the root directory), object names the store names of :mod:`cryptfs.format.layout`.

Longer than ~400 lines: it is the one interface every engine implements and the conformance
suite (tests/test_35_meta_engine.py) runs against, each method with its contract; splitting it
would scatter the contracts an engine author must read together.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, TypeVar

from cryptfs.errors import MetaError
from cryptfs.format.codec import ChunkRef
from cryptfs.meta.locks import Held

ROOT_INO = 1

# a ledger row in storage order: seq, time_ns, op, name, size, sha256, prev, hash
LedgerRow = tuple[int, int, str, str, int, bytes, bytes, bytes]


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    target: bytes | None = None


@dataclass
class Changed:
    """What a namespace operation changed, for the caches of the layer above: the state after
    it of every inode it changed (``inodes``), the inodes it deleted (``removed``), the names it
    set to an inode or removed (``entries``: None), and the inode it made or named (``ino``)."""

    ino: int = 0
    inodes: dict[int, Inode] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)
    entries: dict[tuple[int, bytes], int | None] = field(default_factory=dict)


T = TypeVar("T")


class Frozen(Protocol):
    """One committed state of a metadata database, fixed by :meth:`MetaEngine.freeze`: read
    by one thread, without the filesystem lock, while the engine is used meanwhile, until
    :meth:`close`. Each method gives what the engine's method of that name gave in that
    state, however often it is called."""

    ledger_seq: int
    """The sequence number of the newest ledger entry in this state (0: none)."""

    def image(self, leave_out: Callable[[ChunkRef], bool] | None = None) -> bytes:
        """This state as :meth:`MetaEngine.image` gives it (``leave_out`` likewise)."""

    def staged(self) -> list[ChunkRef]:
        """The objects in state ``staged`` (:meth:`MetaEngine.objects_in_state`)."""

    def unreferenced_objects(self) -> list[ChunkRef]:
        """:meth:`MetaEngine.unreferenced_objects` in this state: what a collection after a
        checkpoint of this image may delete (the image references none of it)."""

    def objects_named(self, *prefixes: str) -> list[ChunkRef]:
        """:meth:`MetaEngine.objects_named` in this state (an engine that reads every object
        row for it reads them here, without the filesystem lock)."""

    def close(self) -> None:
        """Let the state go (nothing else may be called after)."""


class MetaEngine(Protocol):
    """One vault's metadata: inodes, directory entries, chunk maps, objects with reference
    counts and their copies, xattrs, the ledger's rows and key/value state."""

    # -- transactions and durability -----------------------------------------------------------
    def transaction(self, commit: bool = True) -> AbstractContextManager[None]:
        """A block whose writes commit together when it ends, or roll back together if it
        raises. Blocks nest (inner ones join the outer). ``commit=False``: an outermost block
        leaves its writes for the next commit."""

    def commit(self) -> None:
        """Commit writes made outside a block (and run the commit listener); a commit the
        database refuses rolls back whole (running the rollback actions) and raises."""

    def undo_on_rollback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the writes made since the last commit are rolled back."""

    def sync(self) -> None:
        """Commit, then make every committed block durable against power loss."""

    def image(self, leave_out: Callable[[ChunkRef], bool] | None = None) -> bytes:
        """Commit; the committed database as one image, the metadata snapshot stored in the
        vault (opening an engine on it gives the same rows). Begins a shipment ending at
        this image (see :meth:`shipped`). With ``leave_out`` (a ``shared`` engine: other
        machines' uploads may not have finished), each staged object it says so of is left
        out with the chunk map entries naming it (holes in the image), and so are objects
        being collected; an engine that is not shared stages only its own uploads, which
        its caller waits for, and takes None only."""

    def freeze(self) -> Frozen:
        """Commit; fix the committed database as it is now, for a full checkpoint to read
        while the engine goes on: the caller holds the filesystem lock for this call, not
        for the :class:`Frozen` it returns (its image, and the values a checkpoint records
        with it, are all of that one state, whatever is committed meanwhile). Begins a
        shipment ending at that state, as :meth:`image` does. An engine that cannot read a
        committed state apart from its own connection reads all of it in this call."""

    def snapshot(self) -> AbstractContextManager[None]:
        """Commit; a block of reads that all see one committed state, whatever other
        machines commit meanwhile (a check while they are mounted); it writes nothing."""

    def changes(self) -> bytes | None:
        """Commit; what was committed since the last shipment, as one segment (applied to
        the shipment's image and the segments before it, it gives the committed database),
        and begin a shipment ending here. None if there is no shipment to continue (none
        was shipped, or the engine cannot tell what changed): the caller ships an
        :meth:`image` instead. An engine without incremental shipping returns None."""

    def shipped(self) -> None:
        """The shipment begun by the last :meth:`image` or :meth:`changes` is durable in the
        store: the next :meth:`changes` continues from its end. Without this call the next
        one continues from the shipment before (the begun one is forgotten)."""

    def change_count(self) -> int:
        """A number that grows with every write; two equal readings mean nothing was
        written in between."""

    def close(self) -> None:
        """Commit and release the database."""

    # -- namespace operations (cryptfs.meta.namespace.NamespaceOps; contracts there) -----------
    def atomically(self, fn: Callable[[], T], commit: bool = True) -> T:
        """Run ``fn`` in one transaction (an engine whose transactions conflict retries it)."""

    def mknod(self, parent: int, name: bytes, node: Inode,
              xattrs: Mapping[bytes, bytes] | None = None, commit: bool = True,
              known: Mapping[int, Inode] | None = None) -> Changed: ...
    def link(self, ino: int, parent: int, name: bytes,
             known: Mapping[int, Inode] | None = None) -> Changed: ...
    def unlink(self, parent: int, name: bytes, keep: Collection[int] = (),
               known: Mapping[int, Inode] | None = None) -> Changed: ...
    def rmdir(self, parent: int, name: bytes, keep: Collection[int] = ()) -> Changed: ...
    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0,
               keep: Collection[int] = ()) -> Changed: ...
    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, xattrs: Mapping[bytes, bytes | None] | None = None,
                commit: bool = True) -> Changed: ...
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> Changed: ...
    def removexattr(self, ino: int, name: bytes) -> Changed: ...
    def readdir(self, ino: int) -> list[tuple[bytes, int, int]]: ...
    def drop_unlinked(self, ino: int, unhold: bool = False) -> Changed: ...
    def recover(self) -> int: ...

    # -- several machines (the PostgreSQL engine; the SQLite engine has one machine) ----------
    shared: bool
    """Whether other machines write this database too (the layer above bounds its caches)."""

    def hold(self, ino: int) -> None:
        """This machine has ``ino`` open (written, committed with the next commit)."""

    def open_inode(self, ino: int) -> Inode | None:
        """An open of ``ino`` by this machine on a vault other machines write: the inode as
        committed, held (:meth:`hold`), the hold committed with what the open transaction
        wrote (other machines see it once this returns); None, with nothing held, if there
        is no such inode. One round trip where the engine can."""

    def unhold(self, ino: int) -> None:
        """This machine closed ``ino`` (written, committed with the next commit)."""

    def held(self, ino: int) -> bool:
        """Whether any machine holds ``ino`` open (its last name going does not delete it)."""

    def live_sessions(self) -> int:
        """How many other machines' sessions are live (0 for an engine of one machine)."""

    def session_horizons(self, own: bool = False) -> list[float]:
        """The horizons other machines' live sessions published (wall-clock times before
        which every object they wrote is recorded: ``ChunkStore.horizon``; 0.0 for a
        session that published none), with ``own`` this machine's too. Empty for an engine
        of one machine."""

    def lock_ledger(self) -> None:
        """In a transaction about to append to the ledger: wait for other machines'."""

    # -- file locks shared by the machines (an engine with ``shared``; cryptfs.meta.locks) ----
    # Unlike the calls above these may be called from any thread without the filesystem's lock
    # (a lock call must not wait for file operations, nor they for it): an engine serialises
    # them itself, apart from its other work, and commits each on its own.
    def set_lock(self, ino: int, owner: int, kind: str, ltype: int, start: int, end: int,
                 pid: int) -> Held | None:
        """Owner ``owner`` of this machine sets a lock of ``kind`` (POSIX or FLOCK) and
        ``ltype`` (F_UNLCK: unlocks) over ``[start, end]`` of ``ino`` (see
        :func:`cryptfs.meta.locks.apply`), at once and committed, unless a lock another owner
        holds (on any machine whose session is live) conflicts: then nothing changes and that
        lock is returned. MetaError (ENOLCK) when the locks cannot be reached or this
        machine's session expired."""

    def test_lock(self, ino: int, owner: int, kind: str, ltype: int, start: int,
                  end: int) -> Held | None:
        """The lock of another owner (on any machine whose session is live) that a lock of
        ``ltype`` over ``[start, end]`` would conflict with (F_GETLK), or None."""

    # -- key/value state -----------------------------------------------------------------------
    def get_state(self, key: str) -> str | None: ...
    def set_state(self, key: str, value: str) -> None: ...

    # -- inodes --------------------------------------------------------------------------------
    def get_inode(self, ino: int) -> Inode | None: ...

    def touch_inode(self, ino: int, now_ns: int, nlink: int = 0, mtime: bool = False,
                    known: Inode | None = None) -> Inode | None:
        """Add ``nlink`` to the link count of ``ino`` and set its ctime (with ``mtime`` its
        mtime too) to ``now_ns``; the inode as it is after (None: no such inode, nothing
        written). NamespaceOps has it as a read and a write; an engine may do it in one.
        ``known``: the row as the caller knows it is in the database (an engine that is not
        ``shared``: every write is the caller's); an engine that is not shared may write it
        touched, whole, instead of reading the row (``known`` is left as it was); a shared
        engine reads the row."""

    def set_attrs(self, ino: int, now_ns: int, perms: int | None = None,
                  uid: int | None = None, gid: int | None = None, atime_ns: int | None = None,
                  mtime_ns: int | None = None) -> Inode | None:
        """Set the attributes given (``perms``: the permission bits, the type stays) and the
        ctime to ``now_ns``; the inode as it is after (None: no such inode, nothing written).
        NamespaceOps has it as a read and a write; an engine may do it in one."""

    def insert_inode(self, node: Inode) -> int:
        """Add an inode (``node.ino`` 0: the engine picks the number); returns its number."""

    def update_inode(self, node: Inode) -> None: ...

    def delete_inode(self, ino: int) -> list[str]:
        """Remove an inode with its xattrs, chunk map and any names left pointing at it;
        returns the objects its chunk map referenced (their counts are decremented)."""

    def orphan_inodes(self) -> list[int]: ...
    def count_inodes(self) -> int: ...

    # -- directory entries ---------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int | None: ...

    def lookup_stat(self, parent: int, name: bytes, chunk_size: int,
                    unit: int) -> tuple[Inode, int] | None:
        """What a stat of a name needs: the inode ``name`` in ``parent`` names and the bytes
        its chunks take as :meth:`allocated` counts them (0 unless a regular file); None if
        there is no such entry (or a dangling one). NamespaceOps has it as :meth:`lookup`,
        :meth:`get_inode` and :meth:`allocated`; an engine may do it in one query."""

    def stat_dir(self, parent: int, chunk_size: int,
                 unit: int) -> list[tuple[bytes, Inode, int]]:
        """:meth:`lookup_stat` of every entry of ``parent`` at once: ``(name, inode,
        allocated)`` in no particular order (dangling entries left out). NamespaceOps has it as
        :meth:`list_dir` and a lookup_stat per entry; an engine may do it in a few queries for
        the whole directory."""

    def add_dentry(self, parent: int, name: bytes, ino: int) -> None: ...

    def add_dentry_if_absent(self, parent: int, name: bytes, ino: int) -> bool:
        """Add the entry unless ``name`` exists in ``parent``; whether it was added (False:
        nothing written). NamespaceOps has it as a lookup and an insert."""

    def remove_dentry(self, parent: int, name: bytes) -> None: ...

    def pop_dentry(self, parent: int, name: bytes) -> int | None:
        """Remove the entry; the inode it named (None: there was none, nothing written).
        NamespaceOps has it as a lookup and a delete."""

    def list_dir(self, parent: int, after: bytes | None = None,
                 limit: int | None = None) -> list[tuple[bytes, int, int]]:
        """``(name, ino, mode)`` in name order, after ``after``, at most ``limit``."""

    def has_children(self, parent: int, ignore_prefix: bytes | None = None) -> bool: ...
    def hidden_dentries(self, prefix: bytes) -> list[tuple[int, bytes, int]]:
        """``(parent, name, ino)`` of every entry whose name starts with ``prefix``."""

    def names_of(self, ino: int) -> list[tuple[int, bytes]]: ...
    def parent_of(self, ino: int) -> int | None: ...
    def paths_of(self, ino: int, limit: int = 3) -> list[str]: ...

    # -- chunk maps ----------------------------------------------------------------------------
    def get_blocks(self, ino: int, lo: int, hi: int) -> dict[int, ChunkRef]: ...

    def set_block(self, ino: int, idx: int, ref: ChunkRef | None, staged: bool) -> str | None:
        """Point chunk ``idx`` at ``ref`` (None: a hole), adjusting reference counts; returns
        the object referenced before, if any."""

    def remove_blocks_from(self, ino: int, first_idx: int) -> list[str]: ...
    def remove_blocks_range(self, ino: int, lo: int, hi: int) -> list[str]: ...

    def journal_chunk(self, ino: int, idx: int, seq: int, off: int, sealed: bytes) -> None:
        """Record journal row ``seq`` of chunk ``idx`` of ``ino``: its bytes from ``off`` on
        are those sealed in ``sealed``, as many as it holds (the journal, docs/FORMAT.md 5.3:
        an fsync's bytes not yet sealed into a chunk), applied after the rows of lower
        ``seq`` on the chunk its map entry names. The rows go with the next change of that
        chunk's map entry (:meth:`set_block`, :meth:`remove_blocks_from`,
        :meth:`remove_blocks_range`) or the file's removal. Durable with the transaction.
        An engine whose fsyncs store whole chunks raises MetaError."""

    def journaled(self) -> list[tuple[int, int, int, int, bytes]]:
        """Every journal row as (ino, idx, seq, off, sealed), by inode, chunk and seq."""
    def next_hole(self, ino: int, idx: int) -> int: ...
    def next_block(self, ino: int, idx: int) -> int | None: ...
    def allocated(self, ino: int, chunk_size: int, unit: int) -> int: ...
    def first_chunks_after(self, parent: int, name: bytes,
                           count: int) -> list[tuple[bytes, ChunkRef]]: ...

    # -- objects and reference counts -------------------------------------------------------------
    def reference(self, ref: ChunkRef, staged: bool) -> None: ...
    def get_object(self, name: str) -> tuple[ChunkRef, int, str] | None: ...
    def mark_stored(self, name: str) -> None: ...
    def objects_in_state(self, st: str) -> list[ChunkRef]: ...
    def unreferenced_objects(self) -> list[ChunkRef]: ...
    def drop_object_if_unreferenced(self, name: str) -> bool: ...
    def claim_object(self, name: str, new: bool = False) -> bool:
        """In the open transaction, before a commit references an object it did not store
        itself (a deduplicated chunk): whether the object's row is live (recorded, not being
        collected). Then it stays until the commit (on a shared engine the row is locked until
        then: a collection waits and sees the reference). False: the object may be gone from
        the store; the caller stores it again before referencing it. ``new``: the caller
        stored the object itself (a write not deduplicated against a record): no row is
        fine too, only a row collected since (a tombstone, or one being collected) is not."""
    def claim_objects(self, names: Mapping[str, bool]) -> set[str]:
        """:meth:`claim_object` of each name (the value: ``new``) at once; the names whose
        objects are not live (the caller stores them again)."""
    def bury_object(self, name: str, size: int) -> bool:
        """In the open transaction, before ``cryptfs gc`` deletes an object the metadata does
        not record: on a shared engine, record it as deleted (a tombstone, committed before
        the deletion) so that another machine's commit referencing it stores it again.
        False: a row for it exists meanwhile (recorded: not garbage); nothing written."""
    def drop_tombstones(self) -> int:
        """Forget the tombstones no live session can need any more (how many went); 0 on an
        engine of one machine (it has none)."""
    def collect_objects(self, refs: list[ChunkRef],
                        delete: Callable[[list[ChunkRef]], set[str]]) -> list[ChunkRef]:
        """Collect the objects of ``refs`` that are still unreferenced: ``delete(some)``
        deletes those from the store, all at once (concurrently, if it likes), and returns
        the names it deleted (any other stays, recorded as unreferenced); their rows go.
        Returns the objects deleted; commits. Never deletes an object that a commit
        references, nor lets a commit find its row gone before the object is gone from the
        store (see :meth:`claim_object`). On an engine other machines write (``shared``),
        ``delete`` runs in the transaction that removes the rows, with them locked: what it
        writes to the engine commits with their removal, before any commit that stores one
        of those objects again."""
    def all_objects(self) -> list[tuple[ChunkRef, int, str]]: ...

    # -- packs (docs/FORMAT.md 4.3; an engine whose vaults write none returns none) -------------
    def record_pack(self, ref: ChunkRef) -> None:
        """Pack ``ref`` reached the store: its row (stored; kept while member rows name it,
        see :meth:`empty_packs`) and its members' rows marked stored."""
    def pack_members(self, pack: str) -> list[ChunkRef]:
        """The object rows stored in ``pack`` (any state, any reference count)."""
    def empty_packs(self, packs: Collection[str]) -> list[ChunkRef]:
        """The recorded packs among ``packs`` that no object row names any more."""
    def move_to_pack(self, ref: ChunkRef) -> None:
        """Object ``ref.name`` now lies in ``ref.pack`` at ``ref.offset`` (repacked; staged
        until that pack is recorded by :meth:`record_pack`)."""
    def packs_in_use(self) -> set[str]:
        """Every pack an object row names (recorded or not: a crash can leave the pack's own
        row unwritten)."""
    def objects_named(self, *prefixes: str) -> list[ChunkRef]:
        """Recorded objects whose name starts with one of ``prefixes`` (non-empty), without
        reading the others where the engine can (several prefixes: one read of them all
        where it cannot)."""
    def object_users(self, name: str) -> list[int]: ...
    def stored_bytes(self) -> int: ...
    def forget_object(self, name: str) -> None: ...
    def forget_deleted_object(self, name: str) -> None: ...
    def unreference_object(self, ref: ChunkRef) -> None: ...

    # -- copies on the stores of a replicated vault ------------------------------------------------
    def record_copy(self, name: str, store: str, st: str) -> bool: ...
    def copies_of(self, name: str) -> dict[str, str]: ...
    def all_copies(self) -> dict[str, dict[str, str]]: ...
    def pending_copies(self, limit: int = 1000) -> list[tuple[ChunkRef, str]]: ...
    def pending_deletes(self) -> list[tuple[str, str]]: ...
    def forget_copy(self, name: str, store: str) -> None: ...
    def pending_copy_counts(self) -> dict[str, int]: ...
    def forget_store_copies(self, store: str) -> None: ...
    def forget_stray_copies(self) -> None: ...

    # -- xattrs --------------------------------------------------------------------------------
    def get_xattr(self, ino: int, name: bytes) -> bytes | None: ...
    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None: ...
    def list_xattrs(self, ino: int) -> list[bytes]: ...
    def remove_xattr(self, ino: int, name: bytes) -> bool: ...
    def inodes_with_xattrs(self) -> set[int]: ...

    # -- the ledger's rows (the chain is computed by cryptfs.meta.ledger) -----------------------
    def ledger_last(self) -> LedgerRow | None: ...
    def ledger_get(self, seq: int) -> LedgerRow | None: ...
    def ledger_last_named(self, op: str, prefix: str) -> LedgerRow | None: ...
    def ledger_page(self, after: int, limit: int) -> list[LedgerRow]: ...
    def ledger_newest(self, n: int) -> list[LedgerRow]: ...
    def ledger_count(self) -> int: ...
    def ledger_insert(self, rows: list[LedgerRow]) -> None: ...
    def ledger_truncate_after(self, seq: int) -> None: ...

    # -- check and repair (fsck) -----------------------------------------------------------------
    def inode_modes(self) -> dict[int, tuple[int, int]]: ...
    def all_dentries(self) -> list[tuple[int, bytes, int]]: ...
    def all_blocks(self) -> list[tuple[int, int, str]]: ...
    def object_states(self) -> dict[str, tuple[int, str, int]]: ...
    def set_nlink(self, ino: int, nlink: int) -> None: ...
    def set_refcount(self, name: str, refcount: int) -> None: ...
    def drop_block(self, ino: int, idx: int) -> None: ...
    def drop_inode_rows(self, ino: int) -> None: ...


class Transactions:
    """The nesting of :meth:`MetaEngine.transaction` blocks and the rollback bookkeeping,
    shared by the engines. An engine sets ``_depth`` to 0, ``_undo`` to an empty list and
    ``on_rollback``, and supplies :meth:`commit`, :meth:`_rollback_db` and :meth:`_db_error`."""

    _depth: int  # nesting of transaction() blocks
    _undo: list[Callable[[], None]]  # see undo_on_rollback
    on_rollback: Callable[[], None] | None

    def commit(self) -> None:
        raise NotImplementedError

    def _rollback_db(self) -> None:
        """Roll back the database's open transaction (nothing else)."""
        raise NotImplementedError

    def _db_error(self, e: BaseException) -> MetaError | None:
        """The one-line MetaError for ``e`` if it is an error of the database, else None."""
        raise NotImplementedError

    def transaction(self, commit: bool = True) -> _Transaction:
        """Commit on success, roll back on error (a database error is raised as a one-line
        MetaError). Nests: inner blocks join the outer one, and the outermost block commits
        when it ends, with whatever reads or writes began a transaction before it. With
        ``commit=False`` an outermost block leaves its writes for the next commit."""
        return _Transaction(self, commit)

    def undo_on_rollback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the writes made since the last commit are rolled back (to undo what
        the caller keeps in memory about them); forgotten once they are committed."""
        self._undo.append(fn)

    def _rolled_back(self) -> None:
        """Roll back, and tell those who kept state about the lost writes."""
        self._rollback_db()
        undo, self._undo = self._undo, []
        for fn in reversed(undo):
            fn()
        if self.on_rollback is not None:
            self.on_rollback()


class _Transaction:
    """A :meth:`Transactions.transaction` block: a class, not a generator, since every write
    to the metadata runs in a few (a small file's create and close: four)."""

    __slots__ = ("_commit", "_eng", "_outer")

    def __init__(self, eng: Transactions, commit: bool) -> None:
        self._eng = eng
        self._commit = commit
        self._outer = False

    def __enter__(self) -> None:
        eng = self._eng
        self._outer = not eng._depth
        eng._depth += 1

    def __exit__(self, typ: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> bool:
        eng = self._eng
        if not self._outer:
            eng._depth -= 1
            return False
        eng._depth = 0
        if e is not None:
            eng._rolled_back()
            err = eng._db_error(e)
            if err is not None:
                raise err from e
            return False
        if self._commit:
            eng.commit()
        return False
