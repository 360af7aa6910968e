"""Shared pytest set-up: fixtures live in plugin modules beside this file, one per concern."""

from __future__ import annotations

import pytest

pytest_plugins = ["s3_fixtures", "mount_fixtures", "pg_fixtures", "posix_report"]

# The longest test files (a minute or more each on 2 cores), longest first. scripts/test runs
# two pytest-xdist workers that take whole files in collection order; starting these first
# keeps a long file from starting last and running alone at the end.
LONG_FILES = (
    "test_97_replicas.py", "test_52_hostile_store.py", "test_40_mount.py",
    "test_95_everyday.py", "test_39_pg_machines.py", "test_85_faults.py",
    "test_91_hostile_config.py", "test_80_crash.py", "test_50_ledger.py",
    "test_92_metrics.py", "test_70_model.py", "test_90_bad_input.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable
