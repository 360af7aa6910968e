"""``cryptfs repair`` and ``cryptfs store add|remove``: changing and levelling a vault's stores.

Each runs on an unmounted vault (it holds the vault lock) and ends with a checkpoint, so the
store-level changes are anchored like any other write. Progress goes to a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptfs.admin.verify import Progress
from cryptfs.errors import ConfigError, IntegrityError, LockedError, StoreError, UsageError
from cryptfs.format.codec import DATA_PREFIX
from cryptfs.format.layout import CHECKPOINT_PREFIX, MAX_CONFIG, META_PREFIX
from cryptfs.format.vaultconfig import CONFIG_OBJECT, VaultConfig
from cryptfs.paths import VaultPaths
from cryptfs.vault.core import Vault
from cryptfs.vault.localstate import load_local_config, save_local_config
from cryptfs.vault.replicas import adopt, copy_pending, mark_pending, survey
from cryptfs.vault.storelist import (
    StoreEntry,
    StoreList,
    new_store_id,
    read_store_id,
    write_store_id,
)

Say = Callable[[str], None]


def _bar(label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    state: dict[str, Progress] = {}

    def step(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = Progress(label, total)
        state["bar"].step()

    def finish() -> None:
        if "bar" in state:
            state["bar"].finish()

    return step, finish


def repair(vault: Vault, full: bool, say: Say) -> bool:
    """Check every copy on every store and re-copy what is missing or corrupt from a good copy;
    remove copies of objects nothing references. True when every store is level."""
    store, replicas = vault.store, vault.replicas
    if not store.members or replicas is None:
        say("repair: the vault has one store; nothing to replicate (see 'cryptfs verify')")
        return True
    adopted = adopt(replicas)
    if adopted:
        say(f"repair: recorded the copies of {adopted} objects stored before replication")
    step, finish = _bar("repair: checking")
    found = survey(replicas, full=full, progress=step)
    finish()
    for sid, err in found.unreachable.items():
        say(f"repair: store {sid} is unreachable, its copies wait: {err}")
    reachable = [m for m in store.members if m.id not in found.unreachable]
    for m in reachable:  # the per-store objects: the vault config and the store's id
        try:
            if m.store.get(CONFIG_OBJECT, MAX_CONFIG) != vault.cfg.to_bytes():
                m.store.put(CONFIG_OBJECT, vault.cfg.to_bytes())
        except (StoreError, IntegrityError):  # missing, unreadable or oversized
            m.store.put(CONFIG_OBJECT, vault.cfg.to_bytes())
        if read_store_id(m.store, vault.codec) != m.id:
            write_store_id(m.store, vault.codec, m.id)
    bad = found.missing + found.corrupt
    mark_pending(replicas, bad)
    step, finish = _bar("repair: copying")
    copied, failed = copy_pending(replicas, progress=step)
    finish()
    removed = 0
    assert vault.meta is not None and vault.fs is not None
    with vault.fs.lock:
        newest = max((ref.name for ref, _, _ in vault.meta.all_objects()
                      if ref.name.startswith(CHECKPOINT_PREFIX)), default="")
    for name, sid in found.stray:
        m = replicas.member(sid)
        stale_ck = name.startswith(CHECKPOINT_PREFIX) and name < newest
        if m is None or not (name.startswith((DATA_PREFIX, META_PREFIX)) or stale_ck):
            continue
        try:
            m.store.delete(name)
            removed += 1
        except StoreError:
            pass
    say(f"repair: {found.checked} copies checked ({found.downloaded} downloaded), "
        f"{len(found.missing)} missing and {len(found.corrupt)} corrupt found, {copied} copied, "
        f"{failed} still pending, {removed} stray copies removed")
    level = not failed and not found.unreachable
    say("repair: every store is level" if level else
        "repair: not every store is level yet; run 'cryptfs repair' again when they answer")
    return level


def _open_store_entry(url: str) -> StoreList:
    return StoreList([StoreEntry("", url)])


def add_store(paths: VaultPaths, master: bytes, url: str, say: Say) -> None:
    """Attach a new store to the vault and copy every object to it (back-fill)."""
    stores, cfg = load_local_config(paths)
    new = _open_store_entry(url).open(create=True)
    try:
        if stores.find(new.url) is not None or stores.find(url) is not None:
            raise UsageError(f"{url} is already a store of vault '{paths.name}'")
        vault = Vault.open(paths, master=master, check=True)  # the lock: not mounted
    except BaseException:
        new.close()
        raise
    try:
        try:
            there = VaultConfig.from_bytes(new.get(CONFIG_OBJECT, MAX_CONFIG),
                                           f"{new.url}/{CONFIG_OBJECT}")
            if there.vault_id != cfg.vault_id:
                raise ConfigError(f"the store {new.url} holds a different vault")
        except StoreError:  # no config: the store must be empty
            if any(True for _ in new.list("")):
                raise ConfigError(f"the store {new.url} is not empty and holds no cryptfs "
                                  "vault", hint="use an empty directory or bucket prefix") from None
        entries = list(stores.entries)
        if len(entries) == 1 and not entries[0].id:  # the vault had one store: name it too
            sid0 = new_store_id([])
            write_store_id(vault.store, vault.codec, sid0)
            entries[0] = StoreEntry(sid0, entries[0].url)
        sid = read_store_id(new, vault.codec)
        if not sid or any(e.id == sid for e in entries):
            sid = new_store_id([e.id for e in entries])
        write_store_id(new, vault.codec, sid)
        new.put(CONFIG_OBJECT, vault.cfg.to_bytes())
        entries.append(StoreEntry(sid, new.url))
        save_local_config(paths, StoreList(entries, stores.copies, stores.quorum), vault.cfg)
        assert vault.fs is not None and vault.meta is not None and vault.ledger is not None
        with vault.fs.lock, vault.meta.transaction():
            vault.ledger.append(f"store-add@{sid}", f"store/{sid}", 0, b"\0" * 32)
        say(f"store add: store {sid} ({new.url}) added to vault '{paths.name}'; copying")
    finally:
        new.close()
        vault.close()
    vault = Vault.open(paths, master=master, check=False)
    try:
        repair(vault, full=False, say=say)
    finally:
        vault.close()


def remove_store(paths: VaultPaths, master: bytes, key: str, say: Say) -> None:
    """Stop using a store. Objects only it holds are first copied to the others; the store's
    own objects are left in place (delete the bucket or directory yourself)."""
    stores, _cfg = load_local_config(paths)
    gone = stores.find(key)
    if gone is None:
        raise UsageError(f"vault '{paths.name}' has no store {key!r} (see 'cryptfs store list')")
    if len(stores.entries) == 1:
        raise UsageError("cannot remove the only store of a vault")
    vault = Vault.open(paths, master=master, check=True)
    try:
        replicas = vault.replicas
        assert replicas is not None and vault.fs and vault.meta and vault.ledger
        adopt(replicas)
        rest = [m for m in vault.store.members if m.id != gone.id]
        # what the other stores lack: copy it there first (from any good copy)
        found = survey(replicas, full=False)
        if any(sid in found.unreachable for sid in (m.id for m in rest)):
            raise LockedError("cannot remove a store while another is unreachable: "
                              + "; ".join(found.unreachable.values()))
        lacking = [(ref, sid) for ref, sid in found.missing + found.corrupt if sid != gone.id]
        if lacking:
            mark_pending(replicas, lacking)
            step, finish = _bar("store remove: copying")
            _copied, failed = copy_pending(replicas, progress=step)
            finish()
            if failed:
                raise StoreError(f"{failed} objects could not be copied to the other stores; "
                                 "nothing was removed", hint="run 'cryptfs repair' first")
        with vault.fs.lock, vault.meta.transaction():
            vault.meta.forget_store_copies(gone.id)
            vault.ledger.append(f"store-remove@{gone.id}", f"store/{gone.id}", 0, b"\0" * 32)
        entries = [e for e in stores.entries if e.id != gone.id]
        save_local_config(paths, StoreList(entries, min(stores.copies, len(entries)),
                                           min(stores.quorum, len(entries))), vault.cfg)
    finally:
        vault.close()
    say(f"store remove: store {gone.id} ({gone.url}) is no longer used by vault '{paths.name}'; "
        f"its objects were left in place")
    if len(entries) > 1:
        vault = Vault.open(paths, master=master, check=False)
        try:
            repair(vault, full=False, say=say)
        finally:
            vault.close()


