"""How plaintext becomes stored objects and back: names, padding, sealing, verification.

Chunk objects (``data/<2 hex>/<64 hex>``): the name is the keyed hash of the plaintext under the
naming sub-key (BLAKE3 in vaults of config version 3, BLAKE2b-256 before), so identical chunks
get one object without revealing a plain hash. The padded plaintext ``plaintext || zeros || u32
length`` is stored as ``0x02`` and a sequence of independently sealed segments of
:data:`SEGMENT_SIZE` bytes (AES-256-GCM, tag after each), whose associated data binds the
format, vault id, object name, segment index and a last-segment flag, so an object moved to
another name, a segment moved to another place and a dropped last segment all fail to open; a
reader decrypts (and fetches) only the segments it needs (:meth:`Codec.chunk_span`). The nonces
are derived from the name, padded length and segment index (convergent: the same chunk is sealed
to the same bytes on every machine), so none is stored. Objects of version ``0x01`` (one seal
over the whole padded chunk, every vault before segments, ``0x01 || AES-256-GCM(u32 length ||
plaintext || zeros)``) open as before. Padding follows Padmé, so object sizes leak only a few
bits of file sizes, capped at ``chunk_size + 4`` bytes: a full chunk is stored unpadded (every
full chunk has the same size anyway), and a partial chunk Padmé would pad past that size gets
that size too, so the sizes fall into exactly the classes uncapped Padmé makes (docs/FORMAT.md
section 4).

Reading a chunk checks its size and authenticates it, but does not hash it: chunk names are
keyed hashes of the plaintext, so any authentic object under a name holds that name's plaintext
(see :meth:`Codec.open_chunk`). The SHA-256 recorded for every object serves the ledger,
replication and ``verify --full``.

Metadata snapshots and checkpoints are sealed the same way under their own sub-keys.
"""

from __future__ import annotations

import hmac
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from cryptfs.errors import IntegrityError
from cryptfs.format import crypto
from cryptfs.format.layout import (
    DATA_PREFIX,
    MAX_PACK_INDEX,
    PACK_MAX_MEMBERS,
    PACK_MEMBER_MAX,
    log_name,
)

OBJ_VERSION = 1  # metadata snapshots and checkpoints; chunk objects written before segments
CHUNK_VERSION = 2  # chunk objects made of segments (docs/FORMAT.md section 4)
SEGMENT_SIZE = 16 << 10  # plaintext bytes per segment (the last one may be shorter)
_SEG_STORED = SEGMENT_SIZE + crypto.TAG_SIZE
_SEG_INDEX = struct.Struct(">IB")  # a segment's index and last-segment flag, in its AAD
NAME_HASHES = ("blake2b", "blake3")  # how chunks are named (the config's ``name_hash``)
COMPRESS_AT = 0.7  # metadata is compressed if a sample of it shrinks to this (_compressed)


def _compressed(plain: bytes) -> bytes | None:
    """``plain`` zlib-compressed (level 1), or None if that keeps over COMPRESS_AT of its size
    (judged by a sample of 16 pieces of 4 KiB spread over it, or by the result if no larger):
    metadata of sealed bytes (journal rows, 5.3) gives ~0.8 at ~50 MB/s, of names ~0.45."""
    if len(plain) > 16 * 4096:
        step = len(plain) // 16
        sample = b"".join(plain[i * step:i * step + 4096] for i in range(16))
        if len(zlib.compress(sample, 1)) > COMPRESS_AT * len(sample):
            return None
        return zlib.compress(plain, 1)
    body = zlib.compress(plain, 1)
    return body if len(body) <= COMPRESS_AT * len(plain) else None


def padme(length: int) -> int:
    """Padmé padded length: at most ~12 % overhead, leaks O(log log L) bits of L."""
    if length < 256:
        return 256
    e = length.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (length + mask) & ~mask


def segmented_layout(size: int) -> tuple[int, int] | None:
    """``(T, segments)`` of a version 2 chunk object of ``size`` stored bytes
    (``size = 1 + T + 16 * ceil(T / SEGMENT_SIZE)``), None if no padded length gives that size."""
    k = -(-(size - 1) // _SEG_STORED)
    t = size - 1 - k * crypto.TAG_SIZE
    if k < 1 or t < 4 or not (k - 1) * SEGMENT_SIZE < t <= k * SEGMENT_SIZE:
        return None
    return t, k


class SegmentSpan(NamedTuple):
    """Where some bytes of a chunk lie in its version 2 object: segments ``first`` to ``last``
    occupy object bytes ``[lo, hi)``; once opened, the wanted bytes are ``take`` bytes from
    ``skip`` bytes into the first segment's plaintext. (A tuple: made at every random read,
    where a frozen dataclass's construction cost more than what it describes.)"""

    first: int
    last: int
    lo: int
    hi: int
    skip: int
    take: int


@dataclass(frozen=True)
class ChunkRef:
    """What the metadata records for a stored object: its name, stored size and SHA-256; for
    a chunk object stored in a pack (docs/FORMAT.md 4.3), the pack's name and the object's
    offset in it (its bytes are ``[offset, offset + size)`` of the pack)."""

    name: str
    size: int
    sha256: bytes
    pack: str | None = None
    offset: int = 0

    def matches(self, blob: bytes) -> bool:
        """Whether ``blob`` is the recorded object (size and SHA-256, compared in constant
        time)."""
        return len(blob) == self.size and hmac.compare_digest(crypto.sha256(blob), self.sha256)


def journal_name(ino: int, idx: int, seq: int, off: int) -> str:
    """The name a journal row's bytes are sealed under (docs/FORMAT.md 5.3)."""
    return f"journal/{ino}/{idx}/{seq}/{off}"


def log_record_name(seq: int, head: bytes, n: int) -> str:
    """The name record ``n`` of the fsync log of checkpoint ``seq``, whose ledger head hash is
    ``head``, is sealed under (docs/FORMAT.md 6.7)."""
    return f"{log_name(seq)}/{head.hex()}/{n}"


class Codec:
    """Seals and opens objects for one vault (one master key)."""

    def __init__(self, master: bytes, vault_id: bytes, chunk_size: int | None = None,
                 name_hash: str = "blake2b") -> None:
        """``chunk_size``: the vault's; chunks are padded to at most ``chunk_size + 4`` bytes
        (None: no cap, for a codec that only reads). ``name_hash``: how the vault names chunks
        (NAME_HASHES; a codec that only reads needs none)."""
        if name_hash not in NAME_HASHES:
            raise ValueError(f"unknown chunk name hash {name_hash!r}")
        self._name_hash = crypto.keyed_hash3 if name_hash == "blake3" else crypto.keyed_hash
        self.vault_id = vault_id
        self.chunk_size = chunk_size
        self._pad_cap = None if chunk_size is None else chunk_size + 4
        self._chunk_key = crypto.subkey(master, vault_id, crypto.PURPOSE_CHUNK)
        self._nonce_key = crypto.subkey(master, vault_id, crypto.PURPOSE_CHUNK_NONCE)
        # (the keyed HMAC state after the label every segment nonce starts with: copied per
        # object, not keyed again)
        self._nonce_state = crypto.mac_state(self._nonce_key, b"chunk-seg-nonce")
        self._name_key = crypto.subkey(master, vault_id, crypto.PURPOSE_NAME)
        self._meta_key = crypto.subkey(master, vault_id, crypto.PURPOSE_META)
        self.ledger_key = crypto.subkey(master, vault_id, crypto.PURPOSE_LEDGER)
        self.config_key = crypto.subkey(master, vault_id, crypto.PURPOSE_CONFIG)

    def _aad(self, kind: bytes, name: str) -> bytes:
        return b"cryptfs/" + kind + b"/v1\0" + self.vault_id + name.encode()

    # -- chunks -----------------------------------------------------------------------------
    def chunk_name(self, plain: bytes | bytearray | memoryview) -> str:
        h = self._name_hash(self._name_key, plain).hex()
        return f"{DATA_PREFIX}{h[:2]}/{h}"

    def segment_nonce(self, name: str, padded_len: int, index: int) -> bytes:
        """The AES-GCM nonce of segment ``index`` of chunk ``name`` padded to ``padded_len``
        bytes: HMAC-SHA256(nonce key, "chunk-seg-nonce" || name || u32(T) || u32(i))[:12].
        A function of the plaintext (the name is its keyed hash) and T, and so of the segment's
        bytes: a nonce meets only one message and associated data."""
        return self._segment_nonces(name, padded_len)(index)

    def _segment_nonces(self, name: str, padded_len: int) -> Callable[[int], bytes]:
        """:meth:`segment_nonce` of one object, by index (the HMAC state of the common prefix
        is computed once: half the cost per segment)."""
        prefix = self._nonce_state.copy()
        prefix.update(name.encode() + struct.pack(">I", padded_len))

        def nonce(index: int) -> bytes:
            h = prefix.copy()
            h.update(struct.pack(">I", index))
            return h.digest()[: crypto.NONCE_SIZE]

        return nonce

    def seal_chunk(self, name: str, plain: bytes | bytearray | memoryview) -> bytes:
        """The version 2 object for chunk ``name`` (= :meth:`chunk_name` of ``plain``): the
        padded plaintext ``plain || zeros || u32(len(plain))`` (the length last, so that chunk
        offset ``p`` lies in segment ``p // SEGMENT_SIZE``: segments align with pages) in
        segments of :data:`SEGMENT_SIZE` bytes, each sealed with its own tag. Convergent (nonces
        from :meth:`segment_nonce`): the same plaintext always gives the same bytes, so two
        machines storing the same content store one object, whose SHA-256 matches either's
        record."""
        n = len(plain)
        size = padme(n + 4)
        if self._pad_cap is not None and n + 4 <= self._pad_cap < size:
            size = self._pad_cap  # a full chunk, or a tail in the same Padmé class: unpadded
        # the segments all of plaintext are sealed from ``plain`` itself; only the rest (the
        # data after them, the zeros and the length) is copied, not the whole chunk
        whole = n // SEGMENT_SIZE
        at = whole * SEGMENT_SIZE
        rest = bytearray(size - at)
        rest[: n - at] = memoryview(plain)[at:]
        struct.pack_into(">I", rest, len(rest) - 4, n)
        src, rest_view = memoryview(plain), memoryview(rest)
        count = -(-size // SEGMENT_SIZE)
        nonce = self._segment_nonces(name, size)
        aad = self._aad(b"chunk", name)
        out = [bytes([CHUNK_VERSION])]
        for i in range(count):
            j = i * SEGMENT_SIZE
            piece = src[j : j + SEGMENT_SIZE] if i < whole else \
                rest_view[j - at : j - at + SEGMENT_SIZE]
            out.append(crypto.gcm_encrypt(self._chunk_key, nonce(i), piece,
                                          aad + _SEG_INDEX.pack(i, i == count - 1)))
        return b"".join(out)

    def open_chunk(self, ref: ChunkRef, blob: bytes) -> bytes:
        """Check the stored size, then authenticate and decrypt. Raises IntegrityError naming
        the object on any mismatch.

        No SHA-256 against ``ref``: the tags authenticate every byte, and the associated data
        binds kind, vault and name, so only an object sealed under this name opens. Names are
        keyed hashes of the plaintext (only :meth:`chunk_name` names what :meth:`seal_chunk`
        seals), so every such object, including an older copy replayed in the store, holds
        the same plaintext: the hash would catch nothing more on this path."""
        if len(blob) != ref.size:
            raise IntegrityError(f"object {ref.name} has {len(blob)} bytes, expected {ref.size}")
        return self.open_chunk_unchecked(ref.name, blob)

    def open_chunk_unchecked(self, name: str, blob: bytes) -> bytes:
        """The plaintext of a chunk object of either version, every segment authenticated
        (IntegrityError naming the object otherwise)."""
        if blob and blob[0] == CHUNK_VERSION:
            layout = segmented_layout(len(blob))
            if layout is None:
                raise IntegrityError(f"object {name} has an impossible size ({len(blob)} bytes)")
            t, count = layout
            whole = SegmentSpan(0, count - 1, 1, len(blob), 0, t)
            padded = self._open_segments(name, len(blob), whole, memoryview(blob)[1:])
            (n,) = struct.unpack_from(">I", padded, t - 4)
            start = 0
        elif blob and blob[0] == OBJ_VERSION:
            try:
                padded = crypto.open_sealed(
                    self._chunk_key, memoryview(blob)[1:], self._aad(b"chunk", name)
                )
            except IntegrityError:
                raise IntegrityError(f"object {name} fails authentication") from None
            (n,) = struct.unpack_from(">I", padded, 0)
            start = 4
        else:
            raise IntegrityError(f"object {name} has an unknown format version")
        if n > len(padded) - 4:
            raise IntegrityError(f"object {name} has a bad length field")
        return bytes(padded[start : start + n])

    def chunk_span(self, size: int, offset: int, length: int) -> SegmentSpan | None:
        """The segments holding bytes ``[offset, offset + length)`` of the plaintext of a
        version 2 chunk object of ``size`` stored bytes, cut at its padded length (``take`` 0:
        the range lies past it, where a file reads zeros; the length field after the padding is
        never part of a span). None if no version 2 object has that size (a version 1 object:
        read it whole)."""
        layout = segmented_layout(size)
        if layout is None:
            return None
        t, _count = layout
        start, end = min(offset, t - 4), min(offset + length, t - 4)
        first = start // SEGMENT_SIZE
        last = max(first, (end - 1) // SEGMENT_SIZE)
        lo = 1 + first * _SEG_STORED
        hi = min(size, 1 + (last + 1) * _SEG_STORED)
        return SegmentSpan(first, last, lo, hi, start - first * SEGMENT_SIZE, end - start)

    def open_span(self, name: str, size: int, span: SegmentSpan,
                  data: bytes | memoryview) -> bytes:
        """The wanted bytes of ``span`` (from :meth:`chunk_span` for an object of ``size``
        bytes), given its object bytes ``data`` (``[lo, hi)``): each segment authenticated
        with its index and last-segment flag, else IntegrityError naming the object. Bytes of
        the padded plaintext past the chunk's length are its padding (zeros, authenticated)."""
        return bytes(self._open_segments(name, size, span, data)[span.skip:
                                                                 span.skip + span.take])

    def _open_segments(self, name: str, size: int, span: SegmentSpan,
                       data: bytes | memoryview) -> memoryview:
        """The plaintext of the segments of ``span`` (see :meth:`open_span`), each decrypted
        into its place in one buffer."""
        layout = segmented_layout(size)
        if layout is None or len(data) != span.hi - span.lo:
            raise IntegrityError(f"object {name}: got {len(data)} bytes of segments, expected "
                                 f"{span.hi - span.lo}")
        t, count = layout
        view = memoryview(data)
        nonce = self._segment_nonces(name, t)
        aad = self._aad(b"chunk", name)
        plain = memoryview(bytearray(len(view) - (span.last - span.first + 1) * crypto.TAG_SIZE))
        at = pos = 0
        for i in range(span.first, span.last + 1):
            sealed = view[at : at + _SEG_STORED]
            n = len(sealed) - crypto.TAG_SIZE
            try:
                crypto.gcm_decrypt_into(self._chunk_key, nonce(i), sealed,
                                        aad + _SEG_INDEX.pack(i, i == count - 1),
                                        plain[pos : pos + n])
            except IntegrityError:
                raise IntegrityError(f"object {name} fails authentication in segment {i}") \
                    from None
            at += _SEG_STORED
            pos += n
        return plain

    # -- packs ------------------------------------------------------------------------------
    def pack_tail(self, pack: str, members: list[ChunkRef]) -> bytes:
        """What follows a pack's member objects (docs/FORMAT.md 4.3): its sealed index, then
        the index's length as a big-endian u32."""
        doc = {"version": 1,
               "members": [[m.name, m.offset, m.size, m.sha256.hex()] for m in members]}
        index = self.seal_blob(b"pack", pack, json.dumps(doc).encode(), compress=True)
        return index + struct.pack(">I", len(index))

    def pack_index(self, pack: str, blob: bytes | memoryview) -> list[ChunkRef]:
        """The members a pack's index lists (each with ``pack`` and ``offset``), checked before
        use: the index authentic for this pack name, every member a chunk object name of at most
        PACK_MEMBER_MAX bytes lying before the index, no two overlapping. IntegrityError naming
        the pack otherwise. The members' own bytes are authenticated when they are opened."""
        view = memoryview(blob)
        if len(view) < 4:
            raise IntegrityError(f"pack {pack} is truncated")
        (n,) = struct.unpack(">I", view[-4:])
        if n > MAX_PACK_INDEX or n + 4 > len(view):
            raise IntegrityError(f"pack {pack} has an index length out of bounds")
        end = len(view) - 4 - n
        plain = self.open_blob(b"pack", pack, bytes(view[end:-4]))
        refs: list[ChunkRef] = []
        try:
            doc = json.loads(plain)
            if len(doc["members"]) > PACK_MAX_MEMBERS:
                raise ValueError("members")
            for name, off, size, sha in doc["members"]:
                ok = (isinstance(name, str) and name.startswith(DATA_PREFIX)
                      and isinstance(off, int) and isinstance(size, int)
                      and 0 < size <= PACK_MEMBER_MAX and 0 <= off and off + size <= end)
                if not ok:
                    raise ValueError(name)
                refs.append(ChunkRef(name, size, bytes.fromhex(sha), pack, off))
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"pack {pack} has a malformed index") from None
        refs.sort(key=lambda r: r.offset)
        if any(a.offset + a.size > b.offset for a, b in zip(refs, refs[1:], strict=False)):
            raise IntegrityError(f"pack {pack} has overlapping members")
        return refs

    # -- the journal's bytes (docs/FORMAT.md 5.3) --------------------------------------------
    def seal_journal(self, ino: int, idx: int, seq: int, off: int, plain: bytes) -> bytes:
        """A journal row's ``data``: sealed like a metadata object (kind ``journal``), its
        name binding the file, chunk, row and offset the bytes belong at."""
        return self.seal_blob(b"journal", journal_name(ino, idx, seq, off), plain)

    def open_journal(self, ino: int, idx: int, seq: int, off: int, sealed: bytes) -> bytes:
        """The bytes of a journal row (IntegrityError if not authentic for that place)."""
        return self.open_blob(b"journal", journal_name(ino, idx, seq, off), sealed)

    def seal_log_record(self, seq: int, head: bytes, n: int, plain: bytes) -> bytes:
        """Record ``n`` of the fsync log of checkpoint ``seq`` (ledger head hash ``head``):
        sealed like a metadata object (kind ``log``), its name binding the checkpoint (not only
        its number: a rollback may give a later checkpoint the same one) and the record's
        place in its log."""
        return self.seal_blob(b"log", log_record_name(seq, head, n), plain)

    def open_log_record(self, seq: int, head: bytes, n: int, sealed: bytes) -> bytes:
        """A log record's plaintext (IntegrityError if not authentic for that place)."""
        return self.open_blob(b"log", log_record_name(seq, head, n), sealed)

    # -- metadata snapshots and checkpoints ---------------------------------------------------
    def seal_blob(self, kind: bytes, name: str, plain: bytes, compress: bool = False) -> bytes:
        """``plain`` sealed as 5.1 says; with ``compress``, zlib-compressed (flag 0x01) if that
        pays (:func:`_compressed`), else as it is (flag 0x00)."""
        packed = _compressed(plain) if compress else None
        flag, body = (b"\x00", plain) if packed is None else (b"\x01", packed)
        return bytes([OBJ_VERSION]) + crypto.seal(
            self._meta_key, flag + body, self._aad(kind, name)
        )

    def open_blob(self, kind: bytes, name: str, blob: bytes) -> bytes:
        if not blob or blob[0] != OBJ_VERSION:
            raise IntegrityError(f"object {name} has an unknown format version")
        try:
            body = crypto.open_sealed(self._meta_key, memoryview(blob)[1:], self._aad(kind, name))
        except IntegrityError:
            raise IntegrityError(f"object {name} fails authentication") from None
        if body[:1] not in (b"\x00", b"\x01"):
            raise IntegrityError(f"object {name} has an unknown flag byte")
        if body[:1] == b"\x01":
            try:
                return zlib.decompress(body[1:])
            except zlib.error:
                raise IntegrityError(f"object {name} is corrupt after decryption") from None
        return body[1:]
