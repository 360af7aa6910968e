"""Command line: ``cryptfs`` (init, mount, umount, status, stats, verify, fsck, gc, log, list, info,
key, passwd, snapshot, history, restore, prove, verify-proof) and ``mount.cryptfs`` (the mount(8)
helper).

Every failure prints one line ``cryptfs: <what> (<hint>)`` on stderr and exits with the error's
code (see README: exit codes); tracebacks only with ``--debug``.

Longer than ~400 lines: one argparse tree and one short function per command, so that every
command's options and its error handling are read in one place.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from cryptfs.errors import ConfigError, CryptfsError, UsageError
from cryptfs.paths import VaultPaths, list_vaults
from cryptfs.vault.unlock import Credentials

DEFAULT_NAME = "default"

EPILOGS = {
    "init": "examples:\n"
    "  cryptfs init s3://my-bucket/vault --name work\n"
    "  cryptfs init                      (the embedded local store)\n"
    "  cryptfs init --show-master-key    (print the master key once, for a paper backup)",
    "mount": "examples:\n"
    "  cryptfs mount --name work ~/work -o allow_other\n"
    "  cryptfs mount ~/vault --extpass 'pass show cryptfs/default'\n"
    "  cryptfs mount ~/vault --key-file ~/.config/cryptfs/laptop.pem\n"
    "  cryptfs mount ~/vault --metrics        (Prometheus metrics on 127.0.0.1:9567)",
    "umount": "example: cryptfs umount ~/vault",
    "status": "examples:\n  cryptfs status\n  cryptfs status ~/vault --json",
    "stats": "examples:\n  cryptfs mount ~/vault -o metrics=127.0.0.1:9567\n"
    "  cryptfs stats ~/vault",
    "verify": "example: cryptfs verify --full",
    "log": "example: cryptfs log -n 20",
    "fsck": "example: cryptfs fsck --repair",
    "gc": "examples:\n  cryptfs gc --dry-run\n  cryptfs gc --grace 86400 --name work",
    "list": "example: cryptfs list",
    "info": "example: cryptfs info 's3://my-bucket/vault?endpoint=http://127.0.0.1:9000'",
    "key": "examples:\n"
    "  cryptfs key list\n"
    "  cryptfs key add --passphrase --new-passphrase-file ~/second.pass\n"
    "  cryptfs key generate ~/.config/cryptfs/laptop.pem\n"
    "  cryptfs key add --public-key ~/.config/cryptfs/laptop.pem.pub\n"
    "  cryptfs key remove 741a7aa3",
    "key list": "example: cryptfs key list --name work",
    "key add": "examples:\n"
    "  cryptfs key add --passphrase                       (asks for the new one twice)\n"
    "  cryptfs key add --passphrase --new-passphrase-file new.pass\n"
    "  cryptfs key add --public-key laptop.pem.pub --label laptop",
    "key remove": "example: cryptfs key remove 741a7aa3   (ids from 'cryptfs key list')",
    "key generate": "example: cryptfs key generate ~/.config/cryptfs/laptop.pem\n"
    "  (writes laptop.pem, 0600, and laptop.pem.pub; add the .pub with 'cryptfs key add "
    "--public-key')",
    "passwd": "examples:\n"
    "  cryptfs passwd                     (asks for the old and the new passphrase)\n"
    "  cryptfs passwd --passphrase-file old.pass --new-passphrase-file new.pass",
}


def get_passphrase(
    passphrase_file: str | None, confirm: bool = False, extpass: str | None = None
) -> bytes:
    """From --passphrase-file, then --extpass, then $CRYPTFS_PASSPHRASE, then the terminal."""
    from cryptfs.vault.unlock import get_passphrase as _get

    return _get(passphrase_file, extpass, confirm)


def _paths(args: argparse.Namespace) -> VaultPaths:
    return VaultPaths(getattr(args, "name", None) or DEFAULT_NAME)


# -- commands ------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from cryptfs.vault.core import create_vault, default_chunk_size

    paths = _paths(args)
    if not args.store_url:
        from cryptfs.paths import private_dir

        private_dir(paths.default_store.parent)  # the store itself is made 0700 by LocalStore
    urls = args.store_url or [f"file://{paths.default_store}"]
    chunk = args.chunk_size or max(default_chunk_size(u) for u in urls)
    if chunk < 4096 or chunk > (64 << 20) or chunk & (chunk - 1):
        raise UsageError("--chunk-size must be a power of two from 4096 to 64 MiB")
    from cryptfs.vault.storelist import check_policy

    check_policy(len(urls), args.copies, args.quorum)
    passphrase = get_passphrase(args.passphrase_file, confirm=True, extpass=args.extpass)
    from cryptfs.vault.localstate import META_SCHEME

    if args.meta and not args.meta.startswith(META_SCHEME):
        raise UsageError(f"--meta must be a {META_SCHEME} URL")
    cfg, created = create_vault(paths, urls, passphrase, chunk, os.getuid(), os.getgid(),
                                copies=args.copies, quorum=args.quorum, meta_url=args.meta)
    verb = "created" if created else "attached existing"
    print(f"cryptfs: {verb} vault '{paths.name}' in {' + '.join(urls)}")
    if args.show_master_key:
        from cryptfs.vault.unlock import format_master_key

        print(f"master key: {format_master_key(cfg.unlock(passphrase))}")
        print(
            "cryptfs: keep this key offline (paper); with it and the store anyone can read the "
            "vault; open with --master-key-file FILE if all key slots are lost",
            file=sys.stderr,
        )
    return 0


def _unlock(
    paths: VaultPaths, passphrase_file: str | None = None, creds: Credentials | None = None
) -> bytes:
    from cryptfs.vault.localstate import load_local_config

    _stores, cfg = load_local_config(paths)
    creds = creds or Credentials(passphrase_file=passphrase_file)
    return creds.unlock(cfg)[0]


def cmd_mount(args: argparse.Namespace) -> int:
    from cryptfs.cli.mount import MountOptions, check_metrics_address, check_mountpoint, mount_vault

    opts = MountOptions.parse(args.o or [])
    if getattr(args, "at", None) is not None:  # not offered by mount.cryptfs
        opts.at, opts.readonly = args.at, True
    if args.metrics is not None:
        opts.metrics = check_metrics_address(args.metrics)
    paths = VaultPaths(args.name or opts.name or DEFAULT_NAME)
    check_mountpoint(args.mountpoint, opts.nonempty)
    master = _unlock(paths, creds=Credentials.from_args(args, opts))
    return mount_vault(paths, master, args.mountpoint, opts, args.foreground, args.verbose)


def cmd_umount(args: argparse.Namespace) -> int:
    from cryptfs.cli.mount import unmount

    unmount(args.mountpoint, args.name, sys.stderr.isatty())
    return 0


def _open_for_check(args: argparse.Namespace, readonly: bool,  # type: ignore[no-untyped-def]
                    alone: bool = False):
    from cryptfs.vault.core import Vault

    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    return Vault.open(paths, master=master, readonly=readonly, check=False, alone=alone)


def cmd_verify(args: argparse.Namespace) -> int:
    from cryptfs.admin.verify import accept, verify

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
    from cryptfs.admin.fsck import fsck
    vault = _open_for_check(args, readonly=not args.repair, alone=args.repair)
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
    from cryptfs.vault.localstate import load_local_config

    for name in list_vaults():
        try:
            url = load_local_config(VaultPaths(name))[0].display
        except CryptfsError as e:
            url = f"<{e}>"
        print(f"{name}\t{url}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cryptfs.admin.status import collect, format_status

    docs = collect(args.mountpoint)
    if args.json:
        print(json.dumps({"mounts": docs}, indent=1))
    elif not docs:
        print("cryptfs: no vault is mounted")
    else:
        print("\n".join(format_status(d) for d in docs))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from cryptfs.admin.stats import watch

    if not 0.1 <= args.interval <= 3600 or args.count < 0:
        raise UsageError("--interval must be 0.1 to 3600 seconds and --count not negative")
    return watch(args.mountpoint, args.interval, args.count)


def cmd_gc(args: argparse.Namespace) -> int:
    from cryptfs.admin.gc import run_gc
    from cryptfs.vault.core import Vault

    if args.grace < 0:
        raise UsageError("--grace must not be negative")
    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    vault = Vault.open(paths, master=master, readonly=args.dry_run, check=True)
    deleted = False
    try:
        rep = run_gc(vault, args.grace, args.dry_run, print)
        deleted = bool(rep.deleted) or rep.repacked > 0
    finally:
        vault.close(checkpoint=deleted)  # a checkpoint anchors the del entries in the store
    return 5 if rep.failed else 0


def _on_vault(args: argparse.Namespace, req: dict[str, object], readonly: bool = False) -> object:
    """Run a control request on the vault: through its mount's control socket when it is
    mounted read-write, else on the vault opened here (and closed with a checkpoint). The
    vault modules (SQLAlchemy among them: about a second of imports) load only in the second
    case, so asking a mount costs a fraction of that."""
    from cryptfs.admin.control import ask, dispatch

    paths = _paths(args)
    res = ask(paths.data_dir, req)
    if res is not None:
        return res
    from cryptfs.vault.core import Vault

    master = _unlock(paths, creds=Credentials.from_args(args))
    vault = Vault.open(paths, master=master, readonly=readonly, check=True)
    try:
        return dispatch(vault, req)
    finally:
        vault.close(checkpoint=not readonly)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    s = _on_vault(args, {"op": "snapshot-create", "name": args.snapshot_name})
    assert isinstance(s, dict)
    print(f"snapshot '{s['name']}' ({s['id'][:8]}) pins {s['checkpoint']}, ledger seq "
          f"{s['seq']}")
    return 0


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    s = _on_vault(args, {"op": "snapshot-delete", "snapshot": args.snapshot})
    assert isinstance(s, dict)
    print(f"snapshot '{s['name']}' deleted; what only it held is collected")
    return 0


def cmd_snapshot_policy(args: argparse.Namespace) -> int:
    from cryptfs.vault.snapshots import RULES

    wanted = {r: getattr(args, f"keep_{r}") for r in RULES}
    req: dict[str, object] = {"op": "snapshot-policy"}
    if args.off:
        req["set"] = {}
    elif any(v is not None for v in wanted.values()):
        req["set"] = {r: v for r, v in wanted.items() if v is not None}
    policy = _on_vault(args, req, readonly="set" not in req)
    assert isinstance(policy, dict)
    if args.json:
        print(json.dumps(policy))
    elif policy:
        print("automatic snapshots at checkpoints, keeping the newest of the last " +
              ", ".join(f"{n} {'days' if r == 'daily' else r[:-2] + 's'}"
                        for r, n in policy.items()))
    else:
        print("no retention policy: snapshots only by hand")
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    rows = _on_vault(args, {"op": "snapshot-list"}, readonly=True)
    assert isinstance(rows, list)
    if args.json:
        print(json.dumps({"snapshots": rows}, indent=1))
        return 0
    if not rows:
        print("cryptfs: no snapshots")
        return 0
    print(f"{'ID':<8}  {'NAME':<24} {'TIME':<20} {'SEQ':>8}  {'HOLDS':>10}  {'ONLY IT':>10}")
    for r in rows:
        print(f"{r['id'][:8]}  {r['name']:<24} {r['time']:<20} {r['seq']:>8}  "
              f"{_mb(r['bytes']):>10}  {_mb(r['only_bytes']):>10}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from cryptfs.admin.history import history

    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    rows = history(paths, master, args.path)
    if args.json:
        print(json.dumps({"path": args.path, "versions": [r.__dict__ for r in rows]}, indent=1))
        return 0
    last = None
    for r in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.time_ns / 1e9))
        what = r.kind if r.kind != "file" else \
            f"{r.size} bytes, mode {r.mode:o}, version {r.version}"
        same = " (unchanged)" if last is not None and (r.kind, r.version) == last else ""
        print(f"{when}  {r.label:<24} seq {r.seq:<8} {what}{same}")
        last = (r.kind, r.version)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from cryptfs.admin.history import restore

    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    where, n, snap = restore(paths, master, args.path, args.at, args.to)
    print(f"restored {where} ({n} bytes) as snapshot '{snap.name}' held it")
    return 0


def cmd_prove(args: argparse.Namespace) -> int:
    from cryptfs.admin.history import prove, public_key
    from cryptfs.vault.localstate import load_local_config

    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    if args.public_key:
        print(public_key(master, load_local_config(paths)[1].vault_id))
        return 0
    if not args.path or not args.at:
        raise UsageError("give PATH and --at SNAPSHOT|TIME (or --public-key)")
    print(json.dumps(prove(paths, master, args.path, args.at), indent=1, sort_keys=True))
    return 0


def cmd_verify_proof(args: argparse.Namespace) -> int:
    from cryptfs.admin.history import parse_proof, verify_proof

    if args.proof == "-":
        text = sys.stdin.buffer.read(1 << 17)
    else:
        try:
            with open(args.proof, "rb") as f:
                text = f.read(1 << 17)
        except OSError as e:
            raise UsageError(f"cannot read {args.proof}: {e.strerror}") from None
    doc = parse_proof(text)
    if args.public_key:
        print(verify_proof(None, None, doc, args.public_key))
        return 0
    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    print(verify_proof(paths, master, doc))
    return 0


def _store_config(url: str):  # type: ignore[no-untyped-def]
    from cryptfs.format.vaultconfig import VaultConfig
    from cryptfs.stores import open_store

    store = open_store(url)
    try:
        return store.url, VaultConfig.from_store(store)
    finally:
        store.close()


def cmd_info(args: argparse.Namespace) -> int:
    url, cfg = _store_config(args.store_url)
    local = [n for n in list_vaults() if _configured_url(n) is not None
             and _same_store(_configured_url(n) or "", url)]
    doc = {
        "store": url,
        "format": "cryptfs",
        "version": 1,
        "vault_id": cfg.vault_id.hex(),
        "chunk_size": cfg.chunk_size,
        "created": cfg.created,
        "slots": cfg.describe_slots(),
        "configured_as": local,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"store:       {url}")
    print("format:      cryptfs version 1")
    print(f"vault id:    {doc['vault_id']}")
    print(f"chunk size:  {cfg.chunk_size} bytes")
    print(f"created:     {cfg.created or '?'}")
    print(f"on this machine: {', '.join(local) if local else 'not configured'}")
    print(f"key slots:   {len(cfg.slots)}")
    for d in doc["slots"]:
        label = f" [{d['label']}]" if d.get("label") else ""
        print(f"  {d['id']}  {d['type']:<10}  {d['detail']}{label}")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from cryptfs.admin.storeops import repair

    vault = _open_for_check(args, readonly=False)
    try:
        ok = repair(vault, full=not args.quick, say=print)
    finally:
        vault.close()
    return 0 if ok else 5


def cmd_store_list(args: argparse.Namespace) -> int:
    from cryptfs.vault.localstate import load_local_config

    stores, _cfg = load_local_config(_paths(args))
    rows = [{"id": e.id, "url": e.url} for e in stores.entries]
    if args.json:
        print(json.dumps({"stores": rows, "copies": stores.copies or len(rows),
                          "quorum": stores.quorum or None}, indent=1))
    else:
        for r in rows:
            print(f"{r['id'] or '-'}\t{r['url']}")
    return 0


def cmd_store_add(args: argparse.Namespace) -> int:
    from cryptfs.admin.storeops import add_store

    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    add_store(paths, master, args.store_url, print)
    return 0


def cmd_store_remove(args: argparse.Namespace) -> int:
    from cryptfs.admin.storeops import remove_store

    paths = _paths(args)
    master = _unlock(paths, creds=Credentials.from_args(args))
    remove_store(paths, master, args.store, print)
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    from cryptfs.vault.localstate import load_local_config

    _url, cfg = load_local_config(_paths(args))
    slots = cfg.describe_slots()
    if args.json:
        print(json.dumps({"slots": slots}, indent=1))
        return 0
    for d in slots:
        label = f" [{d['label']}]" if d.get("label") else ""
        print(f"{d['id']}  {d['type']:<10}  {d['detail']}{label}")
    return 0


def cmd_key_add(args: argparse.Namespace) -> int:
    from cryptfs.admin.keyslots import modify_config, read_public_key
    from cryptfs.format.vaultconfig import check_label
    from cryptfs.vault.unlock import get_new_passphrase

    if bool(args.passphrase) == bool(args.public_key):
        raise UsageError("give exactly one of --passphrase and --public-key FILE")
    if args.label and (problem := check_label(args.label)):
        raise UsageError(f"invalid --label: {problem}")
    creds = Credentials.from_args(args)
    paths = _paths(args)
    if args.public_key:
        pub = read_public_key(args.public_key)

        def change(cfg, master, _opened):  # type: ignore[no-untyped-def]
            sid = cfg.add_public_key_slot(master, pub, label=args.label or "")
            return f"cryptfs: added public-key slot {sid} to vault '{paths.name}'"
    else:
        # unlock first (asks for the current passphrase before the new one)
        from cryptfs.vault.localstate import load_local_config

        master, slot_id = creds.unlock(load_local_config(paths)[1])
        creds = _Cached(creds, master, slot_id)
        new = get_new_passphrase(args.new_passphrase_file, args.new_extpass)

        def change(cfg, master, _opened):  # type: ignore[no-untyped-def]
            sid = cfg.add_passphrase_slot(master, new, label=args.label or "")
            return f"cryptfs: added passphrase slot {sid} to vault '{paths.name}'"

    print(modify_config(paths, creds, change))
    return 0


def cmd_key_remove(args: argparse.Namespace) -> int:
    from cryptfs.admin.keyslots import modify_config

    paths = _paths(args)

    def change(cfg, _master, opened):  # type: ignore[no-untyped-def]
        cfg.remove_slot(args.slot_id)
        note = " (the slot you opened it with)" if opened == args.slot_id else ""
        return f"cryptfs: removed key slot {args.slot_id}{note} from vault '{paths.name}'"

    print(modify_config(paths, Credentials.from_args(args), change))
    print("cryptfs: copies of the old config, or of the master key, still open the vault; "
          "see README 'Security model'", file=sys.stderr)
    return 0


def cmd_key_generate(args: argparse.Namespace) -> int:
    from cryptfs.admin.keyslots import generate_key_pair

    if args.bits < 3072:
        raise UsageError("--bits must be at least 3072")
    priv, pub = generate_key_pair(args.file, args.bits)
    print(f"cryptfs: wrote private key {priv} (keep it secret) and public key {pub}")
    print(f"cryptfs: add it to a vault with: cryptfs key add --public-key {pub}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from cryptfs.admin.keyslots import modify_config
    from cryptfs.vault.localstate import load_local_config
    from cryptfs.vault.unlock import get_new_passphrase

    creds = Credentials.from_args(args)
    if creds.key_file or creds.master_key_file:
        raise UsageError(
            "passwd replaces the passphrase that opens the vault; give the current passphrase, "
            "not a key file",
            hint="to add a passphrase with a key file use 'cryptfs key add --passphrase'",
        )
    paths = _paths(args)
    # ask for the current passphrase before the new one; remember which slot it opens
    master, slot_id = creds.unlock(load_local_config(paths)[1])
    new = get_new_passphrase(args.new_passphrase_file, args.new_extpass)

    def change(cfg, master, _opened):  # type: ignore[no-untyped-def]
        cfg.replace_passphrase(master, slot_id, new)
        return f"cryptfs: changed the passphrase of key slot {slot_id} of vault '{paths.name}'"

    print(modify_config(paths, _Cached(creds, master, slot_id), change))
    return 0


class _Cached(Credentials):
    """Credentials already checked: do not ask twice."""

    def __init__(self, orig: Credentials, master: bytes, slot_id: str | None) -> None:
        super().__init__(orig.passphrase_file, orig.extpass, orig.key_file, orig.master_key_file)
        self._master = master
        self._slot = slot_id

    def unlock(self, cfg):  # type: ignore[no-untyped-def, override]
        cfg.check_master(self._master)
        return self._master, self._slot


# -- parsing -------------------------------------------------------------------------------------
def _int_arg(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``lo`` to ``hi`` (absurd values are usage errors, not
    an overflow deep inside)."""
    def integer(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text[:30]!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text[:30]} is not from {lo} to {hi}")
        return v
    return integer


def _seconds_arg(hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from 0 to ``hi`` (not nan or inf)."""
    def seconds(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text[:30]!r}") from None
        if not 0 <= v <= hi:  # false for nan
            raise argparse.ArgumentTypeError(f"{text[:30]} is not from 0 to {hi:.0f} seconds")
        return v
    return seconds


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line with a hint, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"cryptfs: {message} (see '{self.prog} --help')\n")


def _add_credentials(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("opening the vault (first that is given wins)")
    g.add_argument("--master-key-file", metavar="FILE",
                   help="the master key in FILE (as 'init --show-master-key' printed it)")
    g.add_argument("--key-file", metavar="FILE",
                   help="an RSA private key whose public key is in a key slot")
    g.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the passphrase from FILE",
    )
    g.add_argument("--extpass", metavar="CMD",
                   help="run CMD (no shell) and use the first line it prints as the passphrase; "
                   "then $CRYPTFS_PASSPHRASE, then a prompt")


def _add_new_passphrase(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("the new passphrase (else $CRYPTFS_NEW_PASSPHRASE, else a prompt)")
    g.add_argument("--new-passphrase-file", metavar="FILE", help="read it from FILE")
    g.add_argument("--new-extpass", metavar="CMD", help="the first line CMD prints")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cryptfs",
        description="Encrypted, tamper-evident cloud filesystem.",
        epilog="run 'cryptfs COMMAND --help' for details",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, subs: argparse._SubParsersAction | None = None,
            key: str | None = None) -> argparse.ArgumentParser:
        sp = (subs or sub).add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOGS.get(key or name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return sp

    def common(sp: argparse.ArgumentParser, passphrase: bool = True) -> None:
        sp.add_argument("--name", help=f"vault name (default: {DEFAULT_NAME})")
        if passphrase:
            _add_credentials(sp)

    sp = add("init", "create a vault (or attach one that exists in the store)")
    sp.add_argument(
        "store_url",
        nargs="*",
        help="file:///path or s3://bucket[/prefix][?endpoint=URL][&profile=NAME]; several "
        "stores keep copies of everything; default: the embedded local store",
    )
    sp.add_argument("--copies", type=_int_arg(0, 64), default=0, metavar="N",
                    help="copies of each object (default: one on every store)")
    sp.add_argument("--quorum", type=_int_arg(0, 64), default=0, metavar="N",
                    help="copies that must be stored before a write counts (default: half "
                    "the copies, rounded up)")
    sp.add_argument("--chunk-size", type=_int_arg(4096, 64 << 20), metavar="BYTES",
                    help="chunk size (power of two)")
    sp.add_argument("--show-master-key", action="store_true",
                    help="print the master key (hex) for an offline backup")
    sp.add_argument("--meta", metavar="URL",
                    help="keep the metadata in this PostgreSQL database "
                    "(postgresql+psycopg://USER@HOST/DB; password from the URL, PG* variables "
                    "or ~/.pgpass), every row sealed, instead of a local SQLite file")
    sp.add_argument("--name", help=f"vault name (default: {DEFAULT_NAME})")
    sp.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    sp.add_argument("--extpass", metavar="CMD", help="the first line CMD prints (no shell)")
    sp.set_defaults(func=cmd_init)

    sp = add("mount", "mount a vault; returns when the mount is ready")
    sp.add_argument("mountpoint")
    sp.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    sp.add_argument(
        "-o",
        action="append",
        metavar="OPTS",
        help="allow_other, ro, nonempty, cache_size=SIZE, passfile=FILE, keyfile=FILE, "
        "extpass=CMD, metrics[=ADDR]; fstab options (defaults, nofail, noauto, _netdev, x-*) "
        "are ignored",
    )
    sp.add_argument("--metrics", nargs="?", const="", metavar="ADDR",
                    help="serve Prometheus metrics and the status over HTTP at ADDR (default "
                    "127.0.0.1:9567; a non-loopback address only when given explicitly)")
    sp.add_argument("-v", "--verbose", action="store_true")
    common(sp)
    sp.set_defaults(func=cmd_mount)

    sp.add_argument("--at", metavar="SNAPSHOT|TIME",
                    help="mount a snapshot (name, id, or the newest at or before a UTC time "
                    "YYYY-MM-DD[THH:MM[:SS]]) read-only, beside the live mount")
    sp = add("umount", "unmount after everything is stored")
    sp.add_argument("mountpoint")
    sp.add_argument("--name", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_umount)

    sp = add("status", "show mounted vaults: store, pending uploads, cache, ledger, errors")
    sp.add_argument("mountpoint", nargs="?", help="only this mount")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_status)

    sp = add("stats", "watch a mount's metrics live: operations, throughput, uploads, cache")
    sp.add_argument("mountpoint", nargs="?", help="the mount (default: the only one with "
                    "metrics)")
    sp.add_argument("-i", "--interval", type=float, default=1.0, metavar="SECONDS",
                    help="seconds between lines (default 1)")
    sp.add_argument("-n", "--count", type=int, default=0, metavar="N",
                    help="stop after N lines (default: until Ctrl-C)")
    sp.set_defaults(func=cmd_stats)

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

    sp = add("gc", "delete store objects that nothing references (vault must be unmounted)")
    sp.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    sp.add_argument("--grace", type=_seconds_arg(10 * 365 * 86400), default=3600.0,
                    metavar="SECONDS",
                    help="keep objects younger than this (default 3600: uploads of another "
                    "process are invisible until committed)")
    common(sp)
    sp.set_defaults(func=cmd_gc)

    sp = add("log", "show the newest ledger entries")
    sp.add_argument("-n", type=_int_arg(1, 1 << 31), default=20, help="how many (default 20)")
    common(sp)
    sp.set_defaults(func=cmd_log)

    sp = add("list", "list the vaults configured on this machine")
    sp.set_defaults(func=cmd_list)

    sp = add("info", "describe the vault in a store (no passphrase needed)")
    sp.add_argument("store_url", help="file:///path or s3://bucket[/prefix][?endpoint=URL]")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_info)

    sp = add("repair", "bring every store of a vault level: re-copy missing or corrupt copies, "
             "remove stray ones (vault must be unmounted)")
    sp.add_argument("--quick", action="store_true",
                    help="compare listings only; do not download every copy")
    common(sp)
    sp.set_defaults(func=cmd_repair)

    np = add("snapshot", "create, list or delete snapshots (pinned past states)")
    nsub = np.add_subparsers(dest="snapshot_command", metavar="SNAPSHOTCOMMAND")
    np.set_defaults(func=lambda _a: _usage(np))
    sp = add("create", "write a checkpoint and pin it (works while mounted)", nsub,
             "snapshot create")
    sp.add_argument("--name", dest="snapshot_name", metavar="N",
                    help="the snapshot's name (default: the UTC time)")
    sp.add_argument("--vault", dest="name", help=f"vault name (default: {DEFAULT_NAME})")
    _add_credentials(sp)
    sp.set_defaults(func=cmd_snapshot_create)
    sp = add("list", "list snapshots with what each holds and what it alone holds", nsub,
             "snapshot list")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    common(sp)
    sp.set_defaults(func=cmd_snapshot_list)
    sp = add("policy", "show or set the retention policy: automatic snapshots at checkpoints",
             nsub, "snapshot policy")
    for rule in ("hourly", "daily", "weekly", "monthly"):
        sp.add_argument(f"--keep-{rule}", type=_int_arg(0, 10000), metavar="N",
                        help=f"keep the newest automatic snapshot of each of the last N "
                        f"{'days' if rule == 'daily' else rule[:-2] + 's'} that have one")
    sp.add_argument("--off", action="store_true", help="no automatic snapshots")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    common(sp)
    sp.set_defaults(func=cmd_snapshot_policy)
    sp = add("delete", "delete a snapshot; what only it held is collected", nsub,
             "snapshot delete")
    sp.add_argument("snapshot", help="name or id from 'cryptfs snapshot list'")
    common(sp)
    sp.set_defaults(func=cmd_snapshot_delete)

    sp = add("history", "every version of a file in the snapshots and now (deleted files too)")
    sp.add_argument("path", help="the file's path in the vault, e.g. /docs/report.txt")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    common(sp)
    sp.set_defaults(func=cmd_history)

    sp = add("restore", "copy a file as a snapshot held it back into the vault")
    sp.add_argument("path", help="the file's path in the vault (it may be deleted now)")
    sp.add_argument("--at", required=True, metavar="SNAPSHOT|TIME")
    sp.add_argument("--to", metavar="NEWPATH",
                    help="write it here (must not exist) instead of over PATH")
    common(sp)
    sp.set_defaults(func=cmd_restore)

    sp = add("prove", "print a signed statement of a file's content at a snapshot")
    sp.add_argument("path", nargs="?", help="the file's path in the vault")
    sp.add_argument("--at", metavar="SNAPSHOT|TIME")
    sp.add_argument("--public-key", action="store_true",
                    help="print the vault's public proof key instead")
    common(sp)
    sp.set_defaults(func=cmd_prove)

    sp = add("verify-proof", "check a proof: its signature and that the vault's ledger still "
             "holds its head")
    sp.add_argument("proof", help="the proof file ('-' for stdin)")
    sp.add_argument("--public-key", metavar="HEX",
                    help="check the signature only, against this key, without the vault")
    common(sp)
    sp.set_defaults(func=cmd_verify_proof)

    tp = add("store", "list, add or remove the stores of a vault")
    tsub = tp.add_subparsers(dest="store_command", metavar="STORECOMMAND")
    tp.set_defaults(func=lambda _a: _usage(tp))
    sp = add("list", "list the stores (no passphrase needed)", tsub, "store list")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    common(sp, passphrase=False)
    sp.set_defaults(func=cmd_store_list)
    sp = add("add", "add a store and copy the vault to it (vault must be unmounted)", tsub,
             "store add")
    sp.add_argument("store_url")
    common(sp)
    sp.set_defaults(func=cmd_store_add)
    sp = add("remove", "stop using a store (its objects are left in place)", tsub,
             "store remove")
    sp.add_argument("store", help="store id or URL from 'cryptfs store list'")
    common(sp)
    sp.set_defaults(func=cmd_store_remove)

    kp = add("key", "manage the key slots that wrap the master key")
    ksub = kp.add_subparsers(dest="key_command", metavar="KEYCOMMAND")
    kp.set_defaults(func=lambda _a: _usage(kp))

    sp = add("list", "list the key slots (no passphrase needed)", ksub, "key list")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    common(sp, passphrase=False)
    sp.set_defaults(func=cmd_key_list)

    sp = add("add", "add a key slot: another passphrase, or an RSA public key", ksub, "key add")
    what = sp.add_mutually_exclusive_group()
    what.add_argument("--passphrase", action="store_true", help="add a passphrase slot")
    what.add_argument("--public-key", metavar="FILE",
                      help="add a slot for this RSA public key (PEM or ssh-rsa, >= 3072 bits)")
    sp.add_argument("--label", help="a note shown by 'key list' (stored in the clear)")
    common(sp)
    _add_new_passphrase(sp)
    sp.set_defaults(func=cmd_key_add)

    sp = add("remove", "remove a key slot (not the last one)", ksub, "key remove")
    sp.add_argument("slot_id", help="from 'cryptfs key list'")
    common(sp)
    sp.set_defaults(func=cmd_key_remove)

    sp = add("generate", "write a new RSA key pair: FILE (private, 0600) and FILE.pub", ksub,
             "key generate")
    sp.add_argument("file")
    sp.add_argument("--bits", type=_int_arg(3072, 16384), default=3072,
                    help="key size (default 3072, at most 16384)")
    sp.set_defaults(func=cmd_key_generate)

    sp = add("passwd", "change the passphrase of the key slot it opens")
    common(sp)
    _add_new_passphrase(sp)
    sp.set_defaults(func=cmd_passwd)
    return p


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def run(argv: list[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return _one_line_errors(lambda: args.func(args), args.debug)


def _one_line_errors(call: Callable[[], int | None], debug: bool) -> int:
    """Run a command; a CryptfsError becomes one line on stderr and its exit code."""
    logging.basicConfig(level=logging.WARNING, format="cryptfs: %(message)s")
    logging.getLogger("botocore").setLevel(logging.ERROR)
    try:
        return int(call() or 0)
    except CryptfsError as e:
        if debug:
            raise
        print(f"cryptfs: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cryptfs: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, build_parser())


def _configured_url(name: str) -> str | None:
    from cryptfs.vault.localstate import load_local_config

    try:
        return load_local_config(VaultPaths(name))[0].entries[0].url
    except CryptfsError:
        return None


def _store_key(url: str) -> tuple[str, str, str | None] | None:
    """(scheme, location, endpoint) of a store URL, normalised for comparison."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme == "file":
        try:
            return ("file", os.path.realpath(unquote(parts.path)), None)
        except ValueError:  # a NUL byte
            return None
    if scheme == "s3":
        prefix = unquote(parts.path).strip("/")
        endpoint = parse_qs(parts.query).get("endpoint", [None])[0]
        return ("s3", f"{parts.netloc}/{prefix}", (endpoint or "").rstrip("/") or None)
    return (scheme, url, None)


def _same_store(a: str, b: str) -> bool:
    ka, kb = _store_key(a), _store_key(b)
    if ka is None or kb is None or ka[:2] != kb[:2]:
        return False
    return ka[2] == kb[2] or ka[2] is None or kb[2] is None  # an URL without endpoint matches


def resolve_spec(spec: str) -> str:
    """The vault name for a mount source: a vault name, ``cryptfs:NAME`` or a store URL."""
    if "://" not in spec:
        return spec.removeprefix("cryptfs:")
    found = [n for n in list_vaults() if (u := _configured_url(n)) and _same_store(u, spec)]
    if not found:
        raise ConfigError(
            f"no vault on this machine uses the store {spec}",
            hint=f"attach it first: cryptfs init '{spec}' --name NAME",
        )
    if len(found) > 1:
        raise UsageError(
            f"several vaults use the store {spec}: {', '.join(found)}",
            hint="give the vault name instead of the URL",
        )
    return found[0]


def mount_main(argv: list[str] | None = None) -> int:
    """``mount.cryptfs [SPEC] DIR [-sfnv] [-o OPTS]``: the mount(8) helper convention.

    SPEC is a vault name, ``cryptfs:NAME`` or a store URL (the vault configured with that store);
    without SPEC the default vault. As for every mount helper, ``-f`` means "fake" (do
    everything but mount); ``--foreground`` keeps the daemon in the foreground."""
    argv = sys.argv[1:] if argv is None else argv
    p = _Parser(
        prog="mount.cryptfs",
        description="mount a cryptfs vault (the mount(8) helper for type cryptfs)",
        epilog="examples:\n"
        "  mount.cryptfs ~/vault                       (the default vault)\n"
        "  mount.cryptfs work /mnt/work -o allow_other,passfile=/etc/cryptfs/work.pass\n"
        "  mount -t cryptfs work /mnt/work -o keyfile=/etc/cryptfs/work.pem\n"
        "  fstab: work /mnt/work cryptfs passfile=/etc/cryptfs/work.pass,nofail,_netdev 0 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec_or_dir", metavar="SPEC", help="vault name or store URL (optional)")
    p.add_argument("dir", nargs="?", metavar="DIR")
    p.add_argument("-o", action="append", metavar="OPTS", help="as for 'cryptfs mount -o'")
    p.add_argument("--foreground", action="store_true", help="serve in the foreground")
    p.add_argument("-f", dest="fake", action="store_true",
                   help="fake: check everything, do not mount (mount(8) -f)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-n", action="store_true", help=argparse.SUPPRESS)  # mount(8): no mtab
    p.add_argument("-s", action="store_true", help=argparse.SUPPRESS)  # mount(8): sloppy
    p.add_argument("-N", metavar="NS", help=argparse.SUPPRESS)  # mount(8): namespace
    p.add_argument("-t", metavar="TYPE", help=argparse.SUPPRESS)  # mount(8): type.subtype
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _add_credentials(p)
    a = p.parse_args(argv)

    def mount() -> int:
        if a.N:
            raise UsageError("mount.cryptfs does not support mounting in another namespace (-N)")
        name, mountpoint = (None, a.spec_or_dir) if a.dir is None else (
            resolve_spec(a.spec_or_dir), a.dir)
        ns = argparse.Namespace(
            name=name,
            mountpoint=mountpoint,
            o=a.o,
            foreground=a.foreground,
            verbose=a.verbose,
            metrics=None,  # as -o metrics[=ADDR] (an fstab line has no --metrics)
            passphrase_file=a.passphrase_file,
            extpass=a.extpass,
            key_file=a.key_file,
            master_key_file=a.master_key_file,
            debug=a.debug,
            func=cmd_mount,
        )
        if a.fake:
            from cryptfs.cli.mount import MountOptions, check_mountpoint

            opts = MountOptions.parse(a.o or [])
            VaultPaths(name or opts.name or DEFAULT_NAME)
            check_mountpoint(mountpoint, opts.nonempty)
            return 0
        return cmd_mount(ns)

    return _one_line_errors(mount, a.debug)


if __name__ == "__main__":
    sys.exit(main())
