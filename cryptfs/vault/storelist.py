"""The stores of a vault as the local config file lists them, and how to open them.

A vault has one or more stores. Each has a short random id (recorded in the metadata and the
ledger, so it must not change when the URL does) and a URL with its own credentials (an S3
``profile=``), kept only in the local config file (mode 0600): no store learns another store's
URL or credentials. Each store also holds a sealed ``store-id`` object naming its id, so that a
vault attached on a new machine (``cryptfs init URL URL ...``) finds the same ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptfs.errors import ConfigError, IntegrityError, ObjectNotFound, StoreError, UsageError
from cryptfs.format import crypto, layout
from cryptfs.format.codec import Codec
from cryptfs.stores import ObjectStore, open_store
from cryptfs.stores.base import PlainStore
from cryptfs.stores.replicated import Member, ReplicatedStore

log = logging.getLogger("cryptfs.stores")

STORE_ID_OBJECT = layout.STORE_ID


@dataclass(frozen=True)
class StoreEntry:
    id: str
    url: str


@dataclass
class StoreList:
    """The stores of a vault and its replication policy (``copies`` 0 = every store,
    ``quorum`` 0 = half the copies rounded up)."""

    entries: list[StoreEntry] = field(default_factory=list)
    copies: int = 0
    quorum: int = 0

    @property
    def display(self) -> str:
        return " + ".join(e.url for e in self.entries)

    @property
    def replicated(self) -> bool:
        return len(self.entries) > 1

    def find(self, key: str) -> StoreEntry | None:
        """The entry with id ``key``, or whose URL is ``key``."""
        return next((e for e in self.entries if key in (e.id, e.url)), None)

    def to_json(self) -> dict[str, Any]:
        if not self.replicated and not self.entries[0].id:
            return {"store": self.entries[0].url}  # the format of a vault with one store
        return {
            "store": self.entries[0].url,  # what versions with one store read
            "stores": [{"id": e.id, "url": e.url} for e in self.entries],
            "copies": self.copies,
            "quorum": self.quorum,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> StoreList:
        """Parse the local config body; raises ValueError (saying what is wrong) if any field is
        missing or of the wrong type, or the policy is impossible."""
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        if "stores" not in body:
            url = body.get("store")
            if not isinstance(url, str) or not url:
                raise ValueError("no store URL")
            return cls([StoreEntry("", url)])
        rows = body["stores"]
        if not isinstance(rows, list) or not 1 <= len(rows) <= 64:
            raise ValueError("stores is not a list of 1 to 64 stores")
        entries = []
        for d in rows:
            if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(
                    d.get("url"), str) or not d["url"]:
                raise ValueError("a store has no id or URL")
            entries.append(StoreEntry(d["id"], d["url"]))
        copies, quorum = body.get("copies", 0), body.get("quorum", 0)
        if type(copies) is not int or type(quorum) is not int:
            raise ValueError("copies and quorum must be integers")
        try:
            check_policy(len(entries), copies, quorum)
        except UsageError:
            raise ValueError(f"copies {copies} and quorum {quorum} do not fit "
                             f"{len(entries)} stores") from None
        return cls(entries, copies, quorum)

    def open(
        self,
        on_copy: Callable[[str, str, bool], None] | None = None,
        on_stray: Callable[[str, str], None] | None = None,
        create: bool = False,
        wrap: Callable[[ObjectStore, str], ObjectStore] | None = None,
    ) -> ObjectStore:
        """One store: the store itself. Several: a :class:`ReplicatedStore` that reports each
        copy to ``on_copy(name, store id, ok)`` and each delete a member missed to
        ``on_stray(name, store id)``; a member that cannot be reached now is opened when it
        answers again (it counts as down). ``wrap`` (store, store id) wraps each single store
        (metrics: ``id`` is ``main`` for a vault with one store)."""
        def wrapped(store: ObjectStore, sid: str) -> ObjectStore:
            return store if wrap is None else wrap(store, sid)

        if len(self.entries) == 1:
            return wrapped(open_store(self.entries[0].url, create=create), "main")
        members = []
        for e in self.entries:
            try:
                members.append(Member(e.id, wrapped(open_store(e.url, create=create), e.id)))
            except StoreError as err:
                if create:
                    raise
                m = Member(e.id, wrapped(_LaterStore(e.url), e.id))
                m.failed(err)  # logs it; counts as down until it answers
                members.append(m)
        return ReplicatedStore(members, self.copies, self.quorum, on_copy, on_stray)


def new_store_id(taken: list[str]) -> str:
    while True:
        sid = crypto.random_bytes(4).hex()
        if sid not in taken:
            return sid


def write_store_id(store: ObjectStore, codec: Codec, store_id: str) -> None:
    """Mark ``store`` as the vault's store ``store_id`` (a sealed object)."""
    body = json.dumps({"id": store_id}).encode()
    store.put(STORE_ID_OBJECT, codec.seal_blob(b"store-id", STORE_ID_OBJECT, body))


def read_store_id(store: ObjectStore, codec: Codec) -> str | None:
    """The id ``store`` was given in this vault, None if unmarked; IntegrityError if forged."""
    try:
        blob = store.get(STORE_ID_OBJECT, layout.MAX_STORE_ID)
    except ObjectNotFound:
        return None
    try:
        sid = json.loads(codec.open_blob(b"store-id", STORE_ID_OBJECT, blob))["id"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"the {STORE_ID_OBJECT} object in {store.url} is malformed") from None
    if not isinstance(sid, str) or not sid:
        raise IntegrityError(f"the {STORE_ID_OBJECT} object in {store.url} is malformed")
    return sid


def check_policy(n_stores: int, copies: int, quorum: int) -> None:
    if copies < 0 or copies > n_stores:
        raise UsageError(f"--copies must be 1 to {n_stores} (the number of stores), or 0 for all")
    effective = copies or n_stores
    if quorum < 0 or quorum > effective:
        raise UsageError(f"--quorum must be 1 to {effective} (the copies), or 0 for the default")


def same_vault(stores: list[ObjectStore]) -> None:
    """Raise ConfigError unless every store that holds a config holds the same vault's."""
    from cryptfs.format.vaultconfig import CONFIG_OBJECT, VaultConfig

    seen: dict[bytes, str] = {}
    for s in stores:
        try:
            raw = s.get(CONFIG_OBJECT, layout.MAX_CONFIG)
        except ObjectNotFound:
            continue
        cfg = VaultConfig.from_bytes(raw, f"{s.url}/{CONFIG_OBJECT}")
        seen.setdefault(cfg.vault_id, s.url)
    if len(seen) > 1:
        raise ConfigError("the stores hold different vaults: " + ", ".join(seen.values()))


class _LaterStore(PlainStore):
    """A member store that could not be opened: every call tries to open it first."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._store: ObjectStore | None = None

    def _s(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.url)
        return self._store

    def put(self, name: str, data: bytes) -> None:
        self._s().put(name, data)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        return self._s().put_if_absent(name, data)

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        return self._s().get(name, max_size, check)

    def get_range(self, name: str, offset: int, length: int, size: int | None) -> bytes:
        return self._s().get_range(name, offset, length, size)

    def delete(self, name: str) -> None:
        self._s().delete(name)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self._s().list(prefix)

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        return self._s().list_aged(prefix)

    def exists(self, name: str) -> bool:
        return self._s().exists(name)

    def sync(self) -> None:
        self._s().sync()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
