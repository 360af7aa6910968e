"""Checkpoints in the store: sealed, MAC'd ledger heads naming their metadata (a snapshot and, from
checkpoint version 2, the segments to apply to it in order; from version 3, the changes since
the last of them inline, a delta; from version 4, an fsync log may follow it: 6.7) with the
ledger entries written since; reading them authenticates them. See docs/FORMAT.md 6.1."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from cryptfs.errors import IntegrityError, ObjectNotFound
from cryptfs.format.codec import ChunkRef, Codec
from cryptfs.format.layout import CHECKPOINT_PREFIX, MAX_CHECKPOINT, checkpoint_name
from cryptfs.meta.ledger import Entry, check_head_mac
from cryptfs.stores import ObjectStore


# -- checkpoints in the store -------------------------------------------------------------------
@dataclass
class Checkpoint:
    name: str
    seq: int
    hash: bytes
    mac: bytes
    time_ns: int
    meta: ChunkRef  # the snapshot (a full image)
    tail: list[Entry]
    segments: list[ChunkRef] = field(default_factory=list)  # applied to ``meta`` in order
    version: int = 1
    size: int = 0  # bytes of the checkpoint object as stored
    image_seq: int = 0  # the last ledger entry its metadata image holds (set by materializing)
    delta: bytes | None = None  # a segment applied after ``segments`` (version 3)


# version 2 added ``segments`` (a version 1 checkpoint has none), version 3 ``delta``, version 4
# the fsync log ``logs/<seq>`` (cryptfs.vault.fsynclog) whose records apply after it, version 5
# records that also seal chunks (their chunk map entries and ledger entries), version 6 a log
# whose records are 4-byte aligned and may be followed by zeros written ahead of them
CHECKPOINT_VERSION = 6
LOG_VERSION = 4  # the first version an fsync log may follow
SEAL_VERSION = 5  # the first whose log's records may seal chunks (blocks, ledger entries)
AHEAD_VERSION = 6  # the first whose log may hold zeros after its records


def checkpoint_objects(ck: Checkpoint) -> list[ChunkRef]:
    """The metadata objects a checkpoint needs, in the order they are applied: its snapshot,
    then its segments (each with the size and hash the checkpoint records)."""
    return [ck.meta, *ck.segments]


def ref_of_json(d: Any) -> ChunkRef:  # noqa: ANN401 - parsed JSON, checked by the caller
    return ChunkRef(str(d["name"]), int(d["size"]), bytes.fromhex(d["sha256"]))


def ref_json(ref: ChunkRef) -> dict[str, object]:
    """A metadata object as a checkpoint records it: name, stored size, hex sha256."""
    return {"name": ref.name, "size": ref.size, "sha256": ref.sha256.hex()}


def read_checkpoints(
    store: ObjectStore, codec: Codec, newest_only: bool = True
) -> tuple[list[Checkpoint], list[str]]:
    """Authentic checkpoints, newest first, and problems with the others (one line each)."""
    good: list[Checkpoint] = []
    bad: list[str] = []
    names = sorted((n for n, _ in store.list(CHECKPOINT_PREFIX)), reverse=True)
    for name in names:
        try:
            good.append(open_checkpoint(codec, name, store.get(name, MAX_CHECKPOINT)))
        except ObjectNotFound:
            continue
        except IntegrityError as e:
            bad.append(f"checkpoint {name}: rejected, {e}")
            continue
        if newest_only:
            break
    return good, bad


def open_checkpoint(codec: Codec, name: str, blob: bytes) -> Checkpoint:
    """Authenticate and parse a checkpoint object; IntegrityError (a reason in the words of
    'checkpoint NAME: rejected, ...') if it is not an authentic checkpoint of this name."""
    try:
        body = json.loads(codec.open_blob(b"checkpoint", name, blob))
    except IntegrityError:
        raise IntegrityError("it fails authentication") from None
    except ValueError:
        raise IntegrityError("it is malformed") from None
    try:
        version = int(body.get("version", 1))
        ck = Checkpoint(
            name,
            int(body["seq"]),
            bytes.fromhex(body["hash"]),
            bytes.fromhex(body["mac"]),
            int(body["time_ns"]),
            ref_of_json(body["meta"]),
            [Entry.from_json(e) for e in body["tail"]],
            [ref_of_json(x) for x in body.get("segments", [])] if version >= 2 else [],
            version,
            len(blob),
        )
        if version >= 3 and body.get("delta") is not None:
            ck.delta = base64.b64decode(body["delta"].encode("ascii"), validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise IntegrityError("it is malformed") from None
    if version > CHECKPOINT_VERSION or version < 1:
        raise IntegrityError(f"it is version {version}; this cryptfs reads versions 1 to "
                             f"{CHECKPOINT_VERSION}")
    if not check_head_mac(codec.ledger_key, ck.seq, ck.hash, ck.mac) \
            or name != checkpoint_name(ck.seq):
        raise IntegrityError("its head MAC or name is wrong")
    return ck
