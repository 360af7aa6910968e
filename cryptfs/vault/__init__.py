"""The vault: the store list, the lease, anchors, checkpoints, restore and the copies of
several stores; :mod:`cryptfs.vault.core` composes the layers."""
