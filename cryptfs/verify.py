"""``cryptfs verify``: check the ledger chain and anchors, and every object against metadata.

Read-only unless ``accept`` is given. Each problem is one line that names the affected file
paths; the result says whether the vault is clean.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cryptfs import crypto
from cryptfs.codec import DATA_PREFIX, ChunkRef
from cryptfs.errors import CryptfsError
from cryptfs.vault import CHECKPOINT_PREFIX, META_PREFIX, Vault


@dataclass
class Problem:
    kind: str
    message: str
    object: str = ""
    paths: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f" (files: {', '.join(self.paths)})" if self.paths else ""
        return f"{self.kind}: {self.message}{where}"

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "message": self.message,
            "object": self.object,
            "paths": self.paths,
        }


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    ledger_entries: int = 0
    objects_checked: int = 0
    objects_downloaded: int = 0
    store_objects: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "clean" if self.clean else f"{len(self.problems)} problem(s)"
        return (
            f"verify: {state} - {self.ledger_entries} ledger entries, "
            f"{self.objects_checked} objects checked, {self.objects_downloaded} downloaded "
            f"and authenticated, {self.store_objects} objects in the store"
        )


class Progress:
    """A one-line progress bar on a terminal (stderr); silent in a pipe."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._lock = threading.Lock()

    def step(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.enabled and (self.done % 50 == 0 or self.done >= self.total):
                pct = 100 * self.done // self.total
                bar = "#" * (pct // 4)
                sys.stderr.write(f"\r{self.label} [{bar:<25}] {self.done}/{self.total} ")
                sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def verify(
    vault: Vault, full: bool = False, workers: int = 16, progress: bool | None = None
) -> Report:
    assert vault.meta is not None and vault.ledger is not None
    meta, led = vault.meta, vault.ledger
    rep = Report()

    def paths_for(name: str) -> list[str]:
        return [p for ino in meta.object_users(name) for p in meta.paths_of(ino)]

    rep.ledger_entries = led.count()
    for msg in vault.anchor_problems():
        kind = "ledger" if msg.startswith("ledger") else "anchor"
        rep.problems.append(Problem(kind, msg.removeprefix("ledger: ")))

    # what the ledger says about each object: its last operation
    last_op: dict[str, tuple[str, int, bytes]] = {}
    for e in led.entries():
        last_op[e.name] = (e.op, e.seq, e.sha256)

    in_store = dict(vault.store.list(""))
    rep.store_objects = len(in_store)
    rows = meta.all_objects()
    known = {ref.name for ref, _, _ in rows}
    referenced: list[ChunkRef] = []
    for ref, refcount, state in rows:
        if state == "staged":
            continue  # not uploaded yet: it is in the staging area
        if not ref.name.startswith(DATA_PREFIX):
            continue
        if refcount <= 0:
            continue
        rep.objects_checked += 1
        referenced.append(ref)
        size = in_store.get(ref.name)
        if size is None:
            rep.problems.append(
                Problem(
                    "missing",
                    f"object {ref.name} is missing from the store",
                    ref.name,
                    paths_for(ref.name),
                )
            )
        elif size != ref.size:
            rep.problems.append(
                Problem(
                    "changed",
                    f"object {ref.name} has {size} bytes, {ref.size} recorded",
                    ref.name,
                    paths_for(ref.name),
                )
            )
        op = last_op.get(ref.name)
        if op is None or op[0] != "put":
            rep.problems.append(
                Problem(
                    "ledger",
                    f"object {ref.name} has no ledger entry",
                    ref.name,
                    paths_for(ref.name),
                )
            )
        elif op[2] != ref.sha256:
            rep.problems.append(
                Problem(
                    "ledger",
                    f"object {ref.name}: its recorded hash differs from ledger entry {op[1]}",
                    ref.name,
                    paths_for(ref.name),
                )
            )

    for name in sorted(in_store):
        if name in known or name == "config" or name.startswith(("lease", "tmp/")):
            continue
        op = last_op.get(name)
        if op is not None and op[0] == "del":
            rep.problems.append(
                Problem(
                    "replayed",
                    f"object {name} was deleted at ledger "
                    f"sequence {op[1]} but is in the store again",
                    name,
                )
            )
        elif name.startswith((DATA_PREFIX, META_PREFIX, CHECKPOINT_PREFIX)):
            rep.problems.append(
                Problem(
                    "unreferenced", f"object {name} is in the store but nothing references it", name
                )
            )
        else:
            rep.problems.append(Problem("unknown", f"object {name} is not a cryptfs object", name))

    if full:
        todo = [r for r in referenced if r.name in in_store]
        bar = Progress("verify", len(todo), progress)
        lock = threading.Lock()

        def check(ref: ChunkRef) -> None:
            try:
                blob = vault.store.get(ref.name)
                if crypto.sha256(blob) != ref.sha256:
                    raise CryptfsError(f"object {ref.name} does not match its recorded hash")
                vault.codec.open_chunk_unchecked(ref.name, blob)
            except CryptfsError as e:
                with lock:
                    rep.problems.append(Problem("corrupt", str(e), ref.name, []))
            finally:
                with lock:
                    rep.objects_downloaded += 1
                bar.step()

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(check, todo))
        bar.finish()
        for p in rep.problems:
            if p.kind == "corrupt" and not p.paths:
                p.paths = paths_for(p.object)
    return rep


def accept(vault: Vault, say: Callable[[str], None]) -> None:
    """Re-anchor: record an 'accept' ledger entry and write a fresh checkpoint from the local
    state, so the current state becomes the reference for later checks."""
    assert vault.ledger is not None and vault.fs is not None
    with vault.fs.lock:
        head = vault.ledger.head()
        seq = head.seq if head else 0
    for name, size in list(vault.store.list(CHECKPOINT_PREFIX)):
        tail = name[len(CHECKPOINT_PREFIX) :]
        if tail.isdigit() and int(tail) > seq:  # ahead of the ledger being accepted
            vault.store.delete(name)
            with vault.fs.lock:
                vault.ledger.append("del", name, size, b"\0" * 32)
    with vault.fs.lock:
        vault.ledger.append("accept", f"seq-{seq}", 0, b"\0" * 32)
    vault.sync()
    say("verify: accepted the current state; a new checkpoint anchors it")
