"""Mounting and unmounting: mountpoint checks, the background daemon and its readiness pipe.

``mount_vault`` checks everything it can in the calling process (mountpoint, passphrase), then
starts the daemon (:mod:`cryptfs.cli.mountd`) that opens the vault and serves FUSE; the caller
returns when the daemon reports on the readiness pipe that the mount is live, or prints the
daemon's one-line error. The daemon is a new program (``exec``), not the forked CLI: its
environment is the caller's without ``CRYPTFS_PASSPHRASE`` and ``CRYPTFS_NEW_PASSPHRASE`` (so
``/proc/PID/environ`` never shows them, which no change of ``os.environ`` after the exec could
achieve), and the master key and options reach it on an inherited pipe, never in argv or the
environment. The daemon then makes itself non-dumpable, sets its core limit to 0 and locks its
memory where it may (see :func:`cryptfs.cli.mountd.harden`). With ``--foreground`` the CLI process
itself execs the daemon (same pid, same terminal).

Longer than ~400 lines: mount options, starting, watching and stopping the daemon, and
unmounting are one user-facing job.
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptfs.errors import CryptfsError, MountError, StoreError, UsageError
from cryptfs.paths import VaultPaths, paths_for_mount, private_dir

if TYPE_CHECKING:
    from cryptfs.metrics import Metrics, MetricsEndpoint

log = logging.getLogger("cryptfs.cli.mount")

KNOWN_OPTIONS = {
    "allow_other",
    "ro",
    "rw",
    "nonempty",
    "cache_size",
    "passfile",
    "keyfile",
    "extpass",
    "name",
    "default_permissions",
    "metrics",
}
# accepted and ignored: fstab/mount(8)/systemd conventions that mean nothing to cryptfs (x-* too)
IGNORED_OPTIONS = {
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "comment",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "sync",
    "async",
    "silent",
    "loud",
    "iversion",
    "noiversion",
}


def split_options(spec: str) -> list[str]:
    """Split a mount option string at commas, keeping commas inside double quotes
    (``extpass="prog --arg a,b"``, as libmount allows); the quotes are removed."""
    items, cur, quoted = [], [], False
    for ch in spec:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise UsageError(f"unbalanced quote in mount options {spec!r}")
    items.append("".join(cur))
    return [i for i in items if i]


@dataclass
class MountOptions:
    allow_other: bool = False
    readonly: bool = False
    nonempty: bool = False
    cache_bytes: int = 1 << 30
    passfile: str | None = None
    keyfile: str | None = None
    extpass: str | None = None
    name: str | None = None
    metrics: str | None = None  # HOST:PORT of the metrics endpoint; None: no endpoint
    at: str | None = None  # --at: mount this snapshot (name, id or time) read-only
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: list[str]) -> MountOptions:
        o = cls()
        for spec in specs:
            for item in split_options(spec):
                key, _, value = item.partition("=")
                if key in IGNORED_OPTIONS or key.startswith("x-"):
                    continue
                if key not in KNOWN_OPTIONS:
                    raise UsageError(
                        f"unknown mount option '{key}'",
                        hint="known: " + ", ".join(sorted(KNOWN_OPTIONS - {"name"})),
                    )
                if key in ("cache_size", "passfile", "keyfile", "extpass", "name") and not value:
                    raise UsageError(f"mount option '{key}' needs a value ({key}=...)")
                if key == "allow_other":
                    o.allow_other = True
                elif key == "ro":
                    o.readonly = True
                elif key == "rw":
                    o.readonly = False
                elif key == "nonempty":
                    o.nonempty = True
                elif key == "cache_size":
                    o.cache_bytes = parse_size(value)
                elif key == "passfile":
                    o.passfile = value
                elif key == "keyfile":
                    o.keyfile = value
                elif key == "extpass":
                    o.extpass = value
                elif key == "name":
                    o.name = value
                elif key == "metrics":
                    o.metrics = check_metrics_address(value)
        return o


MAX_SIZE = 1 << 50  # 1 PiB: any size option above this is a typo


def check_metrics_address(value: str) -> str:
    """The metrics endpoint address of ``-o metrics[=ADDR]`` / ``--metrics[=ADDR]``,
    normalised (UsageError when malformed)."""
    from cryptfs.metrics import format_address, parse_address

    return format_address(*parse_address(value))


def parse_size(text: str) -> int:
    """``1.5G``, ``512m``, ``4096``... in bytes, from 0 to 1 PiB (UsageError otherwise)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        v = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        v = -1.0
    if not 0 <= v <= MAX_SIZE:  # also nan and inf
        raise UsageError(f"invalid size '{text[:30]}'", hint="a size from 0 to 1P, e.g. 512M")
    return int(v)


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1].encode().decode("unicode_escape") == real for line in f)
    except OSError:
        return os.path.ismount(real)


def check_mountpoint(path: str, nonempty: bool) -> str:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MountError(
            f"mountpoint {path} does not exist", hint=f"create it: mkdir {path}"
        ) from None
    except OSError as e:
        if e.errno == 107:  # ENOTCONN: a dead FUSE mount
            raise MountError(
                f"{path} is a stale mount of a process that died",
                hint=f"run 'fusermount3 -u {path}' first",
            ) from None
        raise MountError(f"cannot use mountpoint {path}: {e.strerror}") from None

    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    if is_mountpoint(real):
        raise MountError(f"{path} is already a mountpoint", hint="unmount it first")
    if not nonempty and os.listdir(real):
        raise MountError(f"mountpoint {path} is not empty", hint="use -o nonempty to mount anyway")
    return real


def setup_daemon_logging(paths: VaultPaths, foreground: bool, verbose: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if foreground:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("cryptfs: %(levelname)s %(message)s"))
    else:
        private_dir(paths.data_dir)
        logfile = paths.data_dir / "daemon.log"
        fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        h = logging.handlers.RotatingFileHandler(logfile, maxBytes=4 << 20, backupCount=2)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        try:  # warnings and errors also go to the journal or syslog, where a system has one
            sys_h = logging.handlers.SysLogHandler(address="/dev/log")
            sys_h.setFormatter(logging.Formatter(f"cryptfs[{os.getpid()}]: %(message)s"))
            sys_h.setLevel(logging.WARNING)
            root.addHandler(sys_h)
        except OSError:
            pass
    root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("mfusepy").setLevel(logging.WARNING)


def serve(
    paths: VaultPaths, master: bytes, mountpoint: str, opts: MountOptions, ready_fd: int | None
) -> int:
    """Open the vault and serve FUSE until unmounted (runs in the daemon or with -f)."""
    from cryptfs.cli.fuse_ops import (
        CryptfsFUSE,
        CryptfsOperations,
        SharedLocksOperations,
        widen_readahead,
    )
    from cryptfs.fs.locks import LOCK_THREADS
    from cryptfs.vault.core import Vault

    metrics: Metrics | None = None  # with -o metrics: the mount's registry and its endpoint
    endpoint: MetricsEndpoint | None = None

    def report(msg: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, msg.encode(errors="replace") + b"\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        if opts.metrics is not None:  # bound first: a taken port fails before the vault opens
            from cryptfs.metrics import Metrics, MetricsEndpoint

            endpoint = MetricsEndpoint(opts.metrics)
            metrics = Metrics()
        if opts.at is not None:  # the past, read-only, beside any live mount
            from cryptfs.vault.snapshots import open_past

            vault = open_past(paths, master, opts.at, opts.cache_bytes)[0]
        else:
            vault = Vault.open(
                paths, master=master, readonly=opts.readonly, cache_bytes=opts.cache_bytes,
                metrics=metrics,
            )
    except CryptfsError as e:
        if endpoint is not None:
            endpoint.close()
        report(f"ERR {e.exit_code} {e.line()}")
        log.error("%s", e.line())
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - one line to the user, the traceback to the log
        if endpoint is not None:
            endpoint.close()
        log.exception("cannot open the vault")
        report(f"ERR 1 cannot open the vault: {e}")
        return 1
    for w in vault.warnings:
        log.warning("%s", w)
    assert vault.fs is not None
    from cryptfs.admin.status import StatusPublisher

    publisher = StatusPublisher(vault, mountpoint, opts.cache_bytes,
                                metrics=endpoint.address if endpoint is not None else None)
    publisher.start()  # status.json for `cryptfs status`, about once a second
    control = None  # `cryptfs snapshot` asks a writable mount through its control socket
    if not vault.readonly:
        from cryptfs.admin.control import ControlServer

        try:
            control = ControlServer(paths.data_dir, vault, mountpoint)
        except OSError as e:  # the name is taken (by a process of another user)
            log.warning("no control socket (cryptfs snapshot needs the vault unmounted): %s", e)
    if endpoint is not None and metrics is not None:
        from cryptfs.metrics import VaultCollector

        metrics.registry.register(VaultCollector(vault))
        endpoint.start(metrics.registry, publisher.snapshot)
    # several machines: fcntl/flock locks in the database; one machine: the kernel's
    kind = SharedLocksOperations if vault.fs.meta.shared else CryptfsOperations
    where = os.path.realpath(mountpoint)  # (before the mount: not a FUSE call in its init)

    def ready() -> None:
        widen_readahead(where)
        report("OK")

    ops = kind(vault.fs, on_init=ready)
    kwargs: dict[str, object] = {
        "foreground": True,
        "fsname": f"cryptfs:{vault.paths.mount_name}",
        "subtype": "cryptfs",
        "default_permissions": True,
    }
    if vault.fs.meta.shared:  # (a waiting file lock takes a worker thread: cryptfs.fs.locks)
        kwargs["max_threads"] = LOCK_THREADS
    if opts.allow_other:
        kwargs["allow_other"] = True
    if opts.readonly:
        kwargs["ro"] = True
    status = 0
    log.info("mounting vault '%s' at %s", paths.name, mountpoint)
    try:
        CryptfsFUSE(ops, mountpoint, metrics=metrics, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported, then the vault is closed below
        report(f"ERR 7 cannot mount {mountpoint}: {e}")
        log.error("FUSE stopped: %s", e)
        status = 7
    finally:
        log.info("unmounted; storing pending data")
        if endpoint is not None:  # the port closes with the mount
            endpoint.close()
        publisher.stop()
        if control is not None:
            control.close()

        def failed(e: CryptfsError) -> None:  # before the vault is released: `umount` waits
            log.error(  # for the release, then reads what this wrote
                "closing the vault failed: %s (staged data is kept and resumes at the next mount)",
                e.line(),
            )
            _close_error(paths).write_text(f"{e.exit_code} {e.line()}\n")

        try:
            vault.close(progress=publisher.unmounting, on_failure=failed)
            log.info("vault '%s' closed cleanly", paths.name)
        except CryptfsError as e:
            status = e.exit_code
        publisher.remove()
        if opts.at is not None:
            import shutil

            shutil.rmtree(vault.paths.data_dir, ignore_errors=True)
            shutil.rmtree(vault.paths.cache_dir, ignore_errors=True)
    return status


def _close_error(paths: VaultPaths) -> Path:
    """Where the daemon leaves the reason its final checkpoint failed, for `cryptfs umount`."""
    return paths.data_dir / "close-error"


def mount_vault(
    paths: VaultPaths,
    master: bytes,
    mountpoint: str,
    opts: MountOptions,
    foreground: bool,
    verbose: bool,
) -> int:
    real = check_mountpoint(mountpoint, opts.nonempty)
    key_r, key_w = os.pipe()
    settings = {"allow_other": opts.allow_other, "readonly": opts.readonly,
                "cache_bytes": opts.cache_bytes, "metrics": opts.metrics, "at": opts.at}
    os.write(key_w, master + json.dumps(settings).encode())  # far below a pipe's buffer
    os.close(key_w)
    argv = [sys.executable, "-m", "cryptfs.cli.mountd", paths.name, real, f"--key-fd={key_r}"]
    if verbose:
        argv.append("--verbose")
    env = daemon_environment()
    if foreground:
        os.set_inheritable(key_r, True)
        try:
            os.execve(sys.executable, [*argv, "--foreground"], env)
        except OSError as e:
            os.close(key_r)
            raise MountError(
                f"cannot start the mount daemon {sys.executable}: {e.strerror}") from None
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([*argv, f"--ready-fd={w}"], env=env, pass_fds=(key_r, w),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd="/", start_new_session=True)
    except OSError as e:
        raise MountError(f"cannot start the mount daemon {sys.executable}: {e.strerror}") from None
    finally:
        os.close(key_r)
        os.close(w)
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(r)
    text = msg.decode(errors="replace").strip()
    if text == "OK":
        proc.returncode = 0  # it lives on as the daemon; nobody waits for it here
        return 0
    proc.wait()
    if text.startswith("ERR "):
        code, _, line = text[4:].partition(" ")
        err = MountError(line)
        err.exit_code = int(code) if code.isdigit() else MountError.exit_code
        raise err
    raise MountError(
        f"the mount daemon exited without mounting {mountpoint}",
        hint=f"see {paths.data_dir / 'daemon.log'}",
    )


SECRET_VARIABLES = ("CRYPTFS_PASSPHRASE", "CRYPTFS_NEW_PASSPHRASE")


def daemon_environment() -> dict[str, str]:
    """The daemon's environment: ours without the passphrase variables. When this cryptfs
    package was imported from a source tree rather than an installation, that tree goes first
    on PYTHONPATH, so the daemon runs this very code (a site-packages directory is never put
    there: it would come before the standard library)."""
    import site

    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    installed = {os.path.abspath(p) for p in [*site.getsitepackages(),
                                               site.getusersitepackages()]}
    if here not in installed:
        env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


def mounted_vault(mountpoint: str) -> str | None:
    """The vault name of a cryptfs mount at ``mountpoint`` (from /proc/self/mounts)."""
    real = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mp, fstype = line.split()[:3]
            if mp.encode().decode("unicode_escape") == real and dev.startswith("cryptfs:"):
                return dev.split(":", 1)[1]
    return None


def unmount(mountpoint: str, name: str | None, show_progress: bool) -> None:
    """Unmount, then wait until the daemon has stored everything and released the vault."""
    found = mounted_vault(mountpoint)
    if found is None:
        raise MountError(f"{mountpoint} is not a cryptfs mount")
    paths = VaultPaths(name) if name else paths_for_mount(found)
    _close_error(paths).unlink(missing_ok=True)  # before the daemon can write it
    cmd = ["fusermount3", "-u", mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        err = (res.stderr.strip().splitlines() or ["failed"])[-1]
        if "busy" in err.lower():
            raise MountError(f"{mountpoint} is busy", hint="close the files and shells using it")
        raise MountError(f"cannot unmount {mountpoint}: {err}")
    wait_released(paths, show_progress)
    failed = _close_error(paths)
    if failed.exists():
        code, _, line = failed.read_text().strip().partition(" ")
        failed.unlink(missing_ok=True)
        err = StoreError(f"unmounted, but not everything reached the store: {line}",
                         hint="the data is kept locally and is stored at the next mount")
        err.exit_code = int(code) if code.isdigit() else StoreError.exit_code
        raise err


def wait_released(paths: VaultPaths, show_progress: bool) -> None:
    """Wait until the daemon lets go of the vault's lock file. A lock file that is gone (a
    mount of the past removes its whole directory as it ends, maybe between a check and the
    open) is released."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return
    last = ""
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if show_progress:
                try:
                    status = (paths.data_dir / "status.json").read_text()
                    st = json.loads(status)
                    line = (
                        f"\rcryptfs: storing pending data: {st['pending_objects']} objects, "
                        f"{st['pending_bytes'] / 1e6:.1f} MB left "
                    )
                except (OSError, ValueError, KeyError, TypeError):  # a torn or odd file
                    line = ""
                if line and line != last:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                    last = line
            time.sleep(0.1)
    finally:
        os.close(fd)
        if last:
            sys.stderr.write("\rcryptfs: all data stored" + " " * 40 + "\n")
