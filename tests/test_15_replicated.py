"""The replicated store on its own, over in-memory members (one layer: no vault, no FUSE)."""

from __future__ import annotations

import threading
import time

import pytest

from cryptfs.errors import IntegrityError, ObjectNotFound, StoreError
from cryptfs.stores.memory import MemoryStore
from cryptfs.stores.replicated import Member, ReplicatedStore, default_quorum

BOUND = 1 << 30  # the most bytes a test reads of one object


class Flaky(MemoryStore):
    """A memory store that can be switched down (every call fails) or slow."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.is_down = False
        self.delay = 0.0
        self.gets = 0

    def _gate(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.is_down:
            raise StoreError(f"{self.url} is down")

    def put(self, name: str, data: bytes) -> None:
        self._gate()
        super().put(name, data)

    def get(self, name: str, max_size: int) -> bytes:
        self.gets += 1
        self._gate()
        return super().get(name, max_size)

    def list(self, prefix: str = ""):  # type: ignore[no-untyped-def]
        self._gate()
        return super().list(prefix)

    def delete(self, name: str) -> None:
        self._gate()
        super().delete(name)


def make(n: int = 2, **kw):  # type: ignore[no-untyped-def]
    stores = [Flaky(f"memory://{i}") for i in range(n)]
    events: list[tuple[str, str, bool]] = []
    lock = threading.Lock()

    def on_copy(name: str, sid: str, ok: bool) -> None:
        with lock:
            events.append((name, sid, ok))

    rs = ReplicatedStore([Member(f"s{i}", s) for i, s in enumerate(stores)], on_copy=on_copy,
                         **kw)
    return rs, stores, events


def settle(rs: ReplicatedStore) -> None:
    assert rs.drain(5.0)


def test_default_quorum_is_half_the_copies_rounded_up() -> None:
    assert [default_quorum(n) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]


def test_put_reaches_every_store_and_reports_each_copy() -> None:
    rs, stores, events = make(3)
    rs.put("data/x", b"hello")
    settle(rs)
    assert all(s.objects["data/x"] == b"hello" for s in stores)
    assert sorted(events) == [("data/x", "s0", True), ("data/x", "s1", True),
                              ("data/x", "s2", True)]


def test_one_store_down_writes_continue_and_the_missing_copy_is_reported() -> None:
    rs, stores, events = make(2)
    stores[1].is_down = True
    rs.put("data/a", b"1")  # quorum 1 of 2: s0 is enough
    settle(rs)
    assert "data/a" in stores[0].objects and "data/a" not in stores[1].objects
    assert ("data/a", "s1", False) in events
    assert rs.members[1].down()  # known down: the next put does not wait for it
    t0 = time.monotonic()
    rs.put("data/b", b"2")
    assert time.monotonic() - t0 < 1.0
    assert rs.get("data/a", BOUND) == b"1"  # reads go to the member that answers


def test_too_few_copies_is_an_error() -> None:
    rs, stores, _events = make(2, quorum=2)
    stores[1].is_down = True
    with pytest.raises(StoreError, match="only 1 of the 2 copies"):
        rs.put("data/a", b"1")


def test_corrupt_copy_is_skipped_reported_and_rewritten() -> None:
    rs, stores, events = make(2)
    rs.put("data/c", b"good")
    settle(rs)
    stores[0].objects["data/c"] = b"evil"
    rs.members[0].latency, rs.members[1].latency = 0.001, 0.002  # s0 is read first
    events.clear()
    assert rs.get("data/c", BOUND, check=lambda b: b == b"good") == b"good"
    settle(rs)
    assert stores[0].objects["data/c"] == b"good"  # healed from the good copy
    assert ("data/c", "s0", False) in events and ("data/c", "s0", True) in events


def test_every_copy_bad_or_absent() -> None:
    rs, stores, _ = make(2)
    rs.put("data/d", b"good")
    settle(rs)
    for s in stores:
        s.objects["data/d"] = b"evil"
    with pytest.raises(IntegrityError):
        rs.get("data/d", BOUND, check=lambda b: b == b"good")
    with pytest.raises(ObjectNotFound):
        rs.get("data/none", BOUND)


def test_a_stalled_store_is_overtaken_by_the_next() -> None:
    rs, stores, _ = make(2)
    rs.put("data/s", b"x")
    settle(rs)
    stores[0].delay = 3.0  # the first in read order stalls
    rs.members[0].latency = rs.members[1].latency = 0.01
    t0 = time.monotonic()
    assert rs.get("data/s", BOUND) == b"x"
    assert time.monotonic() - t0 < 2.5  # answered by the second, not after the stall
    stores[0].delay = 0.0


def test_list_is_the_union_and_survives_a_down_store() -> None:
    rs, stores, _ = make(2)
    stores[0].objects["data/1"] = b"a"
    stores[1].objects["data/2"] = b"bb"
    assert dict(rs.list("data/")) == {"data/1": 1, "data/2": 2}
    stores[0].is_down = True
    assert dict(rs.list("data/")) == {"data/2": 2}
    stores[1].is_down = True
    with pytest.raises(StoreError):
        list(rs.list("data/"))


def test_copies_less_than_stores_place_by_rendezvous() -> None:
    rs, stores, _ = make(3, copies=2)
    for i in range(60):
        rs.put(f"data/{i}", b"x")
    settle(rs)
    counts = [len(s.objects) for s in stores]
    assert sum(counts) == 120 and all(c > 10 for c in counts)  # spread over all three
    for i in range(60):
        holders = {m.id for m in rs.targets(f"data/{i}")}
        assert holders == {f"s{j}" for j, s in enumerate(stores) if f"data/{i}" in s.objects}


def test_put_if_absent_needs_a_quorum() -> None:
    rs, stores, _ = make(3)
    assert rs.put_if_absent("lease", b"me")
    assert not rs.put_if_absent("lease", b"you")
    for s in stores:
        s.objects.pop("lease")
    stores[0].objects["lease"] = b"old"
    stores[1].objects["lease"] = b"old"
    assert not rs.put_if_absent("lease", b"new")  # 1 of 3 created: below quorum 2, undone
    assert "lease" not in stores[2].objects


def test_store_list_reads_old_and_new_local_configs() -> None:
    from cryptfs.vault.storelist import StoreEntry, StoreList

    old = StoreList.from_json({"store": "file:///a"})
    assert old.entries == [StoreEntry("", "file:///a")] and not old.replicated
    new = StoreList([StoreEntry("1", "file:///a"), StoreEntry("2", "s3://b")], 2, 1)
    again = StoreList.from_json(new.to_json())
    assert again == new and again.replicated and again.find("2") == again.find("s3://b")
    with pytest.raises((ValueError, KeyError, TypeError)):
        StoreList.from_json({"stores": []})


def test_policy_limits() -> None:
    from cryptfs.errors import UsageError
    from cryptfs.vault.storelist import check_policy

    check_policy(3, 0, 0)
    check_policy(3, 2, 2)
    for copies, quorum in ((4, 0), (-1, 0), (2, 3), (0, 4)):
        with pytest.raises(UsageError):
            check_policy(3, copies, quorum)
