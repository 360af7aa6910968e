"""The chunk store's read side on a remote store: the disk cache (LRU by bytes, entries checked
before use, torn or tampered entries dropped, scan resistance) and fetch de-duplication.

One layer only: the store is an in-memory object store that counts its reads.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cryptfs.chunks.chunkstore import ChunkStore
from cryptfs.chunks.diskcache import DiskCache
from cryptfs.errors import IntegrityError
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.stores.memory import MemoryStore

BOUND = 1 << 30  # the most bytes a test reads of one object

pytestmark = pytest.mark.timeout(60)


class CountingStore(MemoryStore):
    """A memory store that counts reads per object and can hold them back."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: dict[str, int] = {}
        self.gate = threading.Event()
        self.gate.set()

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        self.gets[name] = self.gets.get(name, 0) + 1
        assert self.gate.wait(10)
        return super().get(name, max_size, check)


def make(tmp_path: Path, cache_bytes: int = 1 << 20) -> tuple[ChunkStore, CountingStore]:
    store = CountingStore()
    refs: dict[str, ChunkRef] = {}
    cs = ChunkStore(
        store,
        Codec(os.urandom(32), os.urandom(16)),
        remote=True,
        staging=tmp_path / "staging",
        cache=tmp_path / "cache",
        cache_bytes=cache_bytes,
        lookup=refs.get,
        on_stored=lambda r: refs.__setitem__(r.name, r),
    )
    return cs, store


def stored(cs: ChunkStore, data: bytes) -> ChunkRef:
    """Put a chunk, wait for its upload, and empty the cache and memory of it."""
    ref = cs.put(data)
    cs.unpin([ref.name])
    cs.wait_uploaded()
    assert cs.cache is not None
    cs.cache.discard(ref.name)
    cs._mem.clear()
    cs._mem_size = 0
    return ref


def test_fetched_chunk_is_cached_and_served_from_disk(tmp_path: Path) -> None:
    cs, store = make(tmp_path)
    try:
        ref = stored(cs, b"a" * 5000)
        assert cs.get(ref) == b"a" * 5000
        assert store.gets[ref.name] == 1
        cs._mem.clear()
        assert cs.get(ref) == b"a" * 5000
        assert store.gets[ref.name] == 1  # the second read came from the disk cache
        entry = cs.cache.path(ref.name)
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600
        assert entry.read_bytes() == store.get(ref.name, BOUND)  # sealed, exactly as stored
    finally:
        cs.close()


@pytest.mark.parametrize("damage", ["torn", "flipped", "swapped"])
def test_bad_cache_entry_is_dropped_and_fetched_again(tmp_path: Path, damage: str) -> None:
    cs, store = make(tmp_path)
    try:
        ref = stored(cs, b"b" * 9000)
        other = stored(cs, b"c" * 9000)
        cs.get(ref)
        cs._mem.clear()
        entry = cs.cache.path(ref.name)
        blob = entry.read_bytes()
        if damage == "torn":  # a crash in the middle of an in-place write
            entry.write_bytes(blob[: len(blob) // 2])
        elif damage == "flipped":
            entry.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        else:  # another object's valid bytes under this name
            entry.write_bytes(store.get(other.name, BOUND))
        assert cs.get(ref) == b"b" * 9000
        assert store.gets[ref.name] == 2
        assert entry.read_bytes() == blob  # rewritten from the store
    finally:
        cs.close()


def test_cache_is_lru_by_bytes(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 10_000)
    for name in "abc":
        cache.write(f"data/{name}", name.encode() * 4000)
    # 12,000 bytes offered to a 10,000-byte cache: the oldest went
    assert cache.bytes == 8000
    assert not cache.path("data/a").exists()
    ref_b = ChunkRef("data/b", 4000, hashlib.sha256(b"b" * 4000).digest())
    assert cache.read(ref_b) == b"b" * 4000  # b is now the most recently used
    cache.write("data/d", b"d" * 4000)
    assert cache.path("data/b").exists() and cache.path("data/d").exists()
    assert not cache.path("data/c").exists()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["data_b", "data_d"]


def test_cache_survives_restart_and_is_trimmed_to_a_smaller_limit(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 100_000)
    for i in range(5):
        cache.write(f"data/{i}", bytes([i]) * 1000)
        os.utime(cache.path(f"data/{i}"), (time.time() + i, time.time() + i))
    (tmp_path / "c" / "data_x.1234.tmp").write_bytes(b"left by a crash")
    again = DiskCache(tmp_path / "c", 100_000)
    assert again.bytes == 5000
    assert not (tmp_path / "c" / "data_x.1234.tmp").exists()
    smaller = DiskCache(tmp_path / "c", 2500)  # the newest two stay
    assert smaller.bytes == 2000
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["data_3", "data_4"]


def test_disabled_cache_keeps_nothing(tmp_path: Path) -> None:
    cs, store = make(tmp_path, cache_bytes=0)
    try:
        ref = stored(cs, b"e" * 3000)
        assert cs.get(ref) == b"e" * 3000
        assert list((tmp_path / "cache").iterdir()) == []
        assert list((tmp_path / "staging").iterdir()) == []
    finally:
        cs.close()


def test_uncached_reads_leave_the_cache_alone(tmp_path: Path) -> None:
    """What a sequential read of a big file uses (keep=False): fetched, not kept on disk."""
    cs, store = make(tmp_path)
    try:
        small = stored(cs, b"s" * 2000)
        cs.get(small)
        refs = [stored(cs, bytes([i]) * 3000) for i in range(1, 6)]
        cs.prefetch(refs[1:], keep=False)
        assert [cs.get(r, keep=False) for r in refs] == [bytes([i]) * 3000 for i in range(1, 6)]
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [small.name.replace("/", "_")]
        assert cs.stream_cache_limit == (1 << 20) // 4
    finally:
        cs.close()


def test_read_waits_for_a_fetch_in_flight_instead_of_fetching_twice(tmp_path: Path) -> None:
    cs, store = make(tmp_path)
    try:
        ref = stored(cs, b"f" * 4000)
        store.gate.clear()
        cs.prefetch([ref])
        deadline = time.monotonic() + 5
        while store.gets.get(ref.name, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(cs.get(ref)))
        reader.start()
        time.sleep(0.2)
        store.gate.set()
        reader.join(10)
        assert got == [b"f" * 4000]
        assert store.gets[ref.name] == 1
    finally:
        store.gate.set()
        cs.close()


def test_adopt_from_another_filesystem(tmp_path: Path) -> None:
    """An uploaded staging file moves into the cache also when the cache lies on another
    filesystem (rename fails with EXDEV there): it is copied, and the staging file goes."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("/dev/shm (a tmpfs) is needed to put the staging file on another filesystem")
    staged = shm / f"cryptfs-test-staged-{os.getpid()}"
    staged.write_bytes(b"z" * 5000)
    try:
        cache = DiskCache(tmp_path / "c", 100_000)
        assert os.stat(staged).st_dev != os.stat(tmp_path / "c").st_dev
        cache.adopt(staged, "data/zz")
        assert not staged.exists()
        assert cache.path("data/zz").read_bytes() == b"z" * 5000
        assert cache.bytes == 5000
    finally:
        staged.unlink(missing_ok=True)


class GatedPuts(MemoryStore):
    """A memory store whose puts wait for ``gate`` and are counted; the first put's object is
    deleted right after it lands (as by another machine's collection)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0
        self.gate = threading.Event()

    def put(self, name: str, data: bytes) -> None:
        assert self.gate.wait(10)
        super().put(name, data)
        self.puts += 1
        if self.puts == 1:
            self.delete(name)


@pytest.mark.parametrize("spill", [False, True])
def test_a_chunk_stored_again_while_its_upload_is_in_flight_is_uploaded_again(
    tmp_path: Path, spill: bool,
) -> None:
    """On a vault other machines write (``keep_dedup``) a fresh put keeps its chunk (in
    memory, or spilled: a link to the staged file), and restore() of it while its upload is
    in flight (that upload may land before another machine's collection deletes the object)
    makes the upload put it once more: the object is in the store afterwards, the same bytes
    (convergent sealing), and the staging accounting is back to zero."""
    store = GatedPuts()
    cs = ChunkStore(store, Codec(os.urandom(32), os.urandom(16)), remote=True,
                    staging=tmp_path / "staging", cache=None, cache_bytes=0,
                    lookup=lambda _n: None, on_stored=lambda _r: None, keep_dedup=True,
                    keep_bytes=0 if spill else 1 << 20)
    try:
        data = os.urandom(5000)
        ref = cs.put(data)
        assert cs.kept(ref.name) and cs.kept_new(ref.name)
        assert (tmp_path / "staging" / (ref.name.replace("/", "_") + ".kept")).exists() == spill
        again = cs.restore(ref.name)  # (the commit found it collected)
        assert again == ref
        store.gate.set()
        cs.wait_uploaded()
        assert store.puts == 2 and store.exists(ref.name) and cs.pending() == (0, 0)
        assert ref.matches(store.get(ref.name, 1 << 20))
        cs.unpin([ref.name])
        assert not cs.kept(ref.name) and not list((tmp_path / "staging").iterdir())
    finally:
        store.gate.set()
        cs.close()


# -- packs (docs/FORMAT.md 4.3) -----------------------------------------------------------------
def make_packing(tmp_path: Path) -> tuple[ChunkStore, CountingStore]:
    store = CountingStore()
    refs: dict[str, ChunkRef] = {}
    cs = ChunkStore(
        store,
        Codec(os.urandom(32), os.urandom(16), chunk_size=65536),
        remote=True,
        staging=tmp_path / "staging",
        cache=tmp_path / "cache",
        cache_bytes=1 << 24,
        lookup=refs.get,
        on_stored=lambda r: refs.__setitem__(r.name, r),
        packing=True,
    )
    return cs, store


def test_small_chunks_share_a_pack_read_back_by_one_fetch(tmp_path: Path) -> None:
    cs, store = make_packing(tmp_path)
    try:
        datas = [os.urandom(100 + 500 * i) for i in range(20)] + [os.urandom(65536)]
        refs = [cs.put(d, pack=True) for d in datas]
        cs.unpin([r.name for r in refs])
        cs.wait_uploaded()
        packs = [n for n, _ in store.list("packs/")]
        assert len(packs) == 1 and not any(cs.staging.iterdir())
        (pack,) = packs
        assert all(r.pack == pack for r in refs[:20]) and refs[20].pack is None  # (a full one)
        assert [r.offset for r in refs[:20]] == sorted(r.offset for r in refs[:20])
        blob = store.get(pack, BOUND)
        index = cs.codec.pack_index(pack, blob)
        assert [(m.name, m.offset, m.size, m.sha256) for m in index] == [
            (r.name, r.offset, r.size, r.sha256) for r in refs[:20]]
        with pytest.raises(IntegrityError):  # the index binds the pack's name
            cs.codec.pack_index("packs/" + "0" * 32, blob)
        assert cs.cache is not None
        cs.cache.discard(pack)
        cs._mem.clear()
        store.gets.clear()
        assert [cs.get(r) for r in refs[:20]] == datas[:20]
        assert store.gets[pack] == 1  # one fetch of the pack served every member

        cs._mem.clear()  # a damaged cached copy: dropped, the member read from the store
        entry = cs.cache.path(pack)
        cached = bytearray(entry.read_bytes())
        cached[refs[3].offset + 40] ^= 1
        entry.write_bytes(bytes(cached))
        assert cs.get(refs[3]) == datas[3]
        assert not entry.exists() or entry.read_bytes() == blob
    finally:
        cs.close()


def test_a_pack_open_at_a_crash_is_closed_with_the_recorded_members(tmp_path: Path) -> None:
    cs, store = make_packing(tmp_path)
    datas = [os.urandom(3000 + i) for i in range(5)]
    refs = [cs.put(d, pack=True) for d in datas]
    cs.close(drain=False)  # the process dies: the pack is still open, staged
    (staged,) = list((tmp_path / "staging").iterdir())
    assert staged.name.startswith("packs_") and not list(store.list("packs/"))
    cs2, _ = make_packing(tmp_path)
    cs2.store = store  # (the same bucket)
    cs2.codec = cs.codec
    try:
        recorded = refs[:3]  # only three were committed before the crash
        assert cs2.resume(recorded) == (3, 0)
        cs2.wait_uploaded()
        (pack,) = [n for n, _ in store.list("packs/")]
        assert pack == refs[0].pack
        index = cs2.codec.pack_index(pack, store.get(pack, BOUND))
        assert [m.name for m in index] == [r.name for r in recorded]
        assert [cs2.get(r) for r in recorded] == datas[:3]
    finally:
        cs2.close()
