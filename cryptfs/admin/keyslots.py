"""Changing key slots: ``cryptfs key add/remove``, ``cryptfs passwd``, ``cryptfs key generate``.

The master key never changes, so no data is re-encrypted: the config object in the store and the
local copy are rewritten (each atomically: a store put replaces an object whole, the local file
is written with temp file, fsync and rename) and signed again with the config MAC. The change is
based on the newest authentic config (the store's copy if it differs from the local one and its
MAC verifies), and a lock file in the vault's data directory serialises changes on this machine.
The store's copy is written first: if the local write then fails, the next open adopts the
store's copy (it verifies).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptfs.errors import ConfigError, IntegrityError, UsageError
from cryptfs.format.vaultconfig import CONFIG_OBJECT, VaultConfig
from cryptfs.paths import VaultPaths, private_dir
from cryptfs.vault.unlock import Credentials, read_small_file


@contextmanager
def _config_lock(paths: VaultPaths) -> Iterator[None]:
    private_dir(paths.data_dir)
    fd = os.open(paths.data_dir / "config.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def modify_config(
    paths: VaultPaths,
    creds: Credentials,
    change: Callable[[VaultConfig, bytes, str | None], str],
) -> str:
    """Unlock with ``creds``, apply ``change(cfg, master, opened_slot)`` to the newest authentic
    config, sign it and write it to the store and the local file. Returns change's message."""
    from cryptfs.vault.localstate import load_local_config, save_local_config

    with _config_lock(paths):
        stores, local = load_local_config(paths)
        master, opened = creds.unlock(local)
        store = stores.open()
        where = stores.display
        try:
            cfg = VaultConfig.from_store(store)
            if cfg.vault_id != local.vault_id:
                raise ConfigError(f"the store {where} holds a different vault")
            if cfg.to_dict() != local.to_dict() and not cfg.verify_mac(master):
                raise IntegrityError(
                    f"the config in {where} fails authentication",
                    hint="it was modified by someone without the key; nothing was changed",
                )
            if cfg.generation < local.generation:
                raise IntegrityError(
                    f"the config in {where} is generation {cfg.generation}, older than "
                    f"generation {local.generation} this machine has: it was rolled back",
                    hint="nothing was changed; 'cryptfs verify --accept' writes this machine's "
                    "config back")
            message = change(cfg, master, opened)
            cfg.sign(master)
            # every store that answers gets the new config (a quorum must); `cryptfs repair`
            # brings one that was down level
            store.put(CONFIG_OBJECT, cfg.to_bytes())
            store.drain(30.0)
        finally:
            store.close()
        save_local_config(paths, stores, cfg)
    return message


def generate_key_pair(path: str, bits: int = 3072) -> tuple[str, str]:
    """Write an RSA private key to ``path`` (PEM PKCS#8, mode 0600, not overwriting) and its
    public key to ``path.pub``. Returns (private path, public path)."""
    from Crypto.PublicKey import RSA

    priv_path, pub_path = Path(path), Path(path + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() or p.is_symlink():
            raise UsageError(f"{p} already exists", hint="choose another FILE or remove it")
    key = RSA.generate(bits)
    pem = key.export_key(format="PEM", pkcs=8)
    pub = key.publickey().export_key(format="PEM") + b"\n"
    try:
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, pub)
        finally:
            os.close(fd)
    except FileExistsError:
        raise UsageError(f"{path} or {path}.pub already exists") from None
    except OSError as e:
        raise UsageError(f"cannot write {e.filename}: {e.strerror}") from None
    return str(priv_path), str(pub_path)


def read_public_key(path: str):  # type: ignore[no-untyped-def]
    """An RSA public key from a PEM/DER/OpenSSH file (a private key file gives its public half)."""
    from Crypto.PublicKey import RSA

    data = read_small_file(path, "public key")
    try:
        return RSA.import_key(data).publickey()
    except (ValueError, IndexError, TypeError):
        raise UsageError(
            f"{path} is not an RSA public key",
            hint="use FILE.pub written by 'cryptfs key generate FILE' (PEM or ssh-rsa)",
        ) from None
