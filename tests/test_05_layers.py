"""The layering rules, checked on the package's source: what may be imported and written where.

The metadata engines (cryptfs/meta/sqlite.py, the SQLite engine, and cryptfs/meta/postgres.py, the
PostgreSQL one) are the only modules that hold SQL, talk to a database driver or to SQLAlchemy;
everything above them asks the engine.

Nothing outside ``cryptfs/stores/`` (and ``cryptfs/vault/storelist.py``, which composes the stores
of a vault) asks what kind of store it holds: no ``ReplicatedStore``, no ``isinstance``,
``getattr`` or ``hasattr`` on a store; what replication needs is in the store contract.
Callbacks and collaborators are passed in at construction: no ``x.on_... =`` or
``x.before_commit =`` anywhere, except ``self.on_... = ...`` inside an ``__init__``; both checks
also run on a planted snippet, to show they find what they look for.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cryptfs

PKG = Path(cryptfs.__file__).parent
ENGINES = {PKG / "meta" / "sqlite.py", PKG / "meta" / "postgres.py"}
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|PRAGMA|REPLACE)\b\s+[A-Za-z(*]")
DRIVER = re.compile(r"^\s*(import|from) (sqlite3|sqlalchemy|psycopg)\b", re.M)
REACH_IN = re.compile(r"\.(raw|conn)\.|exec_driver_sql|raw_connection\(")


def sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p not in ENGINES)


def test_the_package_has_sources() -> None:
    assert len(sources()) > 20 and all(p.exists() for p in ENGINES)


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


def test_the_engines_implement_the_engine_interface() -> None:
    import inspect

    from cryptfs.meta import MetaEngine
    from cryptfs.meta.postgres import PgMetaStore
    from cryptfs.meta.sqlite import MetaStore

    methods = {n: f for n, f in vars(MetaEngine).items()
               if callable(f) and not n.startswith("_")}
    assert len(methods) > 60
    for engine in (MetaStore, PgMetaStore):
        for name, proto in methods.items():
            impl = getattr(engine, name, None)
            assert impl is not None, f"{engine.__name__} lacks {name}"
            want = list(inspect.signature(proto).parameters)
            assert list(inspect.signature(impl).parameters) == want, (engine.__name__, name)


# -- stores and callbacks ---------------------------------------------------------------------
COMPOSES_STORES = {"stores", "vault/storelist.py"}  # where stores are built and may be named
CALLBACK = re.compile(r"on_[a-z_]+|before_commit")


def _sources(skip: set[str] | None = None) -> list[tuple[str, str]]:
    """(path relative to the package, source) of every module, except those under ``skip``."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if skip and (rel.parts[0] in skip or rel.as_posix() in skip):
            continue
        out.append((str(rel), path.read_text()))
    return out


def store_type_checks(where: str, source: str) -> list[str]:
    """``ReplicatedStore`` named, or isinstance/getattr/hasattr applied to a store."""
    found = [f"{where}:{n}: names ReplicatedStore"
             for n, line in enumerate(source.splitlines(), 1) if "ReplicatedStore" in line]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("isinstance", "getattr", "hasattr") and node.args:
            subject = ast.unparse(node.args[0])
            if "store" in subject.lower():
                found.append(f"{where}:{node.lineno}: {node.func.id}({subject}, ...)")
    return found


def late_callbacks(where: str, source: str) -> list[str]:
    """Callback attributes assigned anywhere but ``self.<callback> = ...`` in ``__init__``."""
    found = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            targets: list[ast.expr] = []
            if isinstance(child, ast.Assign):
                targets = child.targets
            elif isinstance(child, (ast.AnnAssign, ast.AugAssign)):
                targets = [child.target]
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Name) \
                    and child.func.id == "setattr" and len(child.args) > 1 \
                    and isinstance(child.args[1], ast.Constant) \
                    and CALLBACK.fullmatch(str(child.args[1].value)):
                found.append(f"{where}:{child.lineno}: setattr(..., {child.args[1].value!r})")
            for t in targets:
                for part in ast.walk(t):
                    if not (isinstance(part, ast.Attribute) and CALLBACK.fullmatch(part.attr)):
                        continue
                    own = isinstance(part.value, ast.Name) and part.value.id == "self"
                    if not (own and func == "__init__"):
                        found.append(f"{where}:{child.lineno}: {ast.unparse(part)} = ...")
            visit(child, func)

    visit(ast.parse(source), None)
    return found


def test_no_layer_outside_the_stores_asks_what_kind_of_store_it_has() -> None:
    found = [hit for where, src in _sources(skip=COMPOSES_STORES)
             for hit in store_type_checks(where, src)]
    assert found == []


def test_callbacks_are_passed_at_construction_not_assigned_later() -> None:
    found = [hit for where, src in _sources() for hit in late_callbacks(where, src)]
    assert found == []


def test_the_checks_find_what_they_look_for() -> None:
    planted = (
        "from cryptfs.stores.replicated import ReplicatedStore\n"
        "class A:\n"
        "    def __init__(self, cb):\n"
        "        self.on_copy = cb\n"  # allowed: the constructor's own attribute
        "    def wire(self, vault, meta):\n"
        "        if isinstance(vault.store, ReplicatedStore):\n"
        "            vault.store.on_copy = self.f\n"
        "        meta.on_commit = self.g\n"
        "        self.on_stray = None\n"
        "        drain = getattr(vault.store, 'drain', None)\n"
        "        setattr(vault.fs, 'before_commit', self.h)\n"
    )
    assert len(store_type_checks("x.py", planted)) == 4  # 2 names, isinstance, getattr
    hits = late_callbacks("x.py", planted)
    assert [h.split(": ", 1)[1] for h in hits] == [
        "vault.store.on_copy = ...", "meta.on_commit = ...", "self.on_stray = ...",
        "setattr(..., 'before_commit')"]


def test_a_module_over_400_lines_says_why_at_its_top() -> None:
    """Issue 13: no module over ~400 lines without a reason stated in its docstring."""
    unexplained = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if not re.search(r"^Longer than ~400 lines", doc, re.M):
                unexplained.append(str(path.relative_to(PKG)))
    assert unexplained == []
