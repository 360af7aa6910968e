"""Fixtures that create isolated vaults and real FUSE mounts through the `cryptfs` CLI.

Every vault gets its own XDG directories, so tests never touch the user's vaults. Every mount
is unmounted at teardown, also when the test fails; a session finaliser lazily unmounts and
kills anything left over.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CRYPTFS = str(BIN / "cryptfs")
PASSPHRASE = "correct horse battery staple"
_MOUNTS: set[str] = set()
_ROOTS: set[str] = set()  # temp roots of this session: only their daemons are ours to kill
_VAULTS: list[VaultEnv] = []  # created during the current test


def _mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == real for line in f)


def force_unmount(path: str) -> None:
    """Last resort: lazy unmount and kill the daemon that served ``path``."""
    if _mounted(path):
        subprocess.run(["fusermount3", "-uz", path], capture_output=True)
    _MOUNTS.discard(path)


@dataclass
class VaultEnv:
    """One vault's world: its XDG home, store URL and the CLI bound to them."""

    root: Path
    store_url: str
    name: str = "default"
    passphrase: str = PASSPHRASE
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _VAULTS.append(self)  # for the log-hygiene check after the test

    @property
    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            {
                "XDG_CONFIG_HOME": str(self.root / "config"),
                "XDG_DATA_HOME": str(self.root / "data"),
                "XDG_CACHE_HOME": str(self.root / "cache"),
                "CRYPTFS_PASSPHRASE": self.passphrase,
                "CRYPTFS_SCRYPT_N": "16384",
                "HOME": str(self.root),
            }
        )
        e.update(self.extra_env)
        return e

    @property
    def data_dir(self) -> Path:
        return self.root / "data" / "cryptfs" / "vaults" / self.name

    @property
    def db(self) -> Path:
        return self.data_dir / "metadata.db"

    @property
    def store_dir(self) -> Path | None:
        return (
            Path(self.store_url[len("file://") :]) if self.store_url.startswith("file://") else None
        )

    def cli(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [CRYPTFS, *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"cryptfs {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}"
            )
        return res

    def init(self, *extra: str) -> None:
        self.cli("init", self.store_url, "--name", self.name, *extra)

    def mount(self, mountpoint: Path | str, *opts: str) -> None:
        mp = str(mountpoint)
        os.makedirs(mp, exist_ok=True)
        args = ["mount", "--name", self.name, mp]
        if opts:
            args += ["-o", ",".join(opts)]
        self.cli(*args)
        _MOUNTS.add(mp)

    def umount(self, mountpoint: Path | str) -> None:
        mp = str(mountpoint)
        try:
            self.cli("umount", mp, timeout=180)
        finally:
            force_unmount(mp)

    def log_text(self) -> str:
        p = self.data_dir / "daemon.log"
        return p.read_text() if p.exists() else ""

    def store(self):  # type: ignore[no-untyped-def]
        """The vault's object store, opened directly (for tamper tests)."""
        from cryptfs.stores import open_store

        return open_store(self.store_url)


@pytest.fixture(params=["local", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _tmp_root() -> Path:
    base = Path(tempfile.mkdtemp(prefix="cryptfs-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    _ROOTS.add(str(base))
    return base


@pytest.fixture
def vault_env(store_kind: str, request: pytest.FixtureRequest) -> Iterator[VaultEnv]:
    """A fresh, initialised vault on a local store or on the moto S3 server."""
    root = _tmp_root()
    if store_kind == "local":
        url = f"file://{root}/store"
    else:
        url = request.getfixturevalue("s3_url")
    env = VaultEnv(root, url)
    env.init()
    yield env
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def local_env() -> Iterator[VaultEnv]:
    """A fresh, initialised vault on a local store in its own XDG home; every mount below its
    root is unmounted and the root removed at teardown."""
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/store")
    env.init()
    try:
        yield env
    finally:
        for mp in [m for m in list(_MOUNTS) if m.startswith(str(root) + "/")]:
            if _mounted(mp):
                try:
                    env.umount(mp)
                except Exception:  # noqa: BLE001 - umount already forced it away
                    pass
            _MOUNTS.discard(mp)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def mounted(vault_env: VaultEnv) -> Iterator[tuple[VaultEnv, Path]]:
    """A fresh vault mounted at a fresh directory; unmounted at teardown."""
    mnt = vault_env.root / "mnt"
    vault_env.mount(mnt)
    try:
        yield vault_env, mnt
    finally:
        if _mounted(str(mnt)):
            vault_env.umount(mnt)


@pytest.fixture(scope="session")
def posix_mount() -> Iterator[Path]:
    """One local-store vault mounted with allow_other for the conformance suite."""
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/store")
    env.init()
    mnt = root / "mnt"
    env.mount(mnt, "allow_other")
    os.chmod(mnt, 0o755)
    try:
        yield mnt
    finally:
        try:
            env.umount(mnt)
        finally:
            subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def cryptfs_dir(posix_mount: Path) -> Path:
    d = posix_mount / f"t-{uuid.uuid4().hex[:12]}"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for mp in list(_MOUNTS):
        force_unmount(mp)
    with open("/proc/self/mounts") as f:  # and what a test mounted without saying so
        for mp in [line.split()[1] for line in f]:
            if any(mp.startswith(root + "/") for root in _ROOTS):
                force_unmount(mp)
    # daemons whose mounts were forced away exit by themselves; kill stragglers of this run
    for root in sorted(_ROOTS):
        res = subprocess.run(["pgrep", "-f", f"{root}/"], capture_output=True, text=True)
        for pid in res.stdout.split():
            if int(pid) != os.getpid():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
    with open("/proc/self/mounts") as f:
        mounted = [line.split()[1] for line in f]
    for root in sorted(_ROOTS):  # never descend into something still mounted
        if not any(m.startswith(root + "/") for m in mounted):
            shutil.rmtree(root, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "log_problems_expected: the test provokes warnings or errors in the daemon "
        "log on purpose (tracebacks still fail it)")


@pytest.fixture(autouse=True)
def log_hygiene(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose mount daemons logged a traceback, or a warning or error the test did
    not declare with ``@pytest.mark.log_problems_expected``."""
    _VAULTS.clear()
    yield
    allowed = request.node.get_closest_marker("log_problems_expected") is not None
    bad: list[str] = []
    for env in _VAULTS:
        for line in env.log_text().splitlines():
            if "Traceback" in line or "internal error" in line:
                bad.append(line)
            elif not allowed and (" WARNING " in line or " ERROR " in line
                                  or " CRITICAL " in line):
                bad.append(line)
    _VAULTS.clear()
    if bad:
        pytest.fail("unexpected lines in the daemon log:\n" + "\n".join(bad[:10]),
                    pytrace=False)
