"""Command line: ``cryptfs`` (init, mount, umount, verify, log, list) and ``mount.cryptfs``.

Every failure prints one line ``cryptfs: <what> (<hint>)`` on stderr and exits with the error's
code (see README: exit codes); tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time

from cryptfs.errors import CryptfsError, UsageError
from cryptfs.paths import VaultPaths, list_vaults

DEFAULT_NAME = "default"

EPILOGS = {
    "init": "example: cryptfs init s3://my-bucket/vault --name work\n"
    "         cryptfs init            (the embedded local store)",
    "mount": "example: cryptfs mount --name work ~/work -o allow_other",
    "umount": "example: cryptfs umount ~/vault",
    "verify": "example: cryptfs verify --full",
    "log": "example: cryptfs log -n 20",
    "fsck": "example: cryptfs fsck --repair",
    "list": "example: cryptfs list",
}


def get_passphrase(passphrase_file: str | None, confirm: bool = False) -> bytes:
    """From --passphrase-file, then $CRYPTFS_PASSPHRASE, then the terminal."""
    if passphrase_file:
        try:
            with open(passphrase_file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(
                f"cannot read passphrase file {passphrase_file}: {e.strerror}"
            ) from None
        return data.rstrip(b"\r\n")
    env = os.environ.get("CRYPTFS_PASSPHRASE")
    if env is not None:
        return env.encode()
    if not sys.stdin.isatty():
        raise UsageError(
            "no passphrase given",
            hint="use --passphrase-file, set CRYPTFS_PASSPHRASE, or run on a terminal",
        )
    p1 = getpass.getpass("Passphrase: ").encode()
    if confirm:
        p2 = getpass.getpass("Repeat passphrase: ").encode()
        if p1 != p2:
            raise UsageError("the passphrases do not match")
    return p1


def _paths(args: argparse.Namespace) -> VaultPaths:
    return VaultPaths(getattr(args, "name", None) or DEFAULT_NAME)


# -- commands ------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from cryptfs.vault import DEFAULT_CHUNK_SIZE, create_vault

    paths = _paths(args)
    url = args.store_url or f"file://{paths.default_store}"
    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    if chunk < 4096 or chunk > (64 << 20) or chunk & (chunk - 1):
        raise UsageError("--chunk-size must be a power of two from 4096 to 64 MiB")
    passphrase = get_passphrase(args.passphrase_file, confirm=True)
    _cfg, created = create_vault(paths, url, passphrase, chunk, os.getuid(), os.getgid())
    verb = "created" if created else "attached existing"
    print(f"cryptfs: {verb} vault '{paths.name}' in {url}")
    return 0


def _unlock(paths: VaultPaths, passphrase_file: str | None) -> bytes:
    from cryptfs.vault import load_local_config

    _url, cfg = load_local_config(paths)
    return cfg.unlock(get_passphrase(passphrase_file))


def cmd_mount(args: argparse.Namespace) -> int:
    from cryptfs.mount import MountOptions, check_mountpoint, mount_vault

    opts = MountOptions.parse(args.o or [])
    paths = VaultPaths(args.name or opts.name or DEFAULT_NAME)
    check_mountpoint(args.mountpoint, opts.nonempty)
    master = _unlock(paths, args.passphrase_file or opts.passfile)
    return mount_vault(paths, master, args.mountpoint, opts, args.foreground, args.verbose)


def cmd_umount(args: argparse.Namespace) -> int:
    from cryptfs.mount import unmount

    unmount(args.mountpoint, args.name, sys.stderr.isatty())
    return 0


def _open_for_check(args: argparse.Namespace, readonly: bool):  # type: ignore[no-untyped-def]
    from cryptfs.vault import Vault

    paths = _paths(args)
    master = _unlock(paths, args.passphrase_file)
    return Vault.open(paths, master=master, readonly=readonly, check=False)


def cmd_verify(args: argparse.Namespace) -> int:
    from cryptfs.verify import accept, verify

    vault = _open_for_check(args, readonly=not args.accept)
    try:
        if args.accept:
            accept(vault, print)
        rep = verify(vault, full=args.full)
    finally:
        vault.close(checkpoint=False)
    if args.json:
        print(
            json.dumps(
                {
                    "clean": rep.clean,
                    "problems": [p.to_json() for p in rep.problems],
                    "ledger_entries": rep.ledger_entries,
                    "objects_checked": rep.objects_checked,
                    "objects_downloaded": rep.objects_downloaded,
                    "store_objects": rep.store_objects,
                },
                indent=1,
            )
        )
    else:
        for p in rep.problems:
            print(p.line())
        print(rep.summary())
    return 0 if rep.clean else 6


def cmd_fsck(args: argparse.Namespace) -> int:
    from cryptfs.fsck import fsck
    vault = _open_for_check(args, readonly=not args.repair)
    try:
        rep = fsck(vault, repair=args.repair)
        if args.repair and rep.repaired:
            vault.sync()
    finally:
        vault.close(checkpoint=False)
    rep.repaired[:0] = vault.recovered  # what opening the vault repaired already
    for line in rep.repaired:
        print(f"repaired: {line}")
    for line in rep.problems:
        print(line)
    print(rep.summary())
    return 0 if rep.clean else 6


def cmd_log(args: argparse.Namespace) -> int:
    vault = _open_for_check(args, readonly=True)
    try:
        assert vault.ledger is not None
        for e in vault.ledger.newest(args.n):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time_ns / 1e9))
            print(f"{e.seq:>7} {e.hash.hex()[:12]} {when} {e.op:<6} {e.name} ({e.size} bytes)")
    finally:
        vault.close(checkpoint=False)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cryptfs.vault import load_local_config

    for name in list_vaults():
        try:
            url, _cfg = load_local_config(VaultPaths(name))
        except CryptfsError as e:
            url = f"<{e}>"
        print(f"{name}\t{url}")
    return 0


# -- parsing -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryptfs",
        description="Encrypted, tamper-evident cloud filesystem.",
        epilog="run 'cryptfs COMMAND --help' for details",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOGS.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return sp

    def common(sp: argparse.ArgumentParser, passphrase: bool = True) -> None:
        sp.add_argument("--name", help=f"vault name (default: {DEFAULT_NAME})")
        if passphrase:
            sp.add_argument(
                "--passphrase-file",
                metavar="FILE",
                help="read the passphrase from FILE (else $CRYPTFS_PASSPHRASE, else prompt)",
            )

    sp = add("init", "create a vault (or attach one that exists in the store)")
    sp.add_argument(
        "store_url",
        nargs="?",
        help="file:///path or s3://bucket[/prefix]"
        "[?endpoint=URL]; default: the embedded local store",
    )
    sp.add_argument("--chunk-size", type=int, metavar="BYTES", help="chunk size (power of two)")
    common(sp)
    sp.set_defaults(func=cmd_init)

    sp = add("mount", "mount a vault; returns when the mount is ready")
    sp.add_argument("mountpoint")
    sp.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    sp.add_argument(
        "-o",
        action="append",
        metavar="OPTS",
        help="allow_other, ro, nonempty, cache_size=SIZE, passfile=FILE",
    )
    sp.add_argument("-v", "--verbose", action="store_true")
    common(sp)
    sp.set_defaults(func=cmd_mount)

    sp = add("umount", "unmount after everything is stored")
    sp.add_argument("mountpoint")
    sp.add_argument("--name", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_umount)

    sp = add("verify", "check the ledger, its anchors and every object")
    sp.add_argument("--full", action="store_true", help="download and authenticate every object")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument(
        "--accept",
        action="store_true",
        help="accept the current local state after a rollback warning and re-anchor",
    )
    common(sp)
    sp.set_defaults(func=cmd_verify)

    sp = add("fsck", "check metadata invariants, reference counts, chunks and staged uploads")
    sp.add_argument("--repair", action="store_true", help="repair what is safe to repair")
    common(sp)
    sp.set_defaults(func=cmd_fsck)

    sp = add("log", "show the newest ledger entries")
    sp.add_argument("-n", type=int, default=20, help="how many (default 20)")
    common(sp)
    sp.set_defaults(func=cmd_log)

    sp = add("list", "list the vaults configured on this machine")
    sp.set_defaults(func=cmd_list)
    return p


def run(argv: list[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="cryptfs: %(message)s")
    logging.getLogger("botocore").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except CryptfsError as e:
        if args.debug:
            raise
        print(f"cryptfs: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cryptfs: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, build_parser())


def mount_main(argv: list[str] | None = None) -> int:
    """``mount.cryptfs [SPEC] DIR [-o OPTS]``: the mount(8) helper convention."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="mount.cryptfs",
        description="mount a cryptfs vault",
        epilog="example: mount.cryptfs ~/vault\n"
        "         mount -t cryptfs work /mnt/work -o allow_other",
    )
    p.add_argument("spec_or_dir")
    p.add_argument("dir", nargs="?")
    p.add_argument("-o", action="append", metavar="OPTS")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-n", action="store_true", help=argparse.SUPPRESS)  # mount(8): no mtab
    p.add_argument("-s", action="store_true", help=argparse.SUPPRESS)  # mount(8): sloppy
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    name, mountpoint = (None, a.spec_or_dir) if a.dir is None else (a.spec_or_dir, a.dir)
    ns = argparse.Namespace(
        name=name,
        mountpoint=mountpoint,
        o=a.o,
        foreground=a.foreground,
        verbose=a.verbose,
        passphrase_file=None,
        debug=a.debug,
        func=cmd_mount,
    )
    logging.basicConfig(level=logging.WARNING, format="cryptfs: %(message)s")
    try:
        return cmd_mount(ns)
    except CryptfsError as e:
        if a.debug:
            raise
        print(f"cryptfs: {e.line()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
