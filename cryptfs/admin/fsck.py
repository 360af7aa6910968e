"""``cryptfs fsck``: check the metadata's invariants against each other, the staging area and
the store, and repair what is safe to repair.

Safe repairs change only derived or dangling state: reference counts, link counts, entries that
point at nothing, inodes nothing points at, staged uploads that already reached the store, stray
staged files. Anything that would need data we do not have (a chunk missing from the store) is
reported, never papered over.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from cryptfs.format import crypto
from cryptfs.format.codec import DATA_PREFIX
from cryptfs.format.layout import PACK_PREFIX
from cryptfs.meta import ROOT_INO
from cryptfs.meta.namespace import HIDDEN
from cryptfs.vault.core import Vault


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.clean:
            return f"fsck: clean ({len(self.repaired)} repaired)"
        return f"fsck: {len(self.problems)} problem(s) left, {len(self.repaired)} repaired"


def fsck(vault: Vault, repair: bool = False) -> FsckReport:
    """Check (and with ``repair`` repair) ``vault``. On a vault other machines share, a check
    reads the metadata as of one moment and does not report their uploads in flight (a
    staged object neither here nor in the store yet) nor an object collected since that
    moment; a repair needs the vault alone (``Vault.open(alone=True)``). Runs under the
    filesystem lock, which guards the engine's connection (the change-notice thread of a
    shared vault checks the ledger on it), as verify and gc do."""
    assert vault.meta is not None and vault.ledger is not None and vault.fs is not None
    with vault.fs.lock:
        return _fsck(vault, repair)


def _fsck(vault: Vault, repair: bool) -> FsckReport:
    assert vault.meta is not None and vault.ledger is not None
    meta = vault.meta
    rep = FsckReport()

    def found(msg: str, fix: str | None = None,
              apply: Callable[[], None] | None = None) -> None:
        if repair and apply is not None:
            apply()
            rep.repaired.append(f"{msg}: {fix}")
        else:
            rep.problems.append(msg + (f" (fsck --repair: {fix})" if fix else ""))

    # checking while other machines write (a shared database): the metadata as of one moment
    others = meta.shared and not repair and bool(meta.live_sessions())
    with meta.transaction() if repair else meta.snapshot():
        inodes = meta.inode_modes()
        if ROOT_INO not in inodes:
            rep.problems.append("the root directory is missing")
        links: Counter[int] = Counter()
        subdirs: Counter[int] = Counter()
        entries = meta.all_dentries()
        names = Counter(ino for _p, _n, ino in entries)
        visible = Counter(ino for _p, n, ino in entries if not n.startswith(HIDDEN))
        for parent, name, ino in entries:
            shown = name.decode("utf-8", "surrogateescape")
            drop = partial(meta.remove_dentry, parent, name)
            if ino not in inodes:
                found(f"entry '{shown}' in directory {parent} points at missing inode {ino}",
                      "entry removed", drop)
                continue
            if parent not in inodes or not stat.S_ISDIR(inodes[parent][0]):
                found(f"entry '{shown}' has a parent {parent} that is not a directory",
                      "entry removed", drop)
                continue
            if name.startswith(HIDDEN) and (names[ino] > inodes[ino][1] or visible[ino]):
                # libfuse's name for a file unlinked while open: not a link (the inode has
                # more names than links, or another name); a user's lone file whose name only
                # begins the same way is a link like any other
                found(f"leftover hidden entry '{shown}' (a file unlinked while open)",
                      "entry removed", drop)
                continue
            links[ino] += 1
            if stat.S_ISDIR(inodes[ino][0]):
                subdirs[parent] += 1
        for ino, (mode, nlink) in inodes.items():
            if ino == ROOT_INO:
                want = 2 + subdirs[ino]
            elif links[ino] == 0:
                found(f"inode {ino} has no name (orphan)", "inode removed",
                      partial(meta.drop_inode_rows, ino))
                continue
            elif stat.S_ISDIR(mode):
                want = 2 + subdirs[ino]
            else:
                want = links[ino]
            if nlink != want:
                found(f"inode {ino} has link count {nlink}, its names say {want}",
                      "link count fixed", partial(meta.set_nlink, ino, want))

        # chunk maps and reference counts
        objects = meta.object_states()
        uses: Counter[str] = Counter()
        for ino, idx, obj in meta.all_blocks():
            if ino not in inodes:
                found(f"chunk {idx} of missing inode {ino}", "chunk map entry removed",
                      partial(meta.drop_block, ino, idx))
                continue
            if obj not in objects:
                paths = ", ".join(meta.paths_of(ino)) or f"inode {ino}"
                rep.problems.append(f"{paths}: chunk {idx} refers to unknown object {obj}")
                continue
            uses[obj] += 1
        for name, (refcount, _state, _size) in objects.items():
            if name.startswith(DATA_PREFIX) and refcount != uses[name]:
                found(f"object {name} has reference count {refcount}, {uses[name]} chunks use "
                      "it", "count fixed", partial(meta.set_refcount, name, uses[name]))

    # staged uploads and presence in the store
    store_sizes = dict(vault.store.list(DATA_PREFIX))
    store_sizes.update(vault.store.list(PACK_PREFIX))
    staging = vault.paths.staging
    staged_files = {p.name for p in staging.iterdir()} if staging.is_dir() else set()
    pack_of = {r.name: r.pack for r, _rc, _st in meta.all_objects() if r.pack is not None}
    staged_packs = {pack_of[n] for n, (_rc, st, _z) in objects.items()
                    if st == "staged" and n in pack_of}
    with meta.transaction():
        for name, (refcount, state, size) in objects.items():
            if not name.startswith(DATA_PREFIX):
                continue
            pack = pack_of.get(name)
            if pack is not None:  # in a pack (docs/FORMAT.md 4.3): the pack must be there
                if pack.replace("/", "_") in staged_files or pack in store_sizes:
                    continue  # (staged: closed and uploaded at the next mount)
                if state == "staged" or refcount > 0:
                    users = [p for i in meta.object_users(name) for p in meta.paths_of(i)]
                    rep.problems.append(f"object {name} is in pack {pack}, which is missing "
                                        f"from the store (files: {', '.join(users) or '-'})")
                continue
            fname = name.replace("/", "_")
            if state == "staged":
                if fname in staged_files:
                    continue  # uploaded at the next mount
                if store_sizes.get(name) == size:
                    blob = vault.store.get(name, size)
                    (ref, _rc, _st) = meta.get_object(name)  # type: ignore[misc]
                    if crypto.sha256(blob) == ref.sha256:
                        if repair:
                            vault.ledger.append("put", name, size, ref.sha256)
                        found(f"object {name} is in the store but marked as staged",
                              "marked stored", partial(meta.mark_stored, name))
                        continue
                if others:
                    continue  # (may be another machine's upload, still going on)
                users = [p for i in meta.object_users(name) for p in meta.paths_of(i)]
                rep.problems.append(f"object {name} was staged but neither the staged file nor "
                                    f"the object exists (files: {', '.join(users) or '-'})")
            elif refcount > 0 and name not in store_sizes:
                now = meta.get_object(name) if others else None
                if others and (now is None or now[1] <= 0):
                    continue  # unreferenced since the snapshot, and collected

                users = [p for i in meta.object_users(name) for p in meta.paths_of(i)]
                rep.problems.append(f"object {name} is missing from the store (files: "
                                    f"{', '.join(users) or '-'})")
        for fname in sorted(staged_files):
            name = fname.replace("_", "/", 2)
            if name.startswith(PACK_PREFIX):
                name = fname.replace("_", "/", 1)
                if name in staged_packs:
                    continue
            elif name in objects and objects[name][1] == "staged":
                continue
            if repair:
                (staging / fname).unlink(missing_ok=True)
                rep.repaired.append(f"stray staged file {fname}: removed")
            else:
                rep.problems.append(f"stray staged file {fname} (fsck --repair: removed)")

    _n, chain = vault.ledger.verify_chain()
    rep.problems.extend(chain)
    return rep



