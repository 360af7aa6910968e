"""Where the key that opens a vault comes from.

A vault is opened with one of (first match wins):

1. ``--master-key-file FILE``: the master key itself (hex, as ``cryptfs init --show-master-key``
   printed it), for a vault whose key slots are lost; checked against the config MAC;
2. ``--key-file FILE`` (``-o keyfile=FILE``): an RSA private key (PEM or OpenSSH, unencrypted)
   whose public key was added with ``cryptfs key add --public-key``;
3. a passphrase, from ``--passphrase-file FILE`` (``-o passfile=FILE``), else ``--extpass CMD``
   (``-o extpass=CMD``: a program, run without a shell, whose first line of output is the
   passphrase), else ``$CRYPTFS_PASSPHRASE``, else a prompt on the terminal.

New passphrases (``cryptfs key add --passphrase``, ``cryptfs passwd``) come from
``--new-passphrase-file``, ``--new-extpass``, ``$CRYPTFS_NEW_PASSPHRASE`` or the terminal (asked
twice).
"""

from __future__ import annotations

import getpass
import os
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass

from cryptfs.errors import AuthError, UsageError
from cryptfs.format import crypto
from cryptfs.format.vaultconfig import RSA_MAX_BITS, VaultConfig

ENV_PASSPHRASE = "CRYPTFS_PASSPHRASE"
ENV_NEW_PASSPHRASE = "CRYPTFS_NEW_PASSPHRASE"
SOURCES_HINT = "use --passphrase-file, --extpass, --key-file, set CRYPTFS_PASSPHRASE, or run on a "
SOURCES_HINT += "terminal"


MAX_SECRET_FILE = 1 << 20  # passphrase, key and master key files: /dev/zero is a typo


def read_small_file(path: str, what: str) -> bytes:
    """The bytes of a file the user named (at most 1 MiB), or a one-line UsageError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > MAX_SECRET_FILE:
        raise UsageError(f"{what} {path} is larger than 1 MiB")
    return data


def read_passphrase_file(path: str) -> bytes:
    return read_small_file(path, "passphrase file").rstrip(b"\r\n")


def run_extpass(cmd: str) -> bytes:
    """Run ``cmd`` (split like a shell would, but without a shell); the first line of its
    standard output is the passphrase. Its stdin and stderr are the terminal's, so it can ask."""
    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        raise UsageError(f"cannot parse --extpass command: {e}") from None
    if not argv:
        raise UsageError("--extpass needs a command")
    try:
        res = subprocess.run(argv, stdout=subprocess.PIPE, check=False)
    except FileNotFoundError:
        raise UsageError(
            f"--extpass program {argv[0]!r} not found", hint="give a full path or fix $PATH"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot run --extpass program {argv[0]!r}: {e.strerror}") from None
    if res.returncode != 0:
        how = f"exited with status {res.returncode}" if res.returncode > 0 else (
            f"was killed by signal {-res.returncode}")
        raise UsageError(
            f"--extpass program {argv[0]!r} {how}", hint="it must print the passphrase and exit 0"
        )
    line = res.stdout.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise UsageError(
            f"--extpass program {argv[0]!r} printed no passphrase",
            hint="the first line of its output is used",
        )
    return line


def _prompt(label: str, confirm: bool) -> bytes:
    if not sys.stdin.isatty():
        raise UsageError(f"no {label.lower()} given", hint=SOURCES_HINT)
    p1 = getpass.getpass(f"{label}: ").encode()
    if confirm:
        p2 = getpass.getpass(f"Repeat {label.lower()}: ").encode()
        if p1 != p2:
            raise UsageError("the passphrases do not match")
    return p1


def get_passphrase(
    passphrase_file: str | None = None, extpass: str | None = None, confirm: bool = False
) -> bytes:
    """From --passphrase-file, then --extpass, then $CRYPTFS_PASSPHRASE, then the terminal."""
    if passphrase_file:
        return read_passphrase_file(passphrase_file)
    if extpass:
        return run_extpass(extpass)
    env = os.environ.get(ENV_PASSPHRASE)
    if env is not None:
        return os.fsencode(env)  # the bytes as given, also when they are not UTF-8
    return _prompt("Passphrase", confirm)


def get_new_passphrase(passphrase_file: str | None = None, extpass: str | None = None) -> bytes:
    """A new passphrase: --new-passphrase-file, --new-extpass, $CRYPTFS_NEW_PASSPHRASE, or the
    terminal (asked twice)."""
    if passphrase_file:
        p = read_passphrase_file(passphrase_file)
    elif extpass:
        p = run_extpass(extpass)
    elif os.environ.get(ENV_NEW_PASSPHRASE) is not None:
        p = os.fsencode(os.environ[ENV_NEW_PASSPHRASE])
    else:
        if not sys.stdin.isatty():
            raise UsageError(
                "no new passphrase given",
                hint="use --new-passphrase-file, --new-extpass, set CRYPTFS_NEW_PASSPHRASE, or "
                "run on a terminal",
            )
        p = _prompt("New passphrase", True)
    if not p:
        raise UsageError("the new passphrase must not be empty")
    return p


def read_private_key(path: str):  # type: ignore[no-untyped-def]
    """An RSA private key from a PEM (PKCS#1 or PKCS#8) or OpenSSH file without a passphrase."""
    from Crypto.PublicKey import RSA

    data = read_small_file(path, "key file")
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        key = RSA.import_key(data)
    except (ValueError, IndexError, TypeError):
        raise AuthError(
            f"{path} is not an RSA private key cryptfs can read",
            hint="use a file written by 'cryptfs key generate' (PEM, no passphrase)",
        ) from None
    if not key.has_private():
        raise UsageError(
            f"{path} holds a public key", hint="--key-file needs the private key (not FILE.pub)"
        )
    if key.size_in_bits() > RSA_MAX_BITS:
        raise UsageError(f"{path} holds a {key.size_in_bits()}-bit key; at most {RSA_MAX_BITS} "
                         "bits are allowed")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"cryptfs: warning: key file {path} is readable by others (chmod 600 {path})",
              file=sys.stderr)
    return key


def read_master_key_file(path: str) -> bytes:
    """The master key as printed by ``cryptfs init --show-master-key``: 64 hex digits, possibly
    grouped with spaces, dashes or colons, optionally after ``master key:``."""
    text = read_small_file(path, "master key file").decode("utf-8", errors="replace")
    if ":" in text and text.lower().lstrip().startswith("master key"):
        text = text.split(":", 1)[1]
    digits = "".join(c for c in text if c not in " \t\r\n-:")
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        key = b""
    if len(key) != crypto.KEY_SIZE:
        raise UsageError(
            f"{path} does not hold a master key",
            hint="it must contain the 64 hex digits that 'cryptfs init --show-master-key' printed",
        )
    return key


def format_master_key(master: bytes) -> str:
    h = master.hex()
    return "-".join(h[i : i + 8] for i in range(0, len(h), 8))


@dataclass
class Credentials:
    """What the user gave to open a vault (command line and mount options)."""

    passphrase_file: str | None = None
    extpass: str | None = None
    key_file: str | None = None
    master_key_file: str | None = None

    @classmethod
    def from_args(cls, args: object, opts: object | None = None) -> Credentials:
        def pick(attr: str, opt: str) -> str | None:
            v = getattr(args, attr, None)
            if v:
                return str(v)
            if opts is not None:
                o = getattr(opts, opt, None)
                return str(o) if o else None
            return None

        return cls(
            passphrase_file=pick("passphrase_file", "passfile"),
            extpass=pick("extpass", "extpass"),
            key_file=pick("key_file", "keyfile"),
            master_key_file=pick("master_key_file", "masterkeyfile"),
        )

    def unlock(self, cfg: VaultConfig) -> tuple[bytes, str | None]:
        """(master key, id of the slot that opened it; None for a master key file)."""
        if self.master_key_file:
            master = read_master_key_file(self.master_key_file)
            cfg.check_master(master)
            return master, None
        if self.key_file:
            return cfg.unlock_private_key(read_private_key(self.key_file))
        return cfg.unlock_slot(get_passphrase(self.passphrase_file, self.extpass))
