"""A vault: its store, keys, metadata, ledger anchors and filesystem, opened together.

The :class:`Vault` is the composition root: it builds the stores, chunk store, metadata engine,
filesystem, replicas and :class:`~.checkpointer.Checkpointer` with their collaborators passed
in at construction, runs crash recovery (:func:`.recovery.recover`) when opened read-write,
holds the lease (its heartbeat fences the mount), and closes it all in order.

A vault whose metadata is in PostgreSQL is mounted by several machines at once: instead of the
store lease a mount holds a session in the database (:class:`~cryptfs.meta.postgres.PgSession`:
heartbeat, expiry; the engine's commits are fenced by it), stands for checkpoint writer (one
elected machine writes checkpoints to the store), cleans up other machines' dead sessions, and
hears their change notices (:class:`~cryptfs.meta.postgres.PgWatcher`) to drop what its
filesystem caches of what they changed. SQLite vaults keep the lease. Fork consistency against
the database: once the anchors checked the ledger at mount, the mount checks every newer ledger
head it reads (its own appends, each heartbeat, change notices at most once a second) against
the head it verified (:meth:`cryptfs.meta.ledger.Ledger.trust`) and records the verified head
in its head file (every heartbeat, at unmount), so the next mount's anchors compare against it;
a database whose ledger does not extend it turns the mount read-only for good.

Store layout (see docs/FORMAT.md): ``config`` (the vault config), ``data/..`` (chunk objects),
``meta/<random>`` (sealed SQLite snapshots of the metadata, and segments: the pages changed
since), ``checkpoints/<seq>`` (sealed, MAC'd ledger heads naming a snapshot and its segments).

Checkpoint contract: when :meth:`Vault.sync` returns, everything committed before the call is
durable in the store, as :meth:`.checkpointer.Checkpointer.sync` states (which writes the
checkpoints, in the order given there, and collects after each). An fsync (:meth:`Vault.fsync`)
is that on a SQLite vault; on a PostgreSQL vault it stops at the database (the metadata's
durability point) and the store's chunks, and asks for a checkpoint in the background.

Longer than ~400 lines: besides the Vault (composition, the lease heartbeat and fencing, the
ledger entries of stored chunks and copies), it holds :func:`create_vault` (about 120 lines:
checking and writing the stores of a new or attached vault). Anchors (:mod:`.anchors`),
restore (:mod:`.restore`), local state (:mod:`.localstate`), checkpoint reading
(:mod:`.checkpoints`) and writing (:mod:`.checkpointer`) and recovery (:mod:`.recovery`) are
modules of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.errors import (
    ConfigError,
    CryptfsError,
    IntegrityError,
    LockedError,
)
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.format.layout import CHECKPOINT_PREFIX, PACK_PREFIX
from cryptfs.format.vaultconfig import CONFIG_OBJECT, VaultConfig
from cryptfs.fs import CommitHooks, FileSystem
from cryptfs.fs.base import JOURNAL_MAX
from cryptfs.meta.dbkeys import DbKeys
from cryptfs.meta.ledger import Ledger
from cryptfs.meta.sqlite import (
    ROOT_INO,
    Inode,
    MetaStore,
)
from cryptfs.paths import VaultPaths, private_dir
from cryptfs.stores import ObjectStore
from cryptfs.vault.anchors import anchor_problems, config_problems
from cryptfs.vault.checkpointer import Checkpointer
from cryptfs.vault.fsynclog import unapplied
from cryptfs.vault.lease import Lease, lease_seconds
from cryptfs.vault.localstate import (
    load_local_config,
    local_meta_url,
    save_local_config,
)
from cryptfs.vault.recovery import recover
from cryptfs.vault.replicas import CopyLog, Replicas, adopt, copy_pending, mark_pending, survey
from cryptfs.vault.restore import restore_from_store
from cryptfs.vault.snapshots import Pins, apply_policy, held_or_none
from cryptfs.vault.storelist import StoreList

if TYPE_CHECKING:
    from cryptfs.fs.journal import Logged
    from cryptfs.meta.postgres import PgMetaStore, PgSession, PgWatcher
    from cryptfs.metrics import Metrics

log = logging.getLogger("cryptfs.vault.core")

DEFAULT_CHUNK_SIZE = 1 << 20  # remote stores: per-request cost and latency favour larger objects
LOCAL_CHUNK_SIZE = 256 << 10  # file:// stores: measured faster on every workload (README)


def default_chunk_size(store_url: str) -> int:
    """The chunk size ``cryptfs init`` uses when none is given (scripts/chunk_size_sweep.py)."""
    return LOCAL_CHUNK_SIZE if store_url.startswith("file://") else DEFAULT_CHUNK_SIZE


REPLICATE_INTERVAL = 2.0
UNRENEWED = "the vault lease could not be renewed"  # a fence the next renewal lifts
ACCEPT_HINT = "run 'cryptfs verify --accept{name}' to accept the current state deliberately"


def _accept_hint(name: str) -> str:
    return ACCEPT_HINT.format(name="" if name == "default" else f" --name {name}")


# -- the vault ----------------------------------------------------------------------------------
class Vault:
    """An open vault. Create with :func:`create_vault` / :meth:`Vault.open`."""

    def __init__(
        self,
        paths: VaultPaths,
        store: ObjectStore,
        cfg: VaultConfig,
        master: bytes,
        *,
        readonly: bool = False,
        cache_bytes: int = 1 << 30,
        stores: StoreList | None = None,
        metrics: Metrics | None = None,
        copies: CopyLog | None = None,
    ) -> None:
        """``copies``: the log ``store`` reports its copies to (see :meth:`open`)."""
        self.paths = paths
        self.metrics = metrics
        self.store = store
        self.copy_log = copies or CopyLog()
        self.hooks = CommitHooks()  # the metadata's commits, heard by the filesystem
        self.stores = stores or StoreList()
        self.cfg = cfg
        self.codec = Codec(master, cfg.vault_id, cfg.chunk_size, cfg.name_hash)
        self._db_keys = DbKeys.derive(master, cfg.vault_id)  # for a PostgreSQL database
        self.pins = Pins(store, self.codec, paths.data_dir / "pins")  # what snapshots hold
        self.readonly = readonly
        self.cache_bytes = cache_bytes
        self.meta: MetaStore | PgMetaStore | None = None
        self.ledger: Ledger | None = None
        self.fs: FileSystem | None = None
        self.chunks: ChunkStore | None = None
        self.replicas: Replicas | None = None
        self.checkpointer: Checkpointer | None = None
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self.warnings: list[str] = []
        self._stored: list[ChunkRef] = []
        self.recovered: list[str] = []  # what opening repaired after a crash, one line each
        self.lease: Lease | None = None
        self.session: PgSession | None = None  # a PostgreSQL vault's, instead of the lease
        self.session_lost = False
        self.watcher: PgWatcher | None = None
        self._stored_lock = threading.Lock()
        self.replicator: threading.Thread | None = None
        self.readonly_reason: str | None = None  # why a read-write mount stopped writing
        self._fence_lock = threading.Lock()  # (the heartbeat and a refused commit both fence)
        self._checked_at = float("-inf")  # when a change notice last had the ledger checked

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        paths: VaultPaths,
        passphrase: bytes | None = None,
        *,
        master: bytes | None = None,
        readonly: bool = False,
        check: bool = True,
        cache_bytes: int = 1 << 30,
        metrics: Metrics | None = None,
        alone: bool = False,
    ) -> Vault:
        """Unlock and open a vault. With ``check``, refuse (IntegrityError) a read-write open
        whose anchors disagree (rollback, truncated ledger). ``metrics``: record store
        requests, cache use and checkpoints there (a mount with ``-o metrics``). ``alone``
        (a repair): on a vault other machines share, refuse (LockedError) while any has it
        mounted, and refuse their mounts until this one is closed (see _start_session)."""
        stores, cfg = load_local_config(paths)
        if master is None:
            if passphrase is None:
                raise ConfigError("no passphrase given")
            master = cfg.unlock(passphrase)
        copies = CopyLog()  # exists first: the store reports to it, the metadata records it
        store = stores.open(on_copy=copies.copied, on_stray=copies.stray,
                            wrap=metrics.wrap_store if metrics is not None else None)
        v = cls(paths, store, cfg, master, readonly=readonly, cache_bytes=cache_bytes,
                stores=stores, metrics=metrics, copies=copies)
        try:
            v._refresh_config(master)
            v._take_lock()
            url = local_meta_url(paths)
            if not readonly and not url:  # one machine: the store lease excludes others
                v.lease = Lease(store, v.codec)
                v.lease.acquire()
            v._open_db()
            if not readonly and url:  # several machines: a session in the database
                v._start_session(url, alone)
            if check:
                problems = v.anchor_problems()
                if problems and not readonly:
                    raise IntegrityError(
                        problems[0] + " - refusing to mount read-write",
                        hint=_accept_hint(paths.name),
                    )
                v.warnings.extend(problems)
                if not problems and url:  # the chain is verified: from now on it must extend
                    v._trust_ledger()
            v._start()
            if readonly and check:  # (a read-only open writes nothing: they stay in the log)
                assert v.fs is not None and v.meta is not None
                _newest, lost = unapplied(v.fs.lock, v.meta, v.store, v.codec)
                if lost:
                    v.warnings.append(
                        f"the store's fsync log holds {len(lost)} fsyncs this machine's "
                        "metadata lost (a power loss); a read-write mount applies them, this "
                        "one shows the files without them")
            assert v._lock_fd is not None
            os.ftruncate(v._lock_fd, 0)  # the holder's pid, for messages and `cryptfs umount`
            os.pwrite(v._lock_fd, str(os.getpid()).encode(), 0)
        except BaseException:
            v.close(checkpoint=False)
            raise
        return v

    def _refresh_config(self, master: bytes) -> None:
        """Adopt the store's config if it is authentic and not older than the local copy (key
        slots changed on another machine). One that fails its MAC or is older is not adopted;
        :meth:`config_problems` reports it."""
        stored = VaultConfig.from_store(self.store)
        if stored.vault_id != self.cfg.vault_id:
            raise ConfigError(f"the store {self.store.url} holds a different vault")
        if stored.to_dict() != self.cfg.to_dict() and stored.verify_mac(master) \
                and stored.generation >= self.cfg.generation:
            self.cfg = stored
            save_local_config(self.paths, self.stores, stored)

    def config_problems(self) -> list[str]:
        """See :func:`cryptfs.vault.anchors.config_problems`."""
        assert self.ledger is not None
        return config_problems(self.store, self.codec, self.cfg, self.ledger)

    def anchor_problems(self) -> list[str]:
        """See :func:`cryptfs.vault.anchors.anchor_problems`."""
        assert self.ledger is not None
        return anchor_problems(self.paths, self.store, self.codec, self.cfg, self.ledger,
                               shared=self.ledger.meta.shared)

    def _trust_ledger(self) -> None:
        """Several machines: the ledger the anchors just verified is this machine's
        reference; every head read from now on must extend it (see the module doc)."""
        assert self.ledger is not None
        ck = self.ledger.last_named("put", CHECKPOINT_PREFIX)
        self.ledger.trust(self.ledger.head(), ck.name if ck else "")

    def reanchor(self) -> None:
        """``verify --accept`` on a vault whose ledger is in a shared database: the ledger
        as it is now becomes this machine's reference (its head file is rewritten to it,
        even if it is behind what the file said). Nothing for a local ledger (its
        checkpoint writes the head file)."""
        assert self.fs is not None and self.meta is not None and self.checkpointer is not None
        if not self.meta.shared:
            return
        with self.fs.lock:
            self.meta.commit()
            self._trust_ledger()
        self.checkpointer.anchor(force=True)

    def _ledger_forked(self, why: str) -> None:
        """The database's ledger does not extend the head this machine verified: read-only
        for good (one log line), no checkpoint of that state."""
        self.fence(why)

    def _changed(self, inos: set[int] | None) -> None:
        """Other machines' commits changed ``inos`` (None: anything): drop them from the
        caches, and check the ledger they may have appended to (at most once a second)."""
        assert self.fs is not None and self.ledger is not None
        self.fs.invalidate(inos)
        now = time.monotonic()
        if self.ledger.verified is None or self.ledger.forked or now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            with self.fs.lock:
                self.ledger.check()
        except IntegrityError:
            pass  # (on_fork said it)
        except CryptfsError as e:
            log.warning("checking the ledger after a change notice: %s", e.line())

    def _take_lock(self) -> None:
        private_dir(self.paths.data_dir)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockedError(
                f"vault '{self.paths.name}' is in use by another cryptfs process"
                f"{' (pid ' + holder + ')' if holder else ''}",
                hint="unmount it first with 'cryptfs umount'",
            ) from None
        self._lock_fd = fd

    def _open_db(self) -> None:
        """Open the metadata: the PostgreSQL database the local config names, else the local
        SQLite file (restored from the store's newest checkpoint if it is missing)."""
        url = local_meta_url(self.paths)
        if url:
            from cryptfs.meta.postgres import PgMetaStore  # (psycopg: only such vaults load it)

            self.meta = PgMetaStore(url, self._db_keys, on_commit=self.hooks.committed,
                                    on_rollback=self.hooks.rolled_back)
        else:
            if not self.paths.db.exists():
                self.warnings.extend(restore_from_store(self.paths, self.store, self.codec))
            self.meta = MetaStore(self.paths.db, on_commit=self.hooks.committed,
                                  on_rollback=self.hooks.rolled_back)
        self.ledger = Ledger(self.meta, self.codec.ledger_key, on_fork=self._ledger_forked)

    def _start_session(self, url: str, alone: bool) -> None:
        """Join the machines mounting a PostgreSQL vault: a session live for the lease
        lifetime (``CRYPTFS_LEASE_SECONDS``) that fences this engine's commits, and the
        checkpoint writer's lock if no other machine holds it. LockedError while another
        machine repairs the vault; with ``alone`` (a repair: the session says so, and
        mounts wait for it), while any other machine has it mounted. Both sessions are
        inserted before either looks for the other: of a repair and a mount starting at
        once, at least one sees the other and gives up."""
        from cryptfs.meta.postgres import PgMetaStore, PgSession

        assert isinstance(self.meta, PgMetaStore)
        self.session = PgSession(url, self._db_keys, lease_seconds())
        self.session.start("repair" if alone else "mount")
        self.meta.attach(self.session.id, self._session_expired)
        others = self.meta.session_purposes()
        self.meta.commit()
        if "repair" in others:
            raise LockedError("another machine is repairing this vault (cryptfs fsck "
                              "--repair); try again once it has finished")
        if alone and others:
            raise LockedError(f"{len(others)} other machine(s) have this vault mounted "
                              "(live sessions in its metadata database): a repair needs it "
                              "alone; unmount them (or wait until their sessions expire) and "
                              "run it again, or check without --repair now")
        self.session.elect()

    def _start(self) -> None:
        assert self.meta is not None and self.ledger is not None
        if not self.readonly:
            self.meta.start_checkpointer()
        remote = any(not e.url.startswith("file://") for e in self.stores.entries)
        self.chunks = ChunkStore(
            self.store,
            self.codec,
            remote=remote,
            staging=self.paths.staging,
            cache=self.paths.cache_dir / "chunks" if remote else None,
            cache_bytes=self.cache_bytes,
            lookup=self._lookup_object,
            on_stored=self._on_stored,
            metrics=self.metrics,
            keep_dedup=self.meta.shared,  # other machines' collections: see ChunkStore
            # short chunks in packs: one machine's vault on one store (a shared vault's
            # collections, and copies on several stores, are kept per object)
            packing=not self.meta.shared and not self.stores.replicated,
        )
        statfs = None
        if not remote and not self.stores.replicated:
            root = self.stores.entries[0].url[len("file://") :]

            def statfs() -> os.statvfs_result | None:
                return os.statvfs(root)

        logs = self.store.appendable and not self.meta.shared  # (an fsync log: 6.7)
        self.fs = FileSystem(
            self.meta,
            self.chunks,
            self.cfg.chunk_size,
            self.fsync,
            readonly=self.readonly,
            statfs_source=statfs,
            hooks=self.hooks,
            before_commit=self._flush_stored,
            log_slot=self._log_slot,
            # (an fsync log: sealing a chunk costs ten of its records)
            journal_max=self.cfg.chunk_size if logs else JOURNAL_MAX,
        )
        self.replicas = Replicas(self.store, self.meta, self.ledger, self.fs.lock,
                                 self.copy_log, self.chunks.local_copy)
        self.checkpointer = Checkpointer(
            meta=self.meta, ledger=self.ledger, chunks=self.chunks, store=self.store,
            codec=self.codec, paths=self.paths, lock=self.fs.lock, metrics=self.metrics,
            flush_stored=self._flush_stored, queued=lambda: bool(self._stored),
            gate=self._may_write, fence=self.fence,
            on_checkpoint=functools.partial(apply_policy, self),
            held=functools.partial(held_or_none, self),
            elected=self._elected,
        )
        url = local_meta_url(self.paths)
        if url:  # other machines' commits: their change notices drop what they changed
            from cryptfs.meta.postgres import PgWatcher

            self.watcher = PgWatcher(url, self._db_keys, self.meta.sender,  # type: ignore[union-attr]
                                     self._changed, self.fs.locks_released)
            self.watcher.start()
            with self.fs.lock:
                self.fs.peers = bool(self.meta.live_sessions())
            self.checkpointer.anchor()  # the head the anchors verified
        if self.readonly:
            return
        self.recovered.extend(recover(self.fs, self.meta, self.ledger, self.chunks, self.store,
                                      self.codec, self.cfg))
        self._timer = threading.Thread(target=self.checkpointer.run, args=(self._stop,),
                                       name="checkpoint", daemon=True)
        self._timer.start()
        threading.Thread(target=self._heartbeat if self.session is None else self._beat,
                         name="lease", daemon=True).start()
        if self.store.members:  # copies to level in the background
            self.replicator = threading.Thread(target=self._replicate, name="replicate",
                                               daemon=True)
            self.replicator.start()

    def readonly_cause(self) -> str:
        """Why this mount does not write, as a fixed word (a metrics label): ``none``,
        ``mount_option``, ``lease_lost`` (also: the PostgreSQL session expired),
        ``lease_not_renewed``, ``ledger_forked`` (the database's ledger does not extend what
        this machine verified) or ``checkpoint_failed``."""
        if self.readonly:
            return "mount_option"
        if self.ledger is not None and self.ledger.forked:
            return "ledger_forked"
        if self.lease is not None and self.lease.lost or self.session_lost:
            return "lease_lost"  # (or the PostgreSQL session expired)
        if self.readonly_reason == UNRENEWED:
            return "lease_not_renewed"
        if self.readonly_reason is not None or self.fs is not None and self.fs.readonly:
            return "checkpoint_failed"
        return "none"

    def fence(self, why: str | None) -> None:
        """Stop writing (EROFS for new writes, no checkpoints) because of ``why``, or with
        None write again (unless mounted read-only). Files already written are still
        committed locally; they reach the store once writing resumes or at the next mount."""
        if self.fs is None:
            return
        with self._fence_lock:  # one line per change, whichever thread finds it first
            if why is not None and self.readonly_reason is None:
                log.error("the mount is read-only now: %s", why)
            elif why is None and self.readonly_reason is not None:
                log.warning("the mount is writable again: %s no longer holds",
                            self.readonly_reason)
            self.readonly_reason = why
            self.fs.readonly = self.readonly or why is not None

    def _heartbeat(self) -> None:
        """Renew the lease every third of its lifetime (every 2 s while renewals fail). A
        lease not renewed for two thirds of its lifetime fences the mount (another machine
        could take over once it expires); one lost for good fences it until unmount. Nothing
        raised here can end the thread silently."""
        lease = self.lease
        assert lease is not None
        wait = lease.ttl / 3
        while not self._stop.wait(wait):
            renewed = False
            try:
                renewed = lease.renew()
            except CryptfsError as e:
                log.warning("cannot renew the vault lease: %s", e.line())
            except BaseException as e:  # noqa: B036 - a dependency's panic must not end it
                log.error("renewing the vault lease failed: %s: %s", type(e).__name__, e)
            if lease.lost:
                self.fence("the vault lease was lost to another mount")
                return
            if lease.held():
                if self.readonly_reason == UNRENEWED:
                    self.fence(None)
            elif self.readonly_reason is None:
                self.fence(UNRENEWED)
            wait = lease.ttl / 3 if renewed else min(2.0, lease.ttl / 10)

    def _session_expired(self, why: str) -> None:
        """The database refused a commit: this machine's session expired. Read-only at once
        (one log line), without waiting for the heartbeat to find out."""
        with self._fence_lock:
            first, self.session_lost = not self.session_lost, True
        if first:  # (the heartbeat's finding and a refused commit's may come together)
            self.fence(why)

    def _elected(self) -> bool:
        """Whether this mount writes the vault's checkpoints: always with one machine; with
        several, the one holding the checkpoint lock (see :class:`PgSession`)."""
        return self.session is None or self.session.elect()

    def _beat(self) -> None:
        """Keep the session live (every third of its lifetime; every 2 s while the database
        cannot be reached), stand for checkpoint writer, and clean up other machines' dead
        sessions. A session that expired fences the mount for good (its commits are refused
        by the database anyway: this only says so once and stops the writes early)."""
        s = self.session
        assert s is not None and self.fs is not None and self.meta is not None and self.meta.shared
        wait = s.ttl / 3
        unreachable = False  # said once per outage (retried meanwhile)
        while not self._stop.wait(wait):
            try:
                assert self.chunks is not None
                if not s.beat(self.chunks.horizon()):
                    if not self.session_lost:
                        self._session_expired(
                            f"this machine's session in the metadata database expired "
                            f"(frozen or cut off longer than {s.ttl:.0f}s)")
                    return
                s.elect()
                with self.fs.lock:
                    dead, gone = self.meta.reap_sessions()
                    self.fs.invalidate(gone)
                    self.fs.peers = bool(self.meta.live_sessions())
                self._check_ledger()
                if dead:
                    log.info("cleaned up %d expired sessions of other machines (%d files "
                             "they held open, unlinked, deleted)", dead, len(gone))
                if unreachable:
                    log.info("session heartbeat: the metadata database answers again")
                    unreachable = False
                wait = s.ttl / 3
            except CryptfsError as e:
                if not unreachable:
                    log.warning("session heartbeat: %s (retrying until it answers)", e.line())
                    unreachable = True
                wait = min(2.0, s.ttl / 10)
            except BaseException as e:  # noqa: B036 - a dependency's panic must not end it
                log.error("session heartbeat failed: %s: %s", type(e).__name__, e)
                wait = min(2.0, s.ttl / 10)

    @contextlib.contextmanager
    def _session_kept(self) -> Iterator[None]:
        """Keep this machine's session live while the body runs (the final checkpoint: the
        heartbeat stopped with the mount, and draining uploads or waiting for other
        machines' may take longer than the session's lifetime, which would fence its
        commits)."""
        s = self.session
        if s is None:
            yield
            return
        done = threading.Event()

        def beat() -> None:
            while not done.wait(s.ttl / 3):
                with contextlib.suppress(CryptfsError):
                    s.beat(self.chunks.horizon() if self.chunks is not None else None)

        t = threading.Thread(target=beat, name="final-beat", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join(timeout=10)

    def _check_ledger(self) -> None:
        """Check the database's ledger against the head this machine verified, and record the
        verified head in the head file (unless a checkpoint is being written: the next
        heartbeat does). A fork was said by on_fork; it is not said again."""
        assert self.fs is not None and self.ledger is not None and self.checkpointer is not None
        if self.ledger.verified is None or self.ledger.forked:
            return
        try:
            with self.fs.lock:
                self.ledger.check()
        except IntegrityError:
            return
        self.checkpointer.anchor(wait=False)

    def _lookup_object(self, name: str) -> ChunkRef | None:
        assert self.fs is not None and self.meta is not None
        with self.fs.lock:
            found = self.meta.get_object(name)
        return found[0] if found else None

    def _on_stored(self, ref: ChunkRef) -> None:
        """An object reached the store. For a remote store (upload workers) the ledger entry is
        written now; for the local store (on the write path) it is queued and written in the
        transaction that commits the chunk map referencing it, or before a checkpoint."""
        assert self.fs is not None and self.meta is not None and self.ledger is not None
        if self.chunks is not None and not self.chunks.remote and ref.pack is None \
                and not ref.name.startswith(PACK_PREFIX):
            with self._stored_lock:
                self._stored.append(ref)
            return
        with self.fs.lock, self.meta.transaction():
            self.ledger.append("put", ref.name, ref.size, ref.sha256)
            if ref.name.startswith(PACK_PREFIX):
                self.meta.record_pack(ref)
            else:
                self.meta.mark_stored(ref.name)
            self._flush_copies()

    def _flush_stored(self) -> None:
        """Write the queued ledger entries (caller holds the filesystem lock)."""
        assert self.meta is not None and self.ledger is not None
        with self._stored_lock:
            queued, self._stored = self._stored, []
        if queued:
            with self.meta.transaction():
                for ref in queued:
                    self.ledger.append("put", ref.name, ref.size, ref.sha256)
                self.meta.undo_on_rollback(lambda: self._requeue_stored(queued))
        self._flush_copies()

    def _requeue_stored(self, refs: list[ChunkRef]) -> None:
        """Their ledger entries were rolled back with the commit they were in: again."""
        with self._stored_lock:
            self._stored[:0] = refs

    # -- copies on several stores ----------------------------------------------------------------
    def _flush_copies(self) -> None:
        """Record the copy events the store reported (caller holds the filesystem lock): the
        copies table and a ``copy@id`` / ``lost@id`` ledger entry each."""
        assert self.meta is not None and self.ledger is not None
        self.copy_log.record(self.meta, self.ledger)

    def _replicate(self) -> None:
        """Background completion: record copy events and make the pending copies."""
        r = self.replicas
        assert r is not None
        surveyed = False
        while not self._stop.wait(REPLICATE_INTERVAL):
            try:
                r.flush()
                if not surveyed:  # once per mount: find copies a crash left unrecorded
                    adopt(r)
                    found = survey(r)
                    mark_pending(r, found.missing + found.corrupt)
                    surveyed = True
                copy_pending(r, stop=self._stop)
            except CryptfsError as e:
                log.warning("background replication: %s", e.line())
            except Exception:  # noqa: BLE001 - keep the thread alive, say what happened
                log.exception("background replication failed")

    # -- checkpoints (see :mod:`.checkpointer`) -----------------------------------------------
    def sync(self, progress: Callable[[int, int], None] | None = None,
             collect: bool = False) -> None:
        """Make everything committed so far durable in the store: the checkpoint contract of
        :meth:`.checkpointer.Checkpointer.sync` (``collect``: its round collects, due or not).
        Nothing to do on a read-only mount; raises LockedError when this mount may not write
        to the store (:meth:`_may_write`)."""
        if self.readonly:
            return
        assert self.checkpointer is not None
        self.checkpointer.sync(progress, collect)

    def fsync(self, logged: Logged | None = None) -> None:
        """What an fsync makes durable: :meth:`.checkpointer.Checkpointer.fsync` (one
        machine's vault: a checkpoint, as :meth:`sync`; a PostgreSQL vault: committed in the
        database with its chunks durable in the store, a checkpoint requested in the
        background). Nothing to do on a read-only mount; LockedError as :meth:`sync`."""
        if self.readonly:
            return
        assert self.checkpointer is not None
        self.checkpointer.fsync(logged)

    def _log_slot(self) -> tuple[int, int] | None:
        """The filesystem's ``log_slot``: the next place in the fsync log (caller holds the
        filesystem lock; none before the checkpointer exists)."""
        return self.checkpointer.fsync_log.slot() if self.checkpointer is not None else None

    def checkpoints_held(self) -> contextlib.AbstractContextManager[str]:
        """See :meth:`.checkpointer.Checkpointer.checkpoints_held`."""
        assert self.checkpointer is not None
        return self.checkpointer.checkpoints_held()

    def _may_write(self) -> None:
        """Raise LockedError unless this mount may write to the store now: it holds the lease
        (renewed here if a renewal was missed) and is not fenced."""
        if self.lease is not None and not self.lease.held():
            if not self.lease.lost:  # not renewed for a while (the store was unreachable)
                with contextlib.suppress(CryptfsError):
                    self.lease.renew()
            if not self.lease.held():
                raise LockedError("this mount does not hold the vault lease any more: "
                                  "nothing more is written to the store",
                                  hint="see the daemon log; unmount and mount again")
            if self.readonly_reason == UNRENEWED:
                self.fence(None)
        if self.session_lost:
            raise LockedError("this machine's session in the metadata database expired: "
                              "nothing more is written to the store",
                              hint="see the daemon log; unmount and mount again")
        if self.readonly_reason is not None:
            raise LockedError(f"the mount is read-only: {self.readonly_reason}")

    # -- closing ----------------------------------------------------------------------------
    def close(
        self,
        checkpoint: bool = True,
        progress: Callable[[int, int], None] | None = None,
        on_failure: Callable[[CryptfsError], None] | None = None,
    ) -> None:
        """Flush open files, wait for uploads, write a final checkpoint, release the vault.
        If the final checkpoint fails, ``on_failure`` hears why before the vault is released
        (the local lock, which ``cryptfs umount`` waits for), then the error is raised."""
        self._stop.set()
        if self.checkpointer is not None:
            self.checkpointer.request()  # (its thread sees the stop)
        if self.lease is not None and self.lease.lost:
            checkpoint = False  # the vault belongs to another mount now
            log.error("not writing a final checkpoint: the lease was lost; data of this mount "
                      "stays in the local database and staging area")
        if self.watcher is not None:
            self.watcher.stop()
        if self.session_lost or self.ledger is not None and self.ledger.forked:
            checkpoint = False
        try:
            if self.fs is not None and checkpoint and not self.readonly:
                self.fs.release_all()
                if self.session is not None:  # the last machine out writes the checkpoint
                    with contextlib.suppress(CryptfsError):
                        self.session.elect()
                assert self.checkpointer is not None and self.meta is not None
                with self._session_kept():
                    self.checkpointer.finish(progress)
                with self.fs.lock:
                    if not self.meta.live_sessions():  # others may still crash
                        self.meta.set_state("clean", "1")
        except CryptfsError as e:
            if on_failure is not None:
                on_failure(e)
            raise
        finally:
            if self.chunks is not None:
                self.chunks.close(drain=checkpoint and not self.readonly)
            if self.replicator is not None:
                self.replicator.join(timeout=60)
            if self.replicas is not None and not self.readonly:
                # copies still being written: wait a little, record what landed; the rest
                # stays pending and is copied at the next mount or by `cryptfs repair`
                self.store.drain(timeout=10.0)
                with contextlib.suppress(CryptfsError):
                    self.replicas.flush()
                    self.replicas.meta.commit()
            if self.meta is not None:
                self.meta.close()
            if self.session is not None:
                self.session.end()
            if self.lease is not None and not self.lease.lost:
                with contextlib.suppress(CryptfsError):
                    self.lease.release()
            with contextlib.suppress(Exception):
                self.store.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def create_vault(
    paths: VaultPaths,
    store_urls: list[str],
    passphrase: bytes,
    chunk_size: int,
    uid: int,
    gid: int,
    copies: int = 0,
    quorum: int = 0,
    meta_url: str | None = None,
) -> tuple[VaultConfig, bool]:
    """Create a vault in the stores, or attach an existing one (the passphrase must open it).
    With several stores every one must be empty or hold this same vault. ``meta_url``: keep
    the metadata in that PostgreSQL database (an empty one for a new vault; for an existing
    vault, the database its other machines use) instead of a local SQLite file. Returns
    (config, created)."""
    from cryptfs.vault.storelist import (
        StoreEntry,
        check_policy,
        new_store_id,
        read_store_id,
        same_vault,
        write_store_id,
    )

    if paths.config_file.exists():
        raise ConfigError(
            f"a vault named '{paths.name}' already exists", hint="choose another --name"
        )
    check_policy(len(store_urls), copies, quorum)
    stores: list[ObjectStore] = []
    try:
        for url in store_urls:
            stores.append(StoreList([StoreEntry("", url)]).open(create=True))
        if len({s.url for s in stores}) < len(stores):
            raise ConfigError("the same store is given twice")
        same_vault(stores)
        existing = None
        for s in stores:
            if s.exists(CONFIG_OBJECT):
                existing = VaultConfig.from_store(s)
                break
        for s in stores:
            if (existing is None or not s.exists(CONFIG_OBJECT)) and any(
                True for _ in s.list("")
            ):
                raise ConfigError(
                    f"the store {s.url} is not empty and holds no cryptfs vault",
                    hint="use an empty directory or bucket prefix",
                )
        if existing is not None:
            cfg = existing
            master = cfg.unlock(passphrase)
        else:
            if paths.db.exists():
                raise ConfigError(
                    f"stale local state for '{paths.name}' in {paths.data_dir}",
                    hint="move it away first",
                )
            cfg, master = VaultConfig.create(
                passphrase, chunk_size, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            )
        codec = Codec(master, cfg.vault_id)
        entries: list[StoreEntry] = []
        for s in stores:
            sid = read_store_id(s, codec) if len(stores) > 1 else ""
            if len(stores) > 1 and not sid:
                sid = new_store_id([e.id for e in entries])
                write_store_id(s, codec, sid)
            if not s.exists(CONFIG_OBJECT):
                s.put(CONFIG_OBJECT, cfg.to_bytes())
            entries.append(StoreEntry(sid or "", s.url))
        if len({e.id for e in entries}) < len(entries):
            raise ConfigError("two of the stores carry the same store id (copied stores?)")
        store_list = StoreList(entries, copies, quorum)
        if meta_url:
            _init_database(meta_url, DbKeys.derive(master, cfg.vault_id), uid, gid,
                           new=existing is None)
        if existing is not None:
            save_local_config(paths, store_list, cfg, meta_url)
            return cfg, False
        if not meta_url:  # the first checkpoint: an empty root directory
            private_dir(paths.data_dir)
            meta = MetaStore(paths.db)
            os.chmod(paths.db, 0o600)
            now = time.time_ns()
            with meta.transaction():
                meta.insert_inode(Inode(ROOT_INO, 0o40755, uid, gid, 0, 2, now, now, now))
            meta.close()
        save_local_config(paths, store_list, cfg, meta_url)
    finally:
        for s in stores:
            s.close()
    v = Vault.open(paths, master=master, check=False)
    v.close()
    return cfg, True


def _init_database(url: str, keys: DbKeys, uid: int, gid: int, new: bool) -> None:
    """A new vault's PostgreSQL database gets the root directory (it must hold no inode yet);
    an existing vault's must already hold its metadata (attaching one to an empty database,
    from a checkpoint, is not supported yet)."""
    from cryptfs.meta.postgres import PgMetaStore

    meta = PgMetaStore(url, keys)
    try:
        have_root = meta.get_inode(ROOT_INO) is not None
        if new and meta.count_inodes():
            raise ConfigError(f"the metadata database {meta.where} is not empty")
        if not new and not have_root:
            raise ConfigError(f"the metadata database {meta.where} holds no metadata of this "
                              "vault", hint="attach with the database its other machines use")
        if new:
            now = time.time_ns()
            with meta.transaction():
                meta.insert_inode(Inode(ROOT_INO, 0o40755, uid, gid, 0, 2, now, now, now))
    finally:
        meta.close()
