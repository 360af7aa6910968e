"""The anchors: whether this machine's ledger, its head file, the store's newest checkpoint and
the store's config agree (a rollback, a truncated or edited ledger, a forged or rolled-back
config). Each problem is one line; a read-write mount refuses while there is any, and
``cryptfs verify`` reports them."""

from __future__ import annotations

from cryptfs.errors import ConfigError, IntegrityError
from cryptfs.format.codec import Codec
from cryptfs.format.layout import CHECKPOINT_PREFIX, checkpoint_seq
from cryptfs.format.vaultconfig import CONFIG_OBJECT, VaultConfig
from cryptfs.meta.ledger import Ledger, check_head_mac
from cryptfs.paths import VaultPaths
from cryptfs.stores import ObjectStore
from cryptfs.vault.checkpoints import read_checkpoints
from cryptfs.vault.localstate import read_head


def anchor_problems(paths: VaultPaths, store: ObjectStore, codec: Codec, cfg: VaultConfig,
                    ledger: Ledger, shared: bool = False) -> list[str]:
    """Compare the local ledger, the local head file and the newest store checkpoint.
    ``shared``: the ledger is in a database several machines share (a PostgreSQL vault),
    and the head file holds the newest head this machine verified there (fork consistency:
    a database rolled back, truncated or showing another history fails here)."""
    problems: list[str] = []
    where = "the ledger in the metadata database" if shared else "the local ledger"
    led = ledger
    local = led.head()
    head = read_head(paths)
    cks, bad = read_checkpoints(store, codec)
    problems.extend(bad)
    n, chain = led.verify_chain()
    problems.extend(chain)
    problems.extend(config_problems(store, codec, cfg, ledger))
    if head is not None:
        if not check_head_mac(codec.ledger_key, head.seq, head.hash, head.mac):
            problems.append(f"the local head file {paths.head} fails authentication")
        elif local is None or local.seq < head.seq:
            problems.append(
                f"{where} ends at sequence {local.seq if local else 0} "
                f"but this machine saw sequence {head.seq}: ledger entries were "
                "deleted"
            )
        else:
            e = led.entry(head.seq)
            if e is None or e.hash != head.hash:
                problems.append(
                    f"{where} differs from the head this machine saw "
                    f"at sequence {head.seq}"
                )
    ck = cks[0] if cks else None
    # the newest checkpoint this machine wrote or restored (the head itself may be later),
    # by the head file and by the local ledger, which records storing every checkpoint:
    # losing the head file, or an older copy of it, must not lower the bar
    seen = head.seq if head is not None else 0
    if head is not None:
        named = checkpoint_seq(head.checkpoint)
        if named is not None:
            seen = min(named, head.seq)
    recorded = led.last_named("put", CHECKPOINT_PREFIX)
    if recorded is not None and not chain:
        seen = max(seen, checkpoint_seq(recorded.name) or 0)
    if ck is None:
        if seen:
            problems.append(
                f"the store has no checkpoint, but this machine saw checkpoint "
                f"{seen}: the store was rolled back or wiped"
            )
    else:
        if ck.seq < seen:
            problems.append(
                f"the store was rolled back: its newest checkpoint is sequence "
                f"{ck.seq}, this machine saw sequence {seen}"
            )
        if local is None or local.seq < ck.seq:
            problems.append(
                f"{where} (sequence {local.seq if local else 0}) is "
                f"behind the store's checkpoint (sequence {ck.seq})"
            )
        else:
            e = led.entry(ck.seq)
            if e is None or e.hash != ck.hash:
                problems.append(
                    f"{where} and the store's checkpoint {ck.name} "
                    f"disagree at sequence {ck.seq}"
                )
    return problems


def config_problems(store: ObjectStore, codec: Codec, cfg: VaultConfig, ledger: Ledger
                    ) -> list[str]:
    """The store's config against what this machine knows: it must be authentic and at
    least as new as the newest generation seen (the local copy and the ledger's newest
    ``config`` entry). One line per problem."""
    try:
        stored = VaultConfig.from_store(store)
    except (ConfigError, IntegrityError) as e:
        return [f"the vault config in the store is unusable: {e}"]
    recorded = ledger.last_named("config", CONFIG_OBJECT)
    newest = max(cfg.generation, recorded.size if recorded else 0)
    if stored.vault_id != cfg.vault_id:
        return [f"the store {store.url} holds a different vault's config"]
    if not stored.mac_ok(codec.config_key):
        return ["the vault config in the store fails authentication (it was modified "
                "without the key)"]
    if stored.generation < newest:
        return [f"the vault config in the store is generation {stored.generation}, older "
                f"than generation {newest} this machine has seen: it was rolled back"]
    return []
