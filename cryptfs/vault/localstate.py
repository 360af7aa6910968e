"""This machine's state of a vault: the local config file (its stores and its copy of the vault
config, 0600) and the head file (the newest ledger head and checkpoint this machine saw, MAC'd).
See docs/FORMAT.md section 9."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptfs.errors import ConfigError, IntegrityError
from cryptfs.format.vaultconfig import VaultConfig
from cryptfs.paths import PastPaths, VaultPaths, tighten_private_dirs, write_private
from cryptfs.vault.storelist import StoreList

MAX_LOCAL_CONFIG = 1 << 20  # the local config file: a store list and a config of <= 32 slots
META_SCHEME = "postgresql+psycopg://"  # the metadata databases a vault may name


# -- local config file ------------------------------------------------------------------------
def save_local_config(paths: VaultPaths, stores: StoreList, cfg: VaultConfig,
                      meta: str | None = None) -> None:
    """Write the local config file (0600): the vault's stores with their URLs, its config, and
    the URL of its metadata database if that is not the local SQLite file (``meta``; None:
    the one the file names now, if any)."""
    if meta is None:
        meta = local_meta_url(paths)
    body = {"name": paths.name, **stores.to_json(), **({"meta": meta} if meta else {}),
            "vault": cfg.to_dict()}
    write_private(paths.config_file, json.dumps(body, indent=1).encode() + b"\n")


def local_meta_url(paths: VaultPaths) -> str | None:
    """The URL of the vault's metadata database (``postgresql+psycopg://...``) from the local
    config file, or None: the local SQLite file (also when there is no config file yet, and
    always for a past mount, whose metadata is the snapshot materialized as SQLite under its
    own local state, whatever engine holds the live metadata)."""
    if isinstance(paths, PastPaths):
        return None
    try:
        with open(paths.config_file, "rb") as fh:
            body = json.loads(fh.read(MAX_LOCAL_CONFIG + 1).decode())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        raise ConfigError(f"config file {paths.config_file} is corrupt or unreadable") from None
    meta = body.get("meta") if isinstance(body, dict) else None
    if meta is None:
        return None
    if not isinstance(meta, str) or not meta.startswith(META_SCHEME):
        raise ConfigError(f"config file {paths.config_file}: \"meta\" is not a "
                          f"{META_SCHEME} URL")
    return meta


def load_local_config(paths: VaultPaths) -> tuple[StoreList, VaultConfig]:
    f = paths.config_file
    try:
        with open(f, "rb") as fh:
            raw = fh.read(MAX_LOCAL_CONFIG + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"no vault named '{paths.name}'",
            hint="create it with 'cryptfs init' or see 'cryptfs list'",
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {f}: {e.strerror}") from None
    try:
        if len(raw) > MAX_LOCAL_CONFIG:
            raise ValueError(f"larger than {MAX_LOCAL_CONFIG} bytes")
        body = json.loads(raw.decode())
        stores = StoreList.from_json(body)
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # also UnicodeDecodeError
        detail = str(e) if type(e) is ValueError else "not valid JSON"
        raise ConfigError(
            f"config file {f} is corrupt ({detail[:80]})",
            hint="move it away and run 'cryptfs init STORE_URL' to attach the "
            "vault from its store again",
        ) from None
    tighten_private_dirs(paths)
    return stores, VaultConfig.from_dict(body.get("vault"), str(f))


# -- local head file ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    seq: int
    hash: bytes
    mac: bytes
    checkpoint: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash.hex(),
            "mac": self.mac.hex(),
            "checkpoint": self.checkpoint,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Head:
        return cls(
            int(d["seq"]),
            bytes.fromhex(d["hash"]),
            bytes.fromhex(d["mac"]),
            str(d.get("checkpoint", "")),
        )


def read_head(paths: VaultPaths) -> Head | None:
    try:
        return Head.from_json(json.loads(paths.head.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
        raise IntegrityError(f"the local head file {paths.head} is corrupt") from None
