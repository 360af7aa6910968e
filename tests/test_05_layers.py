"""The layering rules, checked on the package's source: what may be imported and written where.

The metadata engine (cryptfs/metadata.py, the SQLite engine) is the only module that holds SQL,
talks to the SQLite driver or to SQLAlchemy; everything above it asks the engine.
"""

from __future__ import annotations

import re
from pathlib import Path

import cryptfs

PKG = Path(cryptfs.__file__).parent
SQLITE_ENGINE = {PKG / "metadata.py"}
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|PRAGMA|REPLACE)\b\s+[A-Za-z(*]")
DRIVER = re.compile(r"^\s*(import sqlite3|from sqlite3|import sqlalchemy|from sqlalchemy)", re.M)
REACH_IN = re.compile(r"\.(raw|conn)\.|exec_driver_sql|raw_connection\(")


def sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p not in SQLITE_ENGINE)


def test_the_package_has_sources() -> None:
    assert len(sources()) > 20 and all(p.exists() for p in SQLITE_ENGINE)


def test_no_sql_text_outside_the_sqlite_engine() -> None:
    found = [f"{p.relative_to(PKG)}:{p.read_text()[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
             for p in sources() for m in SQL.finditer(p.read_text())]
    assert found == []


def test_no_database_driver_outside_the_sqlite_engine() -> None:
    found = [str(p.relative_to(PKG)) for p in sources() if DRIVER.search(p.read_text())]
    assert found == []


def test_nothing_reaches_into_the_engines_connection() -> None:
    found = [f"{p.relative_to(PKG)}: {m.group(0)}" for p in sources()
             for m in REACH_IN.finditer(p.read_text())]
    assert found == []


def test_the_sqlite_engine_implements_the_engine_interface() -> None:
    import inspect

    from cryptfs.meta import MetaEngine
    from cryptfs.metadata import MetaStore

    methods = {n: f for n, f in vars(MetaEngine).items()
               if callable(f) and not n.startswith("_")}
    assert len(methods) > 60
    for name, proto in methods.items():
        impl = getattr(MetaStore, name, None)
        assert impl is not None, f"MetaStore lacks {name}"
        want = list(inspect.signature(proto).parameters)
        assert list(inspect.signature(impl).parameters) == want, name
