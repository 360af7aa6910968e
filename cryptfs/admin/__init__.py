"""Commands that inspect or repair a vault: verify, gc, fsck, store operations, key slots,
status and stats."""
