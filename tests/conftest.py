"""Shared pytest set-up: fixtures live in plugin modules beside this file, one per concern."""

from __future__ import annotations

import pytest

pytest_plugins = ["s3_fixtures", "mount_fixtures", "pg_fixtures", "posix_report"]

# The longest test files, longest first: their summed test durations of one run (2026-12-03,
# `--durations=0`, 2 cores shared with other work: 42 min in all) went from 480 s (test_52)
# down to 40 s (test_26). scripts/test runs two pytest-xdist workers that take whole files in
# this order (--no-loadscope-reorder), each its next file when it is nearly done with the last:
# the long ones go first and the short ones fill in at the end, so neither worker runs a long
# file alone while the other has nothing left.
LONG_FILES = (
    "test_52_hostile_store.py", "test_40_mount.py", "test_50_ledger.py",
    "test_39_pg_machines.py", "test_97_replicas.py", "test_85_faults.py", "test_80_crash.py",
    "test_70_model.py", "test_88_lease.py", "test_95_everyday.py",
    "test_53_hostile_store_fuzz.py", "test_91_hostile_config.py", "test_92_metrics.py",
    "test_90_bad_input.py", "test_47_snapshots.py", "test_82_fsck.py", "test_83_segments.py",
    "test_38_pg_locks.py", "test_48_snapshots_stores.py", "test_81_group_commit.py",
    "test_37_meta_postgres.py", "test_62_fidelity.py", "test_26_v1_vault.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable
