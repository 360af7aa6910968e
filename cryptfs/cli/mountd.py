"""The mount daemon's entry point: ``python -m cryptfs.cli.mountd NAME MOUNTPOINT``.

``cryptfs mount`` (see :mod:`cryptfs.cli.mount`) unlocks the vault, then starts this program with
``exec`` and an environment without ``CRYPTFS_PASSPHRASE`` and ``CRYPTFS_NEW_PASSPHRASE``; the
master key and the mount options arrive on an inherited pipe (``--key-fd``), never in argv or
the environment. Before reading the key the daemon protects its memory (:func:`harden`).

Why a new program rather than the forked CLI process: ``/proc/PID/environ`` shows the block of
memory the process was exec'ed with, whatever ``os.environ`` says later, and a forked child
shares that block with the CLI. Overwriting it in place would mean writing through an address
read from ``/proc/self/stat`` into the stack, and would still leave the passphrase in the heap
the child inherited (``getpass``'s string, ``os.environ``'s copy, the encoded bytes). An exec
with a cleaned environment gives a process whose environment, memory and open files never held
the passphrase, and that does not inherit the CLI's threads' locks either. It costs one more
interpreter start and import (about 0.4 s per mount on the 2-core test machine).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import sys

log = logging.getLogger("cryptfs.cli.mount")

PR_SET_DUMPABLE = 4
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MAX_PAYLOAD = 1 << 16


def harden() -> list[str]:
    """Protect the key in this process's memory; returns what could not be done (for the log).

    - ``prctl(PR_SET_DUMPABLE, 0)``: no core dump, no ptrace or ``/proc/PID/mem``,
      ``/proc/PID/environ`` for processes of the same user without CAP_SYS_PTRACE;
    - ``RLIMIT_CORE`` 0 (also for anything the daemon would exec);
    - ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`` where memory locking is not limited
      (root, or an unlimited ``RLIMIT_MEMLOCK``): no page of the process, and so no copy of the
      key Python or OpenSSL made, is written to swap. ``MCL_ONFAULT`` locks pages as they are
      touched, so the resident size does not grow (without it every thread's 8 MiB stack would
      be made resident). Under a limit it is not tried: with ``MCL_FUTURE`` every allocation
      beyond the limit would fail. Python offers no way to lock only the key's bytes (they are
      copied into sub-keys, cipher contexts and temporaries), so there is no partial fallback:
      without it, use encrypted swap or none.
    """
    notes = []
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        notes.append(f"cannot make the process non-dumpable: {os.strerror(ctypes.get_errno())}")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as e:
        notes.append(f"cannot set the core size limit to 0: {e}")
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() == 0 or soft == resource.RLIM_INFINITY:
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
            notes.append(f"memory is not locked: mlockall: {os.strerror(ctypes.get_errno())}")
    else:
        notes.append(f"memory is not locked (RLIMIT_MEMLOCK is {soft} bytes; key pages may "
                     "reach swap)")
    return notes


def _read_all(fd: int) -> bytes:
    data = b""
    while len(data) <= MAX_PAYLOAD:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    return data


def main(argv: list[str] | None = None) -> int:
    from cryptfs.cli.mount import MountOptions, serve, setup_daemon_logging
    from cryptfs.paths import VaultPaths

    p = argparse.ArgumentParser(prog="cryptfs.cli.mountd")
    p.add_argument("name")
    p.add_argument("mountpoint")
    p.add_argument("--key-fd", type=int, required=True)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--foreground", action="store_true")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    try:
        notes = harden()
        payload = _read_all(a.key_fd)
        master, settings = payload[:32], json.loads(payload[32:].decode())
        paths = VaultPaths(a.name)
        opts = MountOptions(allow_other=bool(settings["allow_other"]),
                            readonly=bool(settings["readonly"]),
                            cache_bytes=int(settings["cache_bytes"]),
                            metrics=settings.get("metrics"), at=settings.get("at"))
        setup_daemon_logging(paths, a.foreground, a.verbose)
    except Exception as e:  # noqa: BLE001 - the caller prints it as one line
        if a.ready_fd is not None:
            os.write(a.ready_fd, f"ERR 1 the mount daemon could not start: {e}\n".encode())
        else:
            print(f"cryptfs: the mount daemon could not start: {e}", file=sys.stderr)
        return 1
    for n in notes:
        log.info("%s", n)
    return serve(paths, master, a.mountpoint, opts, a.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
