"""The ledger: a hash chain over every object stored in or deleted from the store.

Entry ``seq`` (1, 2, ...) hashes a canonical encoding of its fields and the previous entry's
hash (32 zero bytes before the first entry); see docs/FORMAT.md for the byte layout and a test
vector. The head (sequence and hash) is authenticated with HMAC-SHA256 under the ledger sub-key,
so only the key holder can produce a head that checkpoints and the local head file accept.

Fork consistency (a ledger several machines append to, in a database they do not trust): once
told the head it verified (:meth:`Ledger.trust`, at mount, after the anchors checked the whole
chain), a :class:`Ledger` checks every newer head it reads from the database against it, walking
only the entries added since (:meth:`Ledger.check`): a database rolled back, a ledger truncated,
or a history other than the one this machine saw is an IntegrityError, for good (the ledger
stays forked: every later append and check refuses, the head stays the one verified), and
``on_fork`` hears it once.
"""

from __future__ import annotations

import hmac
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptfs.errors import IntegrityError
from cryptfs.format import crypto
from cryptfs.format.layout import CHECKPOINT_PREFIX
from cryptfs.meta import MetaEngine

GENESIS = b"\0" * 32
ENTRY_TAG = b"cryptfs-ledger-v1\0"
HEAD_TAG = b"cryptfs-head-v1\0"
OPS = ("put", "del", "accept", "copy", "lost", "store-add", "store-remove", "config")


def op_kind(op: str) -> str:
    """The operation without its store: ``copy@1a2b3c4d`` -> ``copy``."""
    return op.partition("@")[0]


def op_store(op: str) -> str:
    """The store id an operation names (``copy@1a2b3c4d`` -> ``1a2b3c4d``), or ''."""
    return op.partition("@")[2]


@dataclass(frozen=True)
class Entry:
    seq: int
    time_ns: int
    op: str
    name: str
    size: int
    sha256: bytes
    prev: bytes
    hash: bytes

    def row(self) -> tuple[int, int, str, str, int, bytes, bytes, bytes]:
        """The fields in storage order (:data:`cryptfs.meta.sqlite.LedgerRow`)."""
        return (self.seq, self.time_ns, self.op, self.name, self.size, self.sha256, self.prev,
                self.hash)

    def follows(self, seq: int, prev: bytes) -> bool:
        """Whether this entry continues a chain whose last entry has sequence ``seq`` (0: none)
        and hash ``prev``, and its own hash is that of its fields."""
        return self.seq == seq + 1 and self.prev == prev and self.hash == entry_hash(
            self.seq, self.time_ns, self.op, self.name, self.size, self.sha256, self.prev)

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "time_ns": self.time_ns,
            "op": self.op,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256.hex(),
            "prev": self.prev.hex(),
            "hash": self.hash.hex(),
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Entry:
        return cls(
            int(d["seq"]),
            int(d["time_ns"]),
            str(d["op"]),
            str(d["name"]),  # type: ignore[arg-type]
            int(d["size"]),
            bytes.fromhex(str(d["sha256"])),  # type: ignore[arg-type]
            bytes.fromhex(str(d["prev"])),
            bytes.fromhex(str(d["hash"])),
        )


def _lp(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def encode_entry(
    seq: int, time_ns: int, op: str, name: str, size: int, sha256: bytes, prev: bytes
) -> bytes:
    """The canonical bytes an entry's hash covers."""
    return (
        ENTRY_TAG
        + struct.pack(">QQ", seq, time_ns)
        + _lp(op.encode())
        + _lp(name.encode())
        + struct.pack(">Q", size)
        + sha256
        + prev
    )


def entry_hash(
    seq: int, time_ns: int, op: str, name: str, size: int, sha256: bytes, prev: bytes
) -> bytes:
    return crypto.sha256(encode_entry(seq, time_ns, op, name, size, sha256, prev))


def head_mac(key: bytes, seq: int, head: bytes) -> bytes:
    return crypto.mac(key, HEAD_TAG + struct.pack(">Q", seq) + head)


def check_head_mac(key: bytes, seq: int, head: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(head_mac(key, seq, head), tag)


class Ledger:
    """Append and read entries in the vault database (the engine stores the rows; the chain
    is computed and checked here). Callers serialise (the filesystem lock)."""

    def __init__(self, meta: MetaEngine, key: bytes,
                 on_fork: Callable[[str], None] | None = None) -> None:
        """``on_fork(why)`` hears, once, that the database's ledger does not extend the head
        this machine verified (see the module doc; only after :meth:`trust`)."""
        self.meta = meta
        self.key = key
        self.on_fork = on_fork
        self._head: Entry | None = None
        self._loaded = False
        # the newest entry this machine verified (None: nothing is checked), the newest
        # checkpoint put at or before it, and why the ledger forked (for good)
        self.verified: Entry | None = None
        self.checkpoint = ""
        self.forked: str | None = None
        self._tracking = False

    def head(self) -> Entry | None:
        """The newest entry; read from the database after :meth:`invalidate` (with
        :meth:`trust` given, checked to extend the verified head: IntegrityError if not;
        once forked, the verified head, and nothing more is read)."""
        if self.forked is not None:
            return self.verified
        if not self._loaded:
            try:
                row = self.meta.ledger_last()
            except IntegrityError:
                if self._tracking:
                    raise self._fork("has a newest entry that fails authentication") from None
                raise
            head = Entry(*row) if row else None
            if self._tracking:
                self._extend(head)
            self._head = head
            self._loaded = True
        return self._head

    # -- fork consistency ----------------------------------------------------------------------
    def trust(self, head: Entry | None, checkpoint: str) -> None:
        """From now on every head read must extend ``head`` (this machine verified the chain
        up to it; ``checkpoint``: the newest checkpoint put recorded up to it)."""
        self.verified, self.checkpoint, self._tracking = head, checkpoint, True

    def check(self) -> Entry | None:
        """Read the database's newest entry and check that it extends the verified head (only
        the entries added since are read). IntegrityError (for good) if it does not."""
        if self.forked is not None:
            raise IntegrityError(self.forked)
        self.invalidate()
        return self.head()

    def _fork(self, why: str) -> IntegrityError:
        self.forked = (f"the ledger in the metadata database {why}: it was rolled back, "
                       "truncated or shows this machine another history")
        if self.on_fork is not None:
            self.on_fork(self.forked)
        return IntegrityError(self.forked)

    def _extend(self, head: Entry | None) -> None:
        """Check that ``head`` (the database's newest entry) extends :attr:`verified`, reading
        the entries between them (none when ``head`` is the next one: two machines appending
        in turn cost no extra query); then it is the verified head."""
        v = self.verified
        if v is None:
            start, prev = 0, GENESIS
        elif head is None or head.seq < v.seq:
            raise self._fork(f"ends at sequence {head.seq if head else 0}, but this machine "
                             f"verified sequence {v.seq}")
        elif head.seq == v.seq:
            if head.hash != v.hash:
                raise self._fork(f"differs at sequence {v.seq} from what this machine verified")
            return
        else:
            start, prev = v.seq, v.hash
        if head is None:
            return
        last, ck = v, self.checkpoint
        walked: list[Entry] = []  # the entries between the verified one and ``head``
        try:
            while start < head.seq - 1:
                rows = self.meta.ledger_page(start, min(5000, head.seq - 1 - start))
                if not rows:
                    break
                walked.extend(Entry(*r) for r in rows)
                start = walked[-1].seq
        except IntegrityError:
            raise self._fork(f"has an entry after sequence {start} that fails "
                             "authentication") from None
        for e in [*walked, head]:
            if not e.follows(last.seq if last else 0, prev):
                raise self._fork(f"is broken at sequence {e.seq}, after the sequence "
                                 f"{last.seq if last else 0} this machine verified")
            if e.op == "put" and e.name.startswith(CHECKPOINT_PREFIX):
                ck = e.name
            last, prev = e, e.hash
        self.verified, self.checkpoint = head, ck

    def invalidate(self) -> None:
        self._loaded = False

    def append(self, op: str, name: str, size: int, sha256: bytes) -> Entry:
        """Add an entry in the current transaction (or its own)."""
        assert op_kind(op) in OPS
        if self.forked is not None:  # never extend a chain this machine cannot trust
            raise IntegrityError(self.forked)
        if self.meta.shared:  # other machines append too: wait for them, read the head
            with self.meta.transaction(commit=False):
                self.meta.lock_ledger()
            self._loaded = False
        head = self.head()
        seq = head.seq + 1 if head else 1
        prev = head.hash if head else GENESIS
        now = time.time_ns()
        h = entry_hash(seq, now, op, name, size, sha256, prev)
        e = Entry(seq, now, op, name, size, sha256, prev, h)
        with self.meta.transaction():
            self.meta.ledger_insert([e.row()])
            self.meta.undo_on_rollback(self.invalidate)  # the cached head must go with it
        self._head = e
        if self._tracking:  # it extends the verified head (read above): verified too
            self.meta.undo_on_rollback(self._unverify(self.verified, self.checkpoint))
            self.verified = e
            if op == "put" and name.startswith(CHECKPOINT_PREFIX):
                self.checkpoint = name
        return e

    def _unverify(self, verified: Entry | None, checkpoint: str) -> Callable[[], None]:
        """What puts the verified head back if the transaction of an append rolls back."""

        def undo() -> None:
            self.verified, self.checkpoint = verified, checkpoint

        return undo

    def add_entries(self, entries: list[Entry]) -> None:
        """Insert entries taken from a checkpoint (restore); they must continue the chain."""
        with self.meta.transaction():
            self.meta.ledger_insert([e.row() for e in entries])
        self.invalidate()

    def entry(self, seq: int) -> Entry | None:
        row = self.meta.ledger_get(seq)
        return Entry(*row) if row else None

    def entries(self, after: int = 0) -> Iterator[Entry]:
        """Entries with seq > after, in order (fetched in pages)."""
        while True:
            rows = self.meta.ledger_page(after, 5000)
            if not rows:
                return
            for r in rows:
                e = Entry(*r)
                after = e.seq
                yield e

    def last_named(self, op: str, prefix: str) -> Entry | None:
        """The newest entry with operation ``op`` whose object name starts with ``prefix``."""
        row = self.meta.ledger_last_named(op, prefix)
        return Entry(*row) if row else None

    def newest(self, n: int) -> list[Entry]:
        return [Entry(*r) for r in self.meta.ledger_newest(n)]

    def count(self) -> int:
        return self.meta.ledger_count()

    def verify_chain(self) -> tuple[int, list[str]]:
        """Recompute the chain. Returns (entries checked, problems); each problem names the
        sequence number where the chain breaks."""
        problems: list[str] = []
        prev = GENESIS
        expect = 1
        n = 0
        for e in self.entries():
            n += 1
            if e.seq != expect:
                problems.append(
                    f"ledger: entries {expect}..{e.seq - 1} are missing (chain broken "
                    f"at sequence {expect})"
                )
            if e.prev != prev:
                problems.append(f"ledger: chain broken at sequence {e.seq} (previous hash differs)")
            elif entry_hash(e.seq, e.time_ns, e.op, e.name, e.size, e.sha256, e.prev) != e.hash:
                problems.append(f"ledger: chain broken at sequence {e.seq} (entry was modified)")
            if op_kind(e.op) not in OPS:
                problems.append(f"ledger: unknown operation {e.op!r} at sequence {e.seq}")
            prev = e.hash
            expect = e.seq + 1
        return n, problems

    def truncate_after(self, seq: int) -> None:
        with self.meta.transaction():
            self.meta.ledger_truncate_after(seq)
        self.invalidate()
