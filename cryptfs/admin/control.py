"""Asking a running mount to do something: the daemon's control socket.

A mounted vault is held by its daemon (the vault lock, the lease, the only writer of the
metadata), so commands that change the vault while it is mounted (``cryptfs snapshot``) ask the
daemon instead of opening the vault: the daemon listens on a Unix socket in Linux's abstract
namespace (no file: nothing to clean up after a crash, nothing for copies or backups of the
local state directory to trip over, no path length limit), named after the vault's local state
directory (:func:`address`). Abstract sockets have no file permissions, so both ends check the
other's credentials (``SO_PEERCRED``): the daemon answers only its own user or root, and a
client talks only to a daemon of its own user or root (another user could bind the name
first). One request per connection: one JSON line in, one JSON line out,
``{"ok": true, "result": ...}`` or ``{"ok": false, "code": EXIT, "error": LINE}``; at most
64 KiB each way. No key or passphrase is ever sent; the caller needs none (it could read and
write the mounted files anyway).

Unmounted, the same requests run on a vault the CLI opens itself (:func:`run_local`), so both
paths execute :func:`dispatch`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptfs.errors import CryptfsError, MountError, UsageError

if TYPE_CHECKING:
    from cryptfs.vault.core import Vault

log = logging.getLogger("cryptfs.admin.control")

MAX_MESSAGE = 1 << 16


def address(data_dir: Path) -> str:
    """The abstract socket name of the mount of the vault whose local state is ``data_dir``."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()[:32]
    return f"\0cryptfs-control/{key}"


def _peer_ok(sock: socket.socket) -> bool:
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", cred)
    return uid in (0, os.geteuid())


def dispatch(vault: Vault, req: dict[str, Any]) -> Any:
    """Run one request on an open vault; returns a JSON-able result or raises CryptfsError."""
    from cryptfs.vault import snapshots
    from cryptfs.vault.checkpointer import KEEP_CHECKPOINTS

    op = req.get("op")
    if op == "snapshot-create":
        name = req.get("name")
        snap = snapshots.create_snapshot(vault, name if isinstance(name, str) else None)
        return _snap_json(snap)
    if op == "snapshot-delete":
        return _snap_json(snapshots.delete_snapshot(vault, str(req.get("snapshot", ""))))
    if op == "snapshot-list":
        return [{**_snap_json(u.snapshot), "objects": u.objects, "bytes": u.bytes,
                 "only_objects": u.only_objects, "only_bytes": u.only_bytes}
                for u in snapshots.usage(vault, KEEP_CHECKPOINTS)]
    if op == "snapshot-policy":
        wanted = req.get("set")
        if isinstance(wanted, dict):
            return snapshots.set_policy(vault, wanted)
        return snapshots.get_policy(vault)
    raise UsageError(f"unknown control request {op!r}")


def _snap_json(s: Any) -> dict[str, Any]:
    return {"id": s.id, "name": s.name, "time": s.when(), "time_ns": s.time_ns,
            "checkpoint": s.checkpoint.name, "meta": s.meta.name, "seq": s.seq,
            "head": s.hash.hex()}


class ControlServer:
    """The daemon's end: serves :func:`dispatch` on ``path`` from one thread until closed."""

    def __init__(self, data_dir: Path, vault: Vault, mountpoint: str) -> None:
        """Listen at :func:`address` of ``data_dir``; OSError if that name is taken."""
        self.vault = vault
        self.mountpoint = mountpoint  # answered to {"op": "mountpoint"}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(address(data_dir))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(4)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._one(conn)
                except (OSError, CryptfsError) as e:  # a client gone or misbehaving
                    log.warning("control request failed: %s", e)
                except Exception:  # noqa: BLE001 - one bad request never ends the server
                    log.exception("control request failed")

    def _one(self, conn: socket.socket) -> None:
        if not _peer_ok(conn):
            return
        conn.settimeout(10)
        data = _read_line(conn)
        try:
            req = json.loads(data)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            reply: dict[str, Any] = {"ok": False, "code": 2, "error": "malformed request"}
        else:
            conn.settimeout(None)  # a snapshot waits for a checkpoint: uploads may take long
            try:
                result = self.mountpoint if req.get("op") == "mountpoint" \
                    else dispatch(self.vault, req)
                reply = {"ok": True, "result": result}
            except CryptfsError as e:
                reply = {"ok": False, "code": e.exit_code, "error": e.line()}
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise MountError("control message too long")
    return data


def ask(data_dir: Path, req: dict[str, Any]) -> Any | None:
    """Send ``req`` to the mount of the vault whose local state is ``data_dir``; its result, or
    None if it is not mounted read-write. A refused request raises a CryptfsError with the
    daemon's line and exit code."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            s.connect(address(data_dir))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        if not _peer_ok(s):
            raise MountError("the vault's control socket belongs to another user",
                             hint="unmount it, or find who holds the name")
        s.sendall(json.dumps(req).encode() + b"\n")
        data = _read_line(s)
    finally:
        s.close()
    try:
        reply = json.loads(data)
        ok = bool(reply["ok"])
    except (ValueError, KeyError, TypeError):
        raise MountError("the mount daemon gave no answer", hint="see its daemon.log") from None
    if ok:
        return reply.get("result")
    err = CryptfsError(str(reply.get("error", "failed")))
    code = reply.get("code")
    err.exit_code = code if isinstance(code, int) else 1
    raise err
