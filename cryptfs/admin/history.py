"""Single files in the past, without mounting it: ``cryptfs history``, ``restore``, ``prove`` and
``verify-proof`` (issue 17).

Everything here reads the store only (the snapshots, their checkpoints and metadata images,
and the newest checkpoint for the present), so it works whether or not the vault is mounted;
the past is read through a read-only vault over the snapshot's materialized metadata
(:func:`cryptfs.vault.snapshots.open_past`), so every chunk is checked as on a mount.

A *proof* is a statement, signed with an Ed25519 key derived from the vault's master key
(``HKDF(master, vault_id, "cryptfs proof signing v1")`` as the seed), that at ledger sequence
``seq``, whose entry hash is ``head`` (the head a MAC'd checkpoint of the vault carries), the
file ``path`` held ``size`` bytes with SHA-256 ``sha256``. Anyone with the vault's public
proof key (printed in every proof and by ``cryptfs prove --public-key``) can check the
signature without the vault; the vault's key holder can also check, with
``cryptfs verify-proof``, that the vault's current ledger still contains that head (its chain
verified from the start to the newest authenticated checkpoint), i.e. that nothing rewrote the
history since. See README "History you can prove" for what this does and does not prove.

Longer than ~400 lines: proofs, their verification and the log views share the ledger walk and
the proof format, which must stay in one place to stay consistent.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from cryptfs.errors import IntegrityError, ObjectNotFound, UsageError
from cryptfs.format import crypto
from cryptfs.format.codec import Codec
from cryptfs.meta.engine import ROOT_INO, Inode
from cryptfs.meta.ledger import Ledger
from cryptfs.meta.sqlite import MetaStore
from cryptfs.paths import VaultPaths, private_dir
from cryptfs.vault.checkpoints import Checkpoint, read_checkpoints
from cryptfs.vault.core import Vault
from cryptfs.vault.localstate import load_local_config
from cryptfs.vault.restore import materialize_checkpoint, materialize_newest
from cryptfs.vault.snapshots import Pins, Snapshot, open_past

PROOF_PURPOSE = b"cryptfs proof signing v1"
PROOF_TAG = b"cryptfs-proof-v1\0"
PIECE = 1 << 20
MAX_PROOF = 64 << 10


def vault_path(path: str) -> list[bytes]:
    """The components of a path inside the vault (``/a/b`` or ``a/b``)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UsageError(f"'{path}' is not a path of a file in the vault",
                         hint="give it from the vault's root, e.g. /docs/report.txt")
    return [os.fsencode(p) for p in parts]


def _canonical(parts: list[bytes]) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in parts)


@contextlib.contextmanager
def _scratch(paths: VaultPaths) -> Iterator[Path]:
    base = private_dir(paths.data_dir / "tmp")
    d = Path(tempfile.mkdtemp(dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- history ---------------------------------------------------------------------------------
@dataclass
class Version:
    label: str  # the snapshot's name, or "now" (the newest checkpoint)
    time_ns: int
    seq: int
    kind: str  # file, directory, symlink, other, absent
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    version: str = ""  # 12 hex digits naming the content (equal content stored alike (chunk
    # names, journal rows): equal version; different content: different version)


def _lookup(meta: MetaStore, parts: list[bytes]) -> Inode | None:
    ino: int | None = ROOT_INO
    for p in parts:
        assert ino is not None
        ino = meta.lookup(ino, p)
        if ino is None:
            return None
    return meta.get_inode(ino) if ino is not None else None


def _version_of(label: str, time_ns: int, ck: Checkpoint, meta: MetaStore,
                parts: list[bytes], chunk_size: int, codec: Codec) -> Version:
    node = _lookup(meta, parts)
    if node is None:
        return Version(label, time_ns, ck.seq, "absent")
    kind = ("file" if stat.S_ISREG(node.mode) else "directory" if stat.S_ISDIR(node.mode)
            else "symlink" if stat.S_ISLNK(node.mode) else "other")
    h = hashlib.sha256(f"{node.size}\0".encode())
    if kind == "file":  # chunk names are keyed hashes of their plaintext
        blocks = meta.get_blocks(node.ino, 0, -(-node.size // chunk_size))
        for idx in sorted(blocks):
            h.update(f"{idx}:{blocks[idx].name}\0".encode())
        for ino, idx, seq, off, sealed in meta.journaled():  # (bytes not sealed
            if ino == node.ino:  # into a chunk yet: docs/FORMAT.md 5.3)
                plain = codec.open_journal(ino, idx, seq, off, sealed)
                h.update(f"j{idx}:{seq}:{off}:{crypto.sha256(plain).hex()}\0".encode())
    elif kind == "symlink":
        h.update(node.target or b"")
    return Version(label, time_ns, ck.seq, kind, node.size, node.mtime_ns,
                   stat.S_IMODE(node.mode), h.hexdigest()[:12])


def history(paths: VaultPaths, master: bytes, path: str) -> list[Version]:
    """What ``path`` was in every snapshot (oldest first) and in the newest checkpoint
    ("now"). Reads the store only; IntegrityError if a snapshot's metadata fails its check."""
    parts = vault_path(path)
    stores, cfg = load_local_config(paths)
    store = stores.open()
    codec = Codec(master, cfg.vault_id)
    out: list[Version] = []
    with contextlib.closing(store), _scratch(paths) as scratch:
        pins = Pins(store, codec, scratch / "pins")
        snaps, _bad = pins.listed()
        for snap in snaps:
            ck = pins.checkpoint(snap)
            meta = materialize_checkpoint(store, codec, ck, scratch / "v.db")
            try:
                out.append(_version_of(snap.name, snap.time_ns, ck, meta, parts,
                                       cfg.chunk_size, codec))
            finally:
                meta.close()
        for _attempt in range(3):  # a running mount may replace the newest one meanwhile
            cks, _ = read_checkpoints(store, codec)
            if not cks:
                break
            try:
                meta = materialize_newest(store, codec, cks[0], scratch / "v.db")
            except IntegrityError:
                continue
            try:
                out.append(_version_of("now", cks[0].time_ns, cks[0], meta, parts,
                                       cfg.chunk_size, codec))
            finally:
                meta.close()
            break
    return out


# -- the past, read through a read-only vault ------------------------------------------------
@contextlib.contextmanager
def past(paths: VaultPaths, master: bytes, spec: str
         ) -> Iterator[tuple[Vault, Snapshot, Checkpoint]]:
    """The vault as snapshot ``spec`` pinned it, opened read-only (see
    :func:`cryptfs.vault.snapshots.open_past`); closed and its local state removed after."""
    vault, snap, ck = open_past(paths, master, spec, cache_bytes=0)
    try:
        yield vault, snap, ck
    finally:
        vault.close(checkpoint=False)
        shutil.rmtree(vault.paths.data_dir, ignore_errors=True)
        shutil.rmtree(vault.paths.cache_dir, ignore_errors=True)


def _find(vault: Vault, parts: list[bytes], what: str) -> Inode:
    assert vault.fs is not None
    ino = ROOT_INO
    node = vault.fs.getattr(ino)
    for p in parts:
        try:
            node = vault.fs.lookup(ino, p)
        except OSError:
            raise UsageError(f"{_canonical(parts)} does not exist {what}",
                             hint="'cryptfs history PATH' shows when it did") from None
        ino = node.ino
    if not stat.S_ISREG(node.mode):
        raise UsageError(f"{_canonical(parts)} is not a regular file {what}")
    return node


def read_pieces(vault: Vault, node: Inode) -> Iterator[bytes]:
    """The content of a file of ``vault``, in pieces; IntegrityError (one line naming the file)
    if a chunk is missing or fails its check."""
    assert vault.fs is not None
    fs = vault.fs
    fh = fs.open(node.ino, os.O_RDONLY)
    try:
        off = 0
        while off < node.size:
            try:
                piece = fs.read(fh, off, min(PIECE, node.size - off))
            except OSError as e:
                raise IntegrityError(f"reading {fs.paths_of(node.ino)[:1] or [node.ino]} "
                                     f"failed at offset {off}: {e.strerror}") from None
            if not piece:
                raise IntegrityError(f"file {node.ino} ends early at offset {off}")
            off += len(piece)
            yield piece
    finally:
        fs.release(fh)


# -- restore ---------------------------------------------------------------------------------
def mountpoint_of(paths: VaultPaths) -> str | None:
    """Where this vault is mounted read-write (its live mount), if it is: asked of its mount
    daemon (the mount table's ``cryptfs:NAME`` does not tell vaults of other users' or
    other XDG homes' apart)."""
    from cryptfs.admin.control import ask

    mp = ask(paths.data_dir, {"op": "mountpoint"})
    return mp if isinstance(mp, str) else None


def restore(paths: VaultPaths, master: bytes, path: str, spec: str,
            to: str | None) -> tuple[str, int, Snapshot]:
    """Copy file ``path`` as snapshot ``spec`` held it into the live vault, at ``path`` (the
    file is replaced) or at ``to`` (which must not exist). Through the live mount if the vault
    is mounted, else into the vault opened here. Durable when it returns (fsync'd, or the
    vault closed with a checkpoint). Returns (where, bytes, snapshot)."""
    parts = vault_path(path)
    dest = vault_path(to) if to else parts
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if to else 0)
    with past(paths, master, spec) as (old, snap, _ck):
        node = _find(old, parts, f"in snapshot '{snap.name}'")
        mp = mountpoint_of(paths)
        n = 0
        if mp is not None:
            fd = _open_below(mp, dest, flags, stat.S_IMODE(node.mode))
            try:
                for piece in read_pieces(old, node):
                    n += os.write(fd, piece)
                os.fchmod(fd, stat.S_IMODE(node.mode))
                os.fsync(fd)
            finally:
                os.close(fd)
            return _canonical(dest), n, snap
        live = Vault.open(paths, master=master)
        try:
            n = _write_into(live, dest, flags, node, read_pieces(old, node))
        finally:
            live.close()
        return _canonical(dest), n, snap


def _open_below(root: str, parts: list[bytes], flags: int, mode: int) -> int:
    """Open ``root/parts...`` for writing without following a symlink anywhere below ``root``
    (a symlink in the vault must not send restored bytes outside it)."""
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | nofollow)
    except OSError as e:
        raise UsageError(f"cannot open the mount {root}: {e.strerror}") from None
    try:
        for p in parts[:-1]:
            nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | nofollow, mode, dir_fd=fd)
    except OSError as e:
        raise UsageError(f"cannot write {_canonical(parts)}: {e.strerror}") from None
    finally:
        os.close(fd)


def _write_into(live: Vault, dest: list[bytes], flags: int, node: Inode,
                pieces: Iterator[bytes]) -> int:
    assert live.fs is not None
    fs = live.fs
    ino = ROOT_INO
    try:
        for p in dest[:-1]:
            ino = fs.lookup(ino, p).ino
        new, fh = fs.create(ino, dest[-1], stat.S_IMODE(node.mode), flags, node.uid, node.gid)
    except OSError as e:
        raise UsageError(f"cannot write {_canonical(dest)}: {e.strerror}") from None
    n = 0
    try:
        for piece in pieces:
            n += fs.write(fh, n, piece)
    finally:
        fs.release(fh)
    fs.chmod(new.ino, stat.S_IMODE(node.mode))
    return n


# -- proofs ----------------------------------------------------------------------------------
def _signing_key(master: bytes, vault_id: bytes) -> Any:
    seed = crypto.subkey(master, vault_id, PROOF_PURPOSE)
    return ECC.construct(curve="ed25519", seed=seed)


def public_key(master: bytes, vault_id: bytes) -> str:
    """The vault's public proof key, hex of the 32-byte Ed25519 key."""
    return bytes(_signing_key(master, vault_id).public_key().export_key(format="raw")).hex()


def _signed_bytes(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "signature"}
    return PROOF_TAG + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True).encode()


def prove(paths: VaultPaths, master: bytes, path: str, spec: str) -> dict[str, Any]:
    """A signed statement of what file ``path`` held in snapshot ``spec`` (docs/FORMAT.md 6.6),
    its content read back and checked chunk by chunk."""
    parts = vault_path(path)
    _stores, cfg = load_local_config(paths)
    with past(paths, master, spec) as (old, snap, ck):
        node = _find(old, parts, f"in snapshot '{snap.name}'")
        h = hashlib.sha256()
        n = 0
        for piece in read_pieces(old, node):
            h.update(piece)
            n += len(piece)
    key = _signing_key(master, cfg.vault_id)
    doc: dict[str, Any] = {
        "format": "cryptfs-proof",
        "version": 1,
        "vault": cfg.vault_id.hex(),
        "path": _canonical(parts),
        "size": n,
        "sha256": h.hexdigest(),
        "mode": stat.S_IMODE(node.mode),
        "mtime_ns": node.mtime_ns,
        "snapshot": snap.name,
        "checkpoint": ck.name,
        "time_ns": ck.time_ns,
        "seq": ck.seq,
        "head": ck.hash.hex(),
        "public_key": public_key(master, cfg.vault_id),
    }
    doc["signature"] = eddsa.new(key, "rfc8032").sign(_signed_bytes(doc)).hex()
    return doc


def parse_proof(text: bytes) -> dict[str, Any]:
    if len(text) > MAX_PROOF:
        raise IntegrityError("the proof is too long to be a cryptfs proof")
    try:
        doc = json.loads(text)
    except ValueError:
        raise IntegrityError("the proof is not JSON") from None
    fields = {"format": str, "version": int, "vault": str, "path": str, "size": int,
              "sha256": str, "mode": int, "mtime_ns": int, "snapshot": str, "checkpoint": str,
              "time_ns": int, "seq": int, "head": str, "public_key": str, "signature": str}
    if not isinstance(doc, dict) or set(doc) != set(fields) or any(
            type(doc[k]) is not t for k, t in fields.items()):
        raise IntegrityError("the proof is malformed (fields missing, extra or of a wrong type)")
    if doc["format"] != "cryptfs-proof" or doc["version"] != 1:
        raise IntegrityError("not a cryptfs proof of a version this cryptfs knows")
    return doc


def check_signature(doc: dict[str, Any], key_hex: str) -> None:
    """IntegrityError unless ``doc`` is signed by the proof key ``key_hex``."""
    try:
        key = eddsa.import_public_key(bytes.fromhex(key_hex))
        eddsa.new(key, "rfc8032").verify(_signed_bytes(doc), bytes.fromhex(doc["signature"]))
    except ValueError:
        raise IntegrityError("the proof's signature does not verify: it was forged or "
                             "edited") from None


def verify_proof(paths: VaultPaths | None, master: bytes | None, doc: dict[str, Any],
                 key_hex: str | None = None) -> str:
    """Check a proof. With the vault (``paths`` and ``master``): signed by this vault's proof
    key, and the vault's ledger (read from the store's newest checkpoint, chain verified) still
    holds ``head`` at ``seq``. Without it: signed by ``key_hex``. Returns one line saying what
    was checked; IntegrityError (one line) if anything fails."""
    if paths is None or master is None:
        assert key_hex is not None
        if not hmac.compare_digest(key_hex.lower(), doc["public_key"].lower()):
            raise IntegrityError("the proof names another public key than the one given")
        check_signature(doc, key_hex)
        return "proof: signature valid for the given public key (the ledger was not checked)"
    stores, cfg = load_local_config(paths)
    mine = public_key(master, cfg.vault_id)
    if not hmac.compare_digest(doc["vault"], cfg.vault_id.hex()) \
            or not hmac.compare_digest(doc["public_key"], mine):
        raise IntegrityError("the proof is not about this vault")
    check_signature(doc, mine)
    store = stores.open()
    codec = Codec(master, cfg.vault_id)
    try:
        with _scratch(paths) as scratch:
            for _attempt in range(3):
                cks, _bad = read_checkpoints(store, codec)
                if not cks:
                    raise IntegrityError("the store has no valid checkpoint")
                try:
                    meta = materialize_newest(store, codec, cks[0], scratch / "now.db")
                    break
                except (IntegrityError, ObjectNotFound):
                    if _attempt == 2:
                        raise
            try:
                led = Ledger(meta, codec.ledger_key)
                n, problems = led.verify_chain()
                if problems:
                    raise IntegrityError(f"the vault's ledger is broken: {problems[0]}")
                e = led.entry(doc["seq"])
                if e is None or not hmac.compare_digest(e.hash.hex(), doc["head"]):
                    raise IntegrityError(
                        f"the vault's ledger does not hold head {doc['head'][:12]} at sequence "
                        f"{doc['seq']}: its history was rewritten, or the proof is of "
                        "another history")
            finally:
                meta.close()
    finally:
        store.close()
    return (f"proof: valid - {doc['path']} had {doc['size']} bytes, SHA-256 {doc['sha256']}, "
            f"at ledger sequence {doc['seq']}; the vault's ledger ({n} entries, up to "
            f"{cks[0].name}) still holds that head")
