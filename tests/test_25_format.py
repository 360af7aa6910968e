"""docs/FORMAT.md is precise enough to write a compatible reader.

1. The ledger test vector printed in FORMAT.md is recomputed with :mod:`cryptfs.meta.ledger`
   (the hex literals are copied from the document, so a change of the encoding breaks this test).
2. ``FormatReader`` below is an independent reader written from FORMAT.md only: it uses
   hashlib/hmac/json/zlib/sqlite3, pycryptodome and blake3, and imports nothing from ``cryptfs``. A
   vault is created, filled through a real FUSE mount with the ``cryptfs`` CLI, unmounted, and
   the reader must reproduce the tree exactly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import blake3
import pytest
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF, scrypt

# -- 1. the ledger test vector (FORMAT.md section 6.4) ---------------------------------------------

VEC_NAME = "data/ab/" + "ab" * 32
VEC_SHA256 = "4d4f7ca8dab289f61d1b3343c8f181711c36a2fe244a4e574df2c86efa42fe8e"
VEC_T1 = 1700000000123456789
VEC_T2 = 1700000000123457789
VEC_ENC1 = (
    "637279707466732d6c65646765722d763100"
    "0000000000000001"
    "17979cfe3d85cd15"
    "0003707574"
    "0048646174612f61622f6162616261626162616261626162616261626162616261626162616261626162"
    "6162616261626162616261626162616261626162616261626162616261626162"
    "000000000000012c"
    "4d4f7ca8dab289f61d1b3343c8f181711c36a2fe244a4e574df2c86efa42fe8e"
    "0000000000000000000000000000000000000000000000000000000000000000"
)
VEC_HASH1 = "601be2b54bfcc1e5d2e2cec404df83109224134812f1d2a5e068e403185dc4d8"
VEC_ENC2 = (
    "637279707466732d6c65646765722d763100"
    "0000000000000002"
    "17979cfe3d85d0fd"
    "000364656c"
    "0048646174612f61622f6162616261626162616261626162616261626162616261626162616261626162"
    "6162616261626162616261626162616261626162616261626162616261626162"
    "000000000000012c"
    "4d4f7ca8dab289f61d1b3343c8f181711c36a2fe244a4e574df2c86efa42fe8e"
    "601be2b54bfcc1e5d2e2cec404df83109224134812f1d2a5e068e403185dc4d8"
)
VEC_HASH2 = "f64cd9599d3fe432b60dd85286d0110e9f6dc79ad0b47e11e0c23c01b507d18d"
VEC_MAC_KEY = bytes(range(32))
VEC_HEAD_MAC = "44bcf75be60720c5512af8cccd4271f132b1783e3cb7dcfaa7a43ef6a11c3705"


def test_ledger_test_vector() -> None:
    from cryptfs.meta import (
        ledger,  # the implementation under test; the reader below stays independent
    )

    sha = bytes.fromhex(VEC_SHA256)
    assert hashlib.sha256(b"cryptfs test vector").digest() == sha
    genesis = b"\0" * 32
    enc1 = ledger.encode_entry(1, VEC_T1, "put", VEC_NAME, 300, sha, genesis)
    assert len(enc1) == 185
    assert enc1.hex() == VEC_ENC1
    h1 = ledger.entry_hash(1, VEC_T1, "put", VEC_NAME, 300, sha, genesis)
    assert h1.hex() == VEC_HASH1
    enc2 = ledger.encode_entry(2, VEC_T2, "del", VEC_NAME, 300, sha, h1)
    assert enc2.hex() == VEC_ENC2
    h2 = ledger.entry_hash(2, VEC_T2, "del", VEC_NAME, 300, sha, h1)
    assert h2.hex() == VEC_HASH2
    assert ledger.head_mac(VEC_MAC_KEY, 2, h2).hex() == VEC_HEAD_MAC
    assert ledger.check_head_mac(VEC_MAC_KEY, 2, h2, bytes.fromhex(VEC_HEAD_MAC))
    # the independent encoding below agrees with the same vector
    assert _encode_entry(1, VEC_T1, "put", VEC_NAME, 300, sha, genesis).hex() == VEC_ENC1
    assert _encode_entry(2, VEC_T2, "del", VEC_NAME, 300, sha, h1).hex() == VEC_ENC2
    assert _head_mac(VEC_MAC_KEY, 2, h2).hex() == VEC_HEAD_MAC


# -- 2. an independent reader, from docs/FORMAT.md only ---------------------------------------


class FormatError(Exception):
    """The store does not match the format, or fails a check."""


SEGMENT = 16384  # FORMAT.md 4: plaintext bytes per segment of a version 2 chunk object


def _padme(length: int) -> int:
    if length < 256:
        return 256
    e = length.bit_length() - 1
    mask = (1 << (e - e.bit_length())) - 1
    return (length + mask) & ~mask


def _hkdf(master: bytes, vault_id: bytes, info: bytes) -> bytes:
    return HKDF(master, 32, vault_id, SHA256, context=info)  # type: ignore[return-value]


def _gcm_open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 28:
        raise FormatError("sealed data too short")
    cipher = AES.new(key, AES.MODE_GCM, nonce=blob[:12])
    cipher.update(aad)
    try:
        return cipher.decrypt_and_verify(blob[12:-16], blob[-16:])
    except ValueError:
        raise FormatError("GCM authentication failed") from None


def _encode_entry(
    seq: int, time_ns: int, op: str, name: str, size: int, sha: bytes, prev: bytes
) -> bytes:
    o, n = op.encode(), name.encode()
    return (
        b"cryptfs-ledger-v1\0"
        + struct.pack(">QQ", seq, time_ns)
        + struct.pack(">H", len(o))
        + o
        + struct.pack(">H", len(n))
        + n
        + struct.pack(">Q", size)
        + sha
        + prev
    )


def _head_mac(key: bytes, seq: int, head: bytes) -> bytes:
    return hmac.new(key, b"cryptfs-head-v1\0" + struct.pack(">Q", seq) + head, "sha256").digest()


class FormatReader:
    """Reads a vault from a ``file://`` store directory and its passphrase."""

    def __init__(self, store: Path, passphrase: bytes) -> None:
        self.store = store
        cfg = json.loads(self._get("config"))
        if cfg.get("format") != "cryptfs" or cfg.get("version") not in (1, 2, 3):
            raise FormatError("not a version 1, 2 or 3 cryptfs config")
        self.vault_id = bytes.fromhex(cfg["vault_id"])
        if len(self.vault_id) != 16:
            raise FormatError("bad vault id")
        self.chunk_size = int(cfg["chunk_size"])
        master = self._unwrap(cfg, passphrase)
        fields = ["chunk_size", "created", "format", "slots", "vault_id", "version"]
        if cfg["version"] >= 2:
            fields.append("generation")
        if cfg["version"] >= 3:
            fields.append("name_hash")
        self.name_hash = cfg.get("name_hash", "blake2b")  # 3.1: only "blake3" in version 3
        signed = {k: cfg.get(k, "") for k in fields}
        canonical = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        ckey = _hkdf(master, self.vault_id, b"cryptfs config mac v1")
        tag = hmac.new(ckey, canonical.encode(), "sha256").digest()
        if not hmac.compare_digest(tag.hex(), str(cfg["mac"])):
            raise FormatError("config MAC")
        self.chunk_key = _hkdf(master, self.vault_id, b"cryptfs chunk encryption v1")
        self.nonce_key = _hkdf(master, self.vault_id, b"cryptfs chunk nonce v1")
        self.name_key = _hkdf(master, self.vault_id, b"cryptfs chunk naming v1")
        self.meta_key = _hkdf(master, self.vault_id, b"cryptfs metadata encryption v1")
        self.ledger_key = _hkdf(master, self.vault_id, b"cryptfs ledger mac v1")
        self.chunks_read = 0
        self.chunk_sizes: dict[str, tuple[int, int]] = {}  # name: (plaintext, stored) bytes
        self.schema_version = 0  # of the last snapshot read
        self.segments = 0  # segments applied to it (stored ones and the delta)
        self.deltas = 0  # checkpoints read with a delta (FORMAT.md 6.1, version 3)
        self.journal_rows = 0  # journal rows applied (FORMAT.md 5.3, schema version 5)
        self.log_records = 0  # fsync log records applied (FORMAT.md 6.7, checkpoint version 4)
        self.log_entries = 0  # ledger entries and chunk map entries in them (version 5)
        self.log_blocks = 0
        self.ledger_hashes: dict[int, bytes] = {}
        self.pack_members: set[str] = set()  # chunks read from packs

    # store access ----------------------------------------------------------------------------
    def _get(self, name: str) -> bytes:
        return (self.store / name).read_bytes()

    def _list(self, prefix_dir: str) -> list[str]:
        d = self.store / prefix_dir
        if not d.is_dir():
            return []
        return sorted(
            f"{prefix_dir}/{p.name}" for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".tmp.")
        )

    # keys ------------------------------------------------------------------------------------
    def _unwrap(self, cfg: dict, passphrase: bytes) -> bytes:
        for slot in cfg["slots"]:
            if slot.get("type") != "passphrase":
                continue
            kdf = slot["kdf"]
            if kdf.get("name") != "scrypt":
                continue
            salt = base64.b64decode(kdf["salt"], validate=True)
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            if n < 16384 or r < 8 or p < 1 or len(salt) < 16:
                raise FormatError("scrypt parameters below the minimum")
            kek = scrypt(passphrase, salt, 32, N=n, r=r, p=p)  # type: ignore[arg-type]
            aad = b"cryptfs/keyslot/v1\0" + self.vault_id + slot["id"].encode("ascii")
            try:
                master = _gcm_open(kek, base64.b64decode(slot["wrapped"], validate=True), aad)
            except FormatError:
                continue
            if len(master) == 32:
                return master
        raise FormatError("wrong passphrase")

    def _aad(self, kind: bytes, name: str) -> bytes:
        return b"cryptfs/" + kind + b"/v1\0" + self.vault_id + name.encode()

    # sealed blobs ----------------------------------------------------------------------------
    def _open_blob(self, kind: bytes, name: str, blob: bytes) -> bytes:
        if blob[:1] != b"\x01":
            raise FormatError(f"{name}: object version")
        body = _gcm_open(self.meta_key, blob[1:], self._aad(kind, name))
        if body[:1] == b"\x00":
            return body[1:]
        if body[:1] == b"\x01":
            return zlib.decompress(body[1:])
        raise FormatError(f"{name}: unknown flag")

    def newest_checkpoint(self) -> dict:
        names = self._list("checkpoints")
        if not names:
            raise FormatError("no checkpoint")
        name = names[-1]
        ck = json.loads(self._open_blob(b"checkpoint", name, self._get(name)))
        seq, head = int(ck["seq"]), bytes.fromhex(ck["hash"])
        if name != f"checkpoints/{seq:016d}":
            raise FormatError(f"{name}: name does not match seq {seq}")
        if not hmac.compare_digest(_head_mac(self.ledger_key, seq, head),
                                   bytes.fromhex(ck["mac"])):
            raise FormatError(f"{name}: head MAC")
        ck["_name"] = name
        return ck

    def _meta_object(self, m: dict, what: str) -> bytes:
        blob = self._get(m["name"])
        if len(blob) != int(m["size"]):
            raise FormatError(f"{what} size")
        if not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), m["sha256"]):
            raise FormatError(f"{what} hash")
        return self._open_blob(b"meta", m["name"], blob)

    def snapshot(self, ck: dict, workdir: Path) -> sqlite3.Connection:
        if ck.get("version", 1) not in (1, 2, 3, 4, 5, 6):
            raise FormatError("checkpoint version")
        image = self._meta_object(ck["meta"], "snapshot")
        if not image.startswith(b"SQLite format 3\0"):
            raise FormatError("snapshot is not a SQLite image")
        page_size = struct.unpack(">H", image[16:18])[0]
        page_size = 65536 if page_size == 1 else page_size
        db = bytearray(image)
        self.segments = 0
        segments = [self._meta_object(m, "segment") for m in ck.get("segments", [])]
        if ck.get("delta") is not None:  # FORMAT.md 6.1: version 3, applied last
            segments.append(base64.b64decode(ck["delta"], validate=True))
            self.deltas += 1
        for seg in segments:  # FORMAT.md 5.4, applied in order
            magic = b"cryptfs-wal-segment-v1\n"
            if not seg.startswith(magic):
                raise FormatError("not a segment")
            size, db_pages, count = struct.unpack(">III", seg[23:35])
            if size != page_size or len(seg) != 35 + count * (4 + size):
                raise FormatError("segment length")
            for i in range(count):
                at = 35 + i * (4 + size)
                pgno = struct.unpack(">I", seg[at:at + 4])[0]
                if not 1 <= pgno <= db_pages:
                    raise FormatError("segment page number")
                off = (pgno - 1) * size
                if len(db) < off + size:
                    db.extend(bytes(off + size - len(db)))
                db[off:off + size] = seg[at + 4:at + 4 + size]
            del db[db_pages * size:]
            self.segments += 1
        # the schema stamp: the header's user version (0 means version 1, unstamped)
        stamp = struct.unpack(">i", db[60:64])[0]
        self.schema_version = stamp or 1
        if self.schema_version not in (1, 2, 3, 4, 5):
            raise FormatError(f"snapshot schema version {stamp} is not 1 to 5")
        path = workdir / "snapshot.db"
        path.write_bytes(bytes(db))
        return sqlite3.connect(path)

    def check_ledger(self, db: sqlite3.Connection, ck: dict) -> int:
        rows = db.execute(
            "SELECT seq, time_ns, op, name, size, sha256, prev, hash FROM ledger ORDER BY seq"
        ).fetchall()
        entries = [(s, t, o, n, z, bytes(h), bytes(p), bytes(x)) for s, t, o, n, z, h, p, x in rows]
        last = entries[-1][0] if entries else 0
        for e in ck["tail"]:
            if int(e["seq"]) > last:
                entries.append((int(e["seq"]), int(e["time_ns"]), e["op"], e["name"],
                                int(e["size"]), bytes.fromhex(e["sha256"]),
                                bytes.fromhex(e["prev"]), bytes.fromhex(e["hash"])))
        prev, expect = b"\0" * 32, 1
        for seq, t, op, name, size, sha, p, h in entries:
            known = op in ("put", "del", "accept", "config") or op.partition("@")[0] in (
                "copy", "lost", "store-add", "store-remove")
            if seq != expect or p != prev or not known:
                raise FormatError(f"ledger chain broken at {seq}")
            if hashlib.sha256(_encode_entry(seq, t, op, name, size, sha, p)).digest() != h:
                raise FormatError(f"ledger entry {seq} modified")
            prev, expect = h, seq + 1
        if not entries or entries[-1][0] != int(ck["seq"]) or prev.hex() != ck["hash"]:
            raise FormatError("ledger does not lead to the checkpoint head")
        self.ledger_hashes = {e[0]: e[7] for e in entries}  # (a log's records continue it)
        return len(entries)

    # content ---------------------------------------------------------------------------------
    def _chunk(self, name: str, size: int, sha: bytes, pack: str | None = None,
               off: int = 0) -> bytes:
        """A chunk object, of its own or (FORMAT.md 4.3) bytes ``[off, off + size)`` of a
        pack."""
        blob = self._get(name) if pack is None else self._get(pack)[off : off + size]
        if pack is not None:
            self.pack_members.add(name)
        if len(blob) != size:
            raise FormatError(f"{name}: size")
        if not hmac.compare_digest(hashlib.sha256(blob).digest(), sha):
            raise FormatError(f"{name}: does not match its recorded hash")
        if blob[:1] == b"\x01":
            padded = _gcm_open(self.chunk_key, blob[1:], self._aad(b"chunk", name))
        elif blob[:1] == b"\x02":
            padded = self._segments(name, blob)
        else:
            raise FormatError(f"{name}: object version")
        # version 1: u32 length || P || zeros; version 2: P || zeros || u32 length
        at = 0 if blob[:1] == b"\x01" else len(padded) - 4
        (n,) = struct.unpack(">I", padded[at : at + 4])
        if n > len(padded) - 4:
            raise FormatError(f"{name}: length field")
        plain = padded[4 : 4 + n] if at == 0 else padded[:n]
        h = (blake3.blake3(plain, key=self.name_key).hexdigest() if self.name_hash == "blake3"
             else hashlib.blake2b(plain, digest_size=32, key=self.name_key).hexdigest())
        if name != f"data/{h[:2]}/{h}":
            raise FormatError(f"{name}: name does not match content")
        self.chunks_read += 1
        self.chunk_sizes[name] = (len(plain), len(blob))
        return plain

    def _segments(self, name: str, blob: bytes) -> bytes:
        """FORMAT.md 4, version 2: T and the segment count from the size, each segment opened
        with its derived nonce and its index and last flag in the associated data."""
        k = -(-(len(blob) - 1) // (SEGMENT + 16))
        t = len(blob) - 1 - 16 * k
        if not (k - 1) * SEGMENT < t <= k * SEGMENT:
            raise FormatError(f"{name}: impossible size")
        out = b""
        for i in range(k):
            seg = blob[1 + i * (SEGMENT + 16) : 1 + (i + 1) * (SEGMENT + 16)]
            msg = b"chunk-seg-nonce" + name.encode() + struct.pack(">II", t, i)
            nonce = hmac.new(self.nonce_key, msg, hashlib.sha256).digest()[:12]
            aad = self._aad(b"chunk", name) + struct.pack(">IB", i, i == k - 1)
            out += _gcm_open(self.chunk_key, nonce + seg, aad)
        return out

    def file_bytes(self, db: sqlite3.Connection, ino: int, size: int) -> bytes:
        cs = self.chunk_size
        out = bytearray()
        for idx in range((size + cs - 1) // cs):
            want = min(cs, size - idx * cs)
            packs = self.schema_version >= 4  # (FORMAT.md 5.3: the columns of version 4)
            row = db.execute(
                "SELECT o.name, o.size, o.sha256" + (", o.pack, o.off" if packs else "")
                + " FROM blocks b JOIN objects o ON o.name = b.obj WHERE b.ino = ? AND b.idx = ?",
                (ino, idx)
            ).fetchone()
            plain = b""  # a hole
            if row is not None:
                pack, off = (row[3], row[4] or 0) if packs else (None, 0)
                plain = self._chunk(row[0], int(row[1]), bytes(row[2]), pack, off)
            if self.schema_version >= 5:  # FORMAT.md 5.3: the journal's rows, in seq order
                buf = bytearray(plain)
                for seq, at, sealed in db.execute(
                    "SELECT seq, off, data FROM journal WHERE ino = ? AND idx = ? ORDER BY seq",
                    (ino, idx)
                ).fetchall():
                    name = f"journal/{ino}/{idx}/{seq}/{at}"
                    data = self._open_blob(b"journal", name, bytes(sealed))
                    buf.extend(bytes(max(0, at - len(buf))))
                    buf[at:at + len(data)] = data
                    self.journal_rows += 1
                plain = bytes(buf)
            piece = plain[:want]
            out += piece + bytes(want - len(piece))
        return bytes(out)

    def apply_log(self, db: sqlite3.Connection, ck: dict) -> None:
        """FORMAT.md 6.7: the records of the checkpoint's fsync log, in order, each sealed
        for its place; a last record cut short (or, from version 6, torn) is left out; from
        version 6 frames are 4-byte aligned and a zero length ends the log."""
        name = f"logs/{int(ck['seq']):016d}"
        if ck.get("version", 1) < 4 or not (self.store / name).exists():
            return
        blob, at, n = self._get(name), 0, 0
        head, prev = int(ck["seq"]), bytes.fromhex(ck["hash"])
        ahead = ck.get("version", 1) >= 6
        while at + 4 <= len(blob):
            length = struct.unpack(">I", blob[at:at + 4])[0]
            end = at + 4 + length
            if end > len(blob) or (ahead and length == 0):
                break
            try:
                plain = self._open_blob(b"log", f"{name}/{ck['hash']}/{n}", blob[at + 4:end])
            except FormatError:
                torn = ahead and not blob[end:].strip(b"\0") and any(
                    not blob[max(at, s):min(end, s + 512)].strip(b"\0")
                    for s in range(at - at % 512, end, 512))
                if torn:
                    break
                raise
            ino, size, mtime, ctime, rows = struct.unpack(">QQqqI", plain[:36])
            p = 36
            parsed = []
            for _ in range(rows):
                idx, seq, off, ln = struct.unpack(">QQII", plain[p:p + 24])
                parsed.append((ino, idx, seq, off, plain[p + 24:p + 24 + ln]))
                p += 24 + ln
            if ck.get("version", 1) >= 5:  # the seal: entries, then chunk map entries
                seal = json.loads(plain[p:])
                for e in seal["entries"]:
                    fields = (int(e["seq"]), int(e["time_ns"]), e["op"], e["name"],
                              int(e["size"]), bytes.fromhex(e["sha256"]), prev)
                    if fields[0] <= head:  # held already: must be that entry
                        if self.ledger_hashes.get(fields[0]) != bytes.fromhex(e["hash"]):
                            raise FormatError(f"{name} record {n}: entry {fields[0]} differs")
                        continue
                    if fields[0] != head + 1 or bytes.fromhex(e["prev"]) != prev or \
                            hashlib.sha256(_encode_entry(*fields)).hexdigest() != e["hash"]:
                        raise FormatError(f"{name} record {n}: entry {fields[0]} breaks the ledger")
                    head, prev = fields[0], bytes.fromhex(e["hash"])
                    self.ledger_hashes[head] = prev
                    self.log_entries += 1
                for idx, ref in seal["blocks"]:
                    db.execute("DELETE FROM journal WHERE ino = ? AND idx = ?", (ino, idx))
                    db.execute("DELETE FROM blocks WHERE ino = ? AND idx = ?", (ino, idx))
                    if ref is not None:
                        db.execute("INSERT OR IGNORE INTO objects (name, size, sha256, refcount, "
                                   "state) VALUES (?, ?, ?, 1, 'stored')",
                                   (ref["name"], int(ref["size"]), bytes.fromhex(ref["sha256"])))
                        db.execute("INSERT INTO blocks (ino, idx, obj) VALUES (?, ?, ?)",
                                   (ino, idx, ref["name"]))
                    self.log_blocks += 1
            elif p != len(plain):
                raise FormatError(f"{name} record {n} length")
            db.executemany("INSERT OR REPLACE INTO journal (ino, idx, seq, off, data) "
                           "VALUES (?, ?, ?, ?, ?)", parsed)
            db.execute("UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE ino = ?",
                       (size, mtime, ctime, ino))
            at, n = end + (-end % 4 if ahead else 0), n + 1
        self.log_records += n

    def tree(self, workdir: Path) -> dict[str, tuple]:
        """``{path: (kind, payload, permission bits, xattrs)}`` of the newest checkpoint and
        its fsync log."""
        ck = self.newest_checkpoint()
        db = self.snapshot(ck, workdir)
        try:
            self.check_ledger(db, ck)
            self.apply_log(db, ck)
            out: dict[str, tuple] = {}

            def walk(dir_ino: int, prefix: str) -> None:
                for name, ino in db.execute(
                    "SELECT name, ino FROM dentries WHERE parent = ? ORDER BY name", (dir_ino,)
                ).fetchall():
                    name = bytes(name)
                    if name.startswith(b".fuse_hidden"):
                        continue
                    mode, size, target, nlink = db.execute(
                        "SELECT mode, size, target, nlink FROM inodes WHERE ino = ?", (ino,)
                    ).fetchone()
                    assert nlink > 0
                    xattrs = dict(db.execute(
                        "SELECT name, value FROM xattrs WHERE ino = ?", (ino,)).fetchall())
                    xattrs = {bytes(k): bytes(v) for k, v in xattrs.items()}
                    path = prefix + name.decode("utf-8", "surrogateescape")
                    perm = stat.S_IMODE(mode)
                    if stat.S_ISDIR(mode):
                        out[path] = ("dir", None, perm, xattrs)
                        walk(ino, path + "/")
                    elif stat.S_ISLNK(mode):
                        out[path] = ("symlink", bytes(target), perm, xattrs)
                    elif stat.S_ISREG(mode):
                        out[path] = ("file", self.file_bytes(db, ino, size), perm, xattrs)
                    else:
                        out[path] = ("special", None, perm, xattrs)

            walk(1, "")
            return out
        finally:
            db.close()


# -- the end-to-end test ---------------------------------------------------------------------------

CRYPTFS = str(Path(sys.executable).parent / "cryptfs")
PASSPHRASE = "format reader passphrase"
CHUNK = 65536
T = TypeVar("T")


def _is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == real for line in f)


def _mount_tree(root: Path) -> dict[str, tuple]:
    """The same shape as ``FormatReader.tree``, read through the mount."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            xattrs = {
                k.encode(): os.getxattr(p, k, follow_symlinks=False)
                for k in os.listxattr(p, follow_symlinks=False)
            }
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.fsencode(os.readlink(p)), perm, xattrs)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, perm, xattrs)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", p.read_bytes(), perm, xattrs)
            else:
                out[rel] = ("special", None, perm, xattrs)
    return out


@pytest.fixture
def vault_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="cryptfs-format-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _with_mount(root: Path, fill: Callable[[Path], T]) -> T:
    """Create a vault in ``root/store`` with the CLI, mount it, run ``fill(mountpoint)``,
    unmount (always; lazily as a last resort) and return what ``fill`` returned."""
    store, mnt = root / "store", root / "mnt"
    env = dict(os.environ)
    env.update({
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "HOME": str(root),
        "CRYPTFS_PASSPHRASE": PASSPHRASE,
        "CRYPTFS_SCRYPT_N": "16384",
    })

    def cli(*args: str) -> None:
        res = subprocess.run([CRYPTFS, *args], env=env, capture_output=True, text=True,
                             timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"cryptfs {' '.join(args)}: {res.stderr.strip()}"

    cli("init", f"file://{store}", "--chunk-size", str(CHUNK))
    mnt.mkdir()
    cli("mount", str(mnt))
    try:
        assert _is_mounted(mnt)
        result = fill(mnt)
    finally:
        try:
            if _is_mounted(mnt):
                cli("umount", str(mnt))
        finally:
            if _is_mounted(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert not _is_mounted(mnt)
    return result


def test_independent_reader_reproduces_the_tree(vault_dir: Path) -> None:
    root = vault_dir
    store = root / "store"
    rng = random.Random(25)
    big = rng.randbytes(3 * CHUNK + 1234)
    written = {
        "hello.txt": b"hello, world\n",
        "empty": b"",
        "big.bin": big,
        "copy.bin": big[:CHUNK] + b"end",  # chunk 0 is big.bin's chunk 0: deduplicated
        "sparse.bin": bytes(150000) + b"tail",  # chunks 0 and 1 are holes
        "grown.bin": b"x" * 100 + bytes(70000 - 100),  # short chunk 0, then a hole
        "sub/nested.txt": b"nested\n" * 50,
        "sub/\u00fcn\u00efcode.txt": "gr\u00fc\u00dfe\n".encode(),
    }

    def fill(mnt: Path) -> dict[str, tuple]:
        (mnt / "sub" / "deeper").mkdir(parents=True)
        for rel in ("hello.txt", "empty", "big.bin", "copy.bin", "sub/nested.txt",
                    "sub/\u00fcn\u00efcode.txt"):
            (mnt / rel).write_bytes(written[rel])
            if rel == "big.bin":  # a checkpoint with a snapshot; the later ones add segments
                fd = os.open(mnt / rel, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        with open(mnt / "sparse.bin", "wb") as f:
            f.seek(150000)
            f.write(b"tail")
        with open(mnt / "grown.bin", "wb") as f:
            f.write(b"x" * 100)
        os.truncate(mnt / "grown.bin", 70000)
        os.chmod(mnt / "hello.txt", 0o600)
        os.symlink("hello.txt", mnt / "link")
        os.symlink("../nowhere/at all", mnt / "sub" / "dangling")
        os.link(mnt / "hello.txt", mnt / "sub" / "hardlink")
        os.setxattr(mnt / "sub" / "nested.txt", "user.note", b"an attribute")
        # what the filesystem shows, to compare with what the reader finds in the store
        return _mount_tree(mnt)

    expected = _with_mount(root, fill)

    # the mount showed what was written
    for rel, data in written.items():
        assert expected[rel][:2] == ("file", data), rel
    assert expected["sub/hardlink"][1] == written["hello.txt"]
    assert expected["link"][:2] == ("symlink", b"hello.txt")
    assert expected["sub/dangling"][:2] == ("symlink", b"../nowhere/at all")
    assert expected["sub/deeper"][0] == "dir"
    assert expected["hello.txt"][2] == 0o600
    assert expected["sub/nested.txt"][3] == {b"user.note": b"an attribute"}

    work = root / "reader"
    work.mkdir()
    reader = FormatReader(store, PASSPHRASE.encode())
    got = reader.tree(work)
    assert reader.schema_version == 5  # FORMAT.md 5.2: the snapshot carries the stamp
    assert reader.segments >= 1  # FORMAT.md 5.4: the metadata since the fsync is a segment
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], rel
    # big.bin 4, copy.bin 1 (+1 shared), hello/nested/unicode/sparse/grown 1 each; the hard
    # link shares hello's chunk. The short chunks (each file's last) lie in packs (FORMAT.md
    # 4.3): big.bin's 3 full chunks are objects of their own.
    chunk_files = sorted(p for p in (store / "data").rglob("*") if p.is_file())
    assert len(chunk_files) == 3
    assert len(reader.pack_members) == 4 + 1 + 5 - 3
    # FORMAT.md 4: padded to min(padme(n + 4), chunk_size + 4); big.bin's 3 full chunks unpadded
    assert len(reader.chunk_sizes) == 4 + 1 + 5
    # version 2: 1 + T + 16 per segment of 16 KiB
    for n, stored in reader.chunk_sizes.values():
        t = min(_padme(n + 4), CHUNK + 4)
        assert stored == 1 + t + 16 * -(-t // SEGMENT), (n, stored)
    assert sorted(reader.chunk_sizes.values())[-3:] == [(CHUNK, CHUNK + 5 + 5 * 16)] * 3

    # the reader rejects a changed chunk object by its recorded hash, before GCM
    victim = chunk_files[0]
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 1
    victim.write_bytes(bytes(blob))
    work2 = root / "reader2"
    work2.mkdir()
    with pytest.raises(FormatError, match="recorded hash"):
        FormatReader(store, PASSPHRASE.encode()).tree(work2)
    with pytest.raises(FormatError, match="wrong passphrase"):
        FormatReader(store, b"not the passphrase")


def test_independent_reader_applies_the_journal(vault_dir: Path) -> None:
    """A file changed a little and fsync'd, still open: its changed bytes are journal rows
    (5.3), not chunks, and the fsync is a record of the fsync log (6.7; the store appends);
    the reader, applying them, reads what was written. A chunk then written whole is sealed
    by the next fsync, whose record carries its chunk map entry and the ledger entries since
    the checkpoint (version 5): the reader reads that too. After a chmod and another fsync, the
    new checkpoint carries the metadata changes inline (6.1, the delta), the rows with them,
    and the reader reads the same again, as the mount does."""
    root = vault_dir
    rng = random.Random(84)
    content = bytearray(rng.randbytes(2 * CHUNK + 3000))

    def read(n: int) -> tuple[dict[str, tuple], FormatReader]:
        work = root / f"reader{n}"
        work.mkdir()
        reader = FormatReader(root / "store", PASSPHRASE.encode())
        return reader.tree(work), reader

    def fill(mnt: Path) -> tuple[bytes, list[tuple[dict[str, tuple], FormatReader]]]:
        (mnt / "db").write_bytes(content)
        fd = os.open(mnt / "db", os.O_RDWR)
        try:
            os.fsync(fd)  # the first checkpoint of a mount stores a snapshot; the next a delta
            for off, data in ((100, b"a" * 50), (CHUNK + 7, b"b" * 2000),
                              (2 * CHUNK + 5000, b"c" * 10)):
                os.pwrite(fd, data, off)
                content.extend(bytes(max(0, off - len(content))))
                content[off:off + len(data)] = data
            os.fsync(fd)
            logged = read(1)
            whole = rng.randbytes(CHUNK)  # chunk 1 written whole: the next fsync seals it, and
            os.pwrite(fd, whole, CHUNK)  # its record carries the chunk and its ledger entry
            os.pwrite(fd, b"d" * 20, 30)
            content[CHUNK:2 * CHUNK] = whole
            content[30:50] = b"d" * 20
            os.fsync(fd)
            sealed = read(3)
            os.chmod(mnt / "db", 0o600)  # (an attribute change: not in the log)
            os.fsync(fd)
            return (mnt / "db").read_bytes(), [logged, sealed, read(2)]
        finally:
            os.close(fd)

    shown, [(got1, r1), (got3, r3), (got2, r2)] = _with_mount(root, fill)
    assert shown == bytes(content)
    assert (r1.journal_rows, r1.log_records, r1.deltas) == (3, 1, 0)
    assert got3["db"][:2] == ("file", shown)
    assert (r3.journal_rows, r3.log_records, r3.log_blocks) == (3, 2, 1) and r3.log_entries >= 1
    assert got2["db"][:3] == ("file", shown, 0o600)
    assert (r2.journal_rows, r2.log_records, r2.deltas) == (3, 0, 1)


def test_equal_chunks_in_one_write(vault_dir: Path) -> None:
    rng = random.Random(26)
    one = rng.randbytes(CHUNK)
    data = one + one + b"end"

    def fill(mnt: Path) -> bool:
        (mnt / "dup.bin").write_bytes(data)
        try:
            return (mnt / "dup.bin").read_bytes() == data
        except OSError:
            return False

    assert _with_mount(vault_dir, fill)
    work = vault_dir / "reader"
    work.mkdir()
    got = FormatReader(vault_dir / "store", PASSPHRASE.encode()).tree(work)
    assert got["dup.bin"][1] == data
