"""One object store over several: every object is written to several member stores.

Contract (on top of :class:`cryptfs.stores.base.ObjectStore`):

* :meth:`put` writes to the object's targets (every member, or ``copies`` of them chosen by
  rendezvous hashing, healthy members first) in parallel and returns once ``quorum`` of them
  have it; the others finish in the background. A member that is known to be down, or whose
  queue is full once the quorum is reached, is not waited for: its copy is reported missing.
  Fewer than ``quorum`` copies is a :class:`StoreError` (the caller retries).
* Every outcome of a copy is reported to ``on_copy(name, member_id, ok)`` (given, like
  ``on_stray``, when the store is built), exactly once per attempt, so the layer above can
  record which stores hold what and re-copy what is missing. Nothing is retried here and
  nothing is persisted here.
* :meth:`get` reads from the fastest healthy member; on an error, a stall (no answer within a
  few times that member's usual latency) or a copy that ``check`` rejects, it asks the next
  member. A rejected or absent copy is reported (``ok=False``) and re-written from the good
  copy in the background.
* :meth:`list` is the union of the members that answer (members believed down are not asked
  while any other is up); :meth:`delete` removes the object from every member that answers and
  reports the others to ``on_stray`` (their copies are deleted later); :meth:`put_if_absent`
  succeeds when a quorum of members created the object.

Members never share credentials: each member store was opened from its own URL.

Longer than ~400 lines: the quorum rules for every store operation, which must agree with
each other (a put's quorum is what a get and a list rely on).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

from cryptfs.errors import IntegrityError, ObjectNotFound, ObjectTooLarge, StoreError
from cryptfs.stores.base import ObjectStore, range_of_whole

log = logging.getLogger("cryptfs.vault.replicas")
T = TypeVar("T")

MEMBER_WORKERS = 8
MEMBER_QUEUE = 32  # puts in flight or queued per member before a laggard copy is left to repair
MAX_BACKOFF = 30.0


@dataclass(eq=False)
class Member:
    """One store of a replicated vault, with what we learnt of its health."""

    id: str
    store: ObjectStore
    latency: float = 0.05  # moving average of successful calls, seconds
    failures: int = 0
    down_until: float = 0.0
    pool: ThreadPoolExecutor = field(init=False)
    slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(MEMBER_WORKERS, thread_name_prefix=f"store-{self.id}")
        self.slots = threading.BoundedSemaphore(MEMBER_QUEUE)

    @property
    def url(self) -> str:
        return self.store.url

    def down(self) -> bool:
        return time.monotonic() < self.down_until

    def ok(self, seconds: float) -> None:
        self.latency = 0.8 * self.latency + 0.2 * seconds
        if self.failures:
            log.info("store %s (%s) answers again", self.id, self.url)
        self.failures = 0
        self.down_until = 0.0

    def failed(self, err: Exception) -> None:
        if not self.failures:
            log.warning("store %s (%s) failed: %s", self.id, self.url, _line(err))
        self.failures += 1
        self.down_until = time.monotonic() + min(MAX_BACKOFF, 2.0 ** min(self.failures, 8))

    def call(self, fn: Callable[[], object]) -> object:
        """Run one store call, keeping the health record (not-found is a healthy answer)."""
        t0 = time.monotonic()
        try:
            out = fn()
        except ObjectNotFound:
            self.ok(time.monotonic() - t0)
            raise
        except StoreError as e:
            self.failed(e)
            raise
        self.ok(time.monotonic() - t0)
        return out


def _line(e: Exception) -> str:
    line = getattr(e, "line", None)
    return line() if callable(line) else str(e)


def default_quorum(copies: int) -> int:
    """Copies that must be stored before a write counts: half of them, rounded up, so that
    with two stores one being down does not stop writes."""
    return max(1, (copies + 1) // 2)


class ReplicatedStore:
    """An :class:`ObjectStore` over several members (see the module docstring)."""

    appendable = False  # (a copy appended on some members only could not be levelled)

    def __init__(
        self,
        members: list[Member],
        copies: int = 0,
        quorum: int = 0,
        on_copy: Callable[[str, str, bool], None] | None = None,
        on_stray: Callable[[str, str], None] | None = None,
    ) -> None:
        if not members:
            raise ValueError("a replicated store needs at least one member")
        self.members = members
        self.copies = min(copies, len(members)) if copies > 0 else len(members)
        self.quorum = min(quorum, self.copies) if quorum > 0 else default_quorum(self.copies)
        self.on_copy = on_copy
        self.on_stray = on_stray
        self.url = " + ".join(m.url for m in members)
        self._inflight = 0
        self._idle = threading.Condition()

    def _submit(self, m: Member, fn: Callable[[], object]) -> Future[object]:
        """Run ``fn`` on ``m``'s workers, counted for :meth:`drain`."""
        with self._idle:
            self._inflight += 1

        def run() -> object:
            try:
                return fn()
            finally:
                with self._idle:
                    self._inflight -= 1
                    self._idle.notify_all()

        return m.pool.submit(run)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the background copies; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _report(self, name: str, m: Member, ok: bool) -> None:
        if self.on_copy is not None:
            try:
                self.on_copy(name, m.id, ok)
            except Exception:  # noqa: BLE001 - bookkeeping must not fail a store call
                log.exception("recording the copy of %s on %s failed", name, m.id)

    # -- placement ----------------------------------------------------------------------------
    def targets(self, name: str) -> list[Member]:
        """The members that should hold ``name``: all, or ``copies`` of them by rendezvous
        hashing with members that are up first."""
        if self.copies >= len(self.members):
            return list(self.members)

        def score(m: Member) -> tuple[bool, bytes]:
            return m.down(), hashlib.blake2b(f"{m.id}/{name}".encode(), digest_size=8).digest()

        return sorted(self.members, key=score)[: self.copies]

    def read_order(self) -> list[Member]:
        """Healthy members by latency, then the ones believed down (a last resort)."""
        return sorted(self.members, key=lambda m: (m.down(), m.latency))

    # -- writing ------------------------------------------------------------------------------
    def append(self, name: str, at: int, data: bytes) -> None:
        raise NotImplementedError("objects of several stores are put whole")

    def put(self, name: str, data: bytes) -> None:
        """Store ``name`` on the quorum of its targets (the rest complete in the background)."""
        targets = self.targets(name)
        if len(self.members) == 1:
            m = targets[0]
            m.call(lambda: m.store.put(name, data))
            self._report(name, m, True)
            return
        need = self.quorum
        cv = threading.Condition()
        state = {"ok": 0, "failed": 0, "open": 0}
        errors: list[str] = []

        def run(m: Member) -> None:
            try:
                m.call(lambda: m.store.put(name, data))
                ok = True
            except StoreError as e:
                ok = False
                errors.append(f"{m.id}: {_line(e)}")
            finally:
                m.slots.release()
            self._report(name, m, ok)
            with cv:
                state["ok" if ok else "failed"] += 1
                state["open"] -= 1
                cv.notify_all()

        waiting: list[Member] = []
        for m in targets:
            if m.down():
                self._report(name, m, False)
                errors.append(f"{m.id}: down")
                continue
            if m.slots.acquire(blocking=False):
                with cv:
                    state["open"] += 1
                self._submit(m, lambda m=m: run(m))
            else:
                waiting.append(m)
        with cv:
            submitted = state["open"]
        for m in waiting:  # queues full: wait for a slot only while the quorum needs this copy
            if submitted >= need:
                self._report(name, m, False)
                continue
            m.slots.acquire()
            with cv:
                state["open"] += 1
            submitted += 1
            self._submit(m, lambda m=m: run(m))
        with cv:
            while state["ok"] < need and state["open"] > 0:
                if state["ok"] + state["open"] < need:
                    break
                cv.wait()
            if state["ok"] < need:
                raise StoreError(
                    f"only {state['ok']} of the {need} copies of {name} needed were stored "
                    f"({'; '.join(errors) or 'stores down'})"
                )

    def put_if_absent(self, name: str, data: bytes) -> bool:
        created = []
        for m in self.members:
            if m.down():
                continue
            try:
                if m.call(lambda m=m: m.store.put_if_absent(name, data)):
                    created.append(m)
            except StoreError:
                continue
        if len(created) >= self.quorum:
            return True
        for m in created:
            try:
                m.store.delete(name)
            except StoreError:
                pass
        return False

    def delete(self, name: str) -> None:
        """Delete from every member; one that is down or fails is reported to ``on_stray``
        (its copy must be deleted later). A StoreError only if no member deleted it."""
        errors: list[Exception] = []
        for m in self.members:
            try:
                if m.down():
                    raise StoreError(f"store {m.id} is down")
                m.call(lambda m=m: m.store.delete(name))
            except StoreError as e:
                errors.append(e)
                if self.on_stray is not None:
                    self.on_stray(name, m.id)
        if len(errors) == len(self.members):
            raise errors[0]

    def sync(self) -> None:
        for m in self.members:
            if not m.down():
                try:
                    m.call(m.store.sync)
                except StoreError:
                    pass

    # -- reading ------------------------------------------------------------------------------
    def get_range(self, name: str, offset: int, length: int, size: int | None) -> bytes:
        """The range from the fastest member; if its copy is missing, of another size or the
        member fails, from a whole copy :meth:`get` finds (see
        :func:`cryptfs.stores.base.range_of_whole`). A range whose bytes fail above (a bad
        segment) is read again by the caller through :meth:`get`, which tries every copy."""
        order = self.read_order()
        if order:
            m = order[0]
            try:
                data = m.call(lambda: m.store.get_range(name, offset, length, size))
                assert isinstance(data, bytes)
                return data
            except (StoreError, IntegrityError):
                pass
        return range_of_whole(self, name, offset, length, size)

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        """The object from the fastest member that has a good copy (``check`` accepts it); a
        copy bigger than ``max_size`` counts as corrupt."""
        order = self.read_order()
        if len(order) == 1:
            m = order[0]
            blob = m.call(lambda: m.store.get(name, max_size))
            assert isinstance(blob, bytes)
            if check is not None and not check(blob):
                raise IntegrityError(f"the only copy of {name} fails its check")
            return blob
        futures: dict[Future[object], Member] = {}
        missing: list[Member] = []
        bad: list[Member] = []
        errors: list[str] = []
        queue = list(order)

        def launch() -> None:
            m = queue.pop(0)
            futures[self._submit(m, lambda: m.call(lambda: m.store.get(name, max_size)))] = m

        launch()
        while futures:
            # a stall (no answer within a few usual latencies): ask the next member as well
            hedge = max(1.0, 5 * min(m.latency for m in futures.values())) if queue else None
            done, _ = wait(list(futures), timeout=hedge, return_when=FIRST_COMPLETED)
            if not done:
                launch()
                continue
            for f in done:
                m = futures.pop(f)
                try:
                    blob = f.result()
                except ObjectNotFound:
                    missing.append(m)
                    continue
                except ObjectTooLarge:
                    log.warning("the copy of %s on store %s (%s) is oversized; reading another",
                                name, m.id, m.url)
                    bad.append(m)
                    continue
                except StoreError as e:
                    errors.append(f"{m.id}: {_line(e)}")
                    continue
                assert isinstance(blob, bytes)
                if check is not None and not check(blob):
                    log.warning("the copy of %s on store %s (%s) is corrupt; reading another",
                                name, m.id, m.url)
                    bad.append(m)
                    continue
                everywhere = self.copies >= len(self.members)
                self._heal(name, blob, bad + (missing if everywhere else []))
                return blob
            if not futures and queue:
                launch()
        if bad:
            raise IntegrityError(f"every copy of {name} fails its check "
                                 f"({', '.join(m.id for m in bad)})")
        if missing and not errors:
            raise ObjectNotFound(f"object {name} not found in any store")
        raise StoreError(f"no store could return {name}: {'; '.join(errors)}"
                         + (f"; missing on {', '.join(m.id for m in missing)}" if missing else ""))

    def _heal(self, name: str, blob: bytes, members: list[Member]) -> None:
        """Report the missing or corrupt copies and write them again from a good one."""
        for m in members:
            self._report(name, m, False)
            if m.down() or not m.slots.acquire(blocking=False):
                continue  # the repair pass copies it later

            def rewrite(m: Member = m) -> None:
                try:
                    m.call(lambda: m.store.put(name, blob))
                    log.info("repaired the copy of %s on store %s", name, m.id)
                    self._report(name, m, True)
                except StoreError:
                    pass
                finally:
                    m.slots.release()

            self._submit(m, rewrite)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        merged: dict[str, int] = {}
        for _m, items in self._each(lambda s: list(s.list(prefix))):
            for n, size in items:
                merged.setdefault(n, size)
        yield from sorted(merged.items())

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        merged: dict[str, tuple[int, float]] = {}
        for _m, items in self._each(lambda s: list(s.list_aged(prefix))):
            for n, size, t in items:
                old = merged.get(n)
                merged[n] = (size, t if old is None else min(t, old[1]))
        for n, (size, t) in sorted(merged.items()):
            yield n, size, t

    def _each(self, fn: Callable[[ObjectStore], T]) -> list[tuple[Member, T]]:
        """``fn`` on every member that answers; a StoreError only if none does."""
        out: list[tuple[Member, T]] = []
        errors: list[StoreError] = []
        up = [m for m in self.members if not m.down()] or self.members
        for m in up:
            try:
                out.append((m, m.call(lambda m=m: fn(m.store))))  # type: ignore[arg-type]
            except StoreError as e:
                errors.append(e)
        if not out and errors:
            raise errors[0]
        return out

    def exists(self, name: str) -> bool:
        return any(found for _m, found in self._each(lambda s: s.exists(name)))

    def close(self) -> None:
        for m in self.members:
            m.pool.shutdown(wait=False, cancel_futures=True)
            try:
                m.store.close()
            except Exception:  # noqa: BLE001
                pass
