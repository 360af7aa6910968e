"""Checkpoints in the store: sealed, MAC'd ledger heads naming their metadata snapshot (with the
ledger entries written since it); reading them authenticates them. See docs/FORMAT.md 6.1."""

from __future__ import annotations

import json
from dataclasses import dataclass

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
    meta: ChunkRef
    tail: list[Entry]
    size: int = 0  # bytes of the checkpoint object as stored
    image_seq: int = 0  # the last ledger entry its metadata image holds (set by materializing)


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
        ck = Checkpoint(
            name,
            int(body["seq"]),
            bytes.fromhex(body["hash"]),
            bytes.fromhex(body["mac"]),
            int(body["time_ns"]),
            ChunkRef(
                str(body["meta"]["name"]),
                int(body["meta"]["size"]),
                bytes.fromhex(body["meta"]["sha256"]),
            ),
            [Entry.from_json(e) for e in body["tail"]],
            len(blob),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError("it is malformed") from None
    if not check_head_mac(codec.ledger_key, ck.seq, ck.hash, ck.mac) \
            or name != checkpoint_name(ck.seq):
        raise IntegrityError("its head MAC or name is wrong")
    return ck
