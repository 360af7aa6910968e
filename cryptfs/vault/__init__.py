"""The vault: the store list, the lease, anchors, checkpoints (reading and writing), crash
recovery, restore and the copies of several stores; :mod:`cryptfs.vault.core` composes them."""
