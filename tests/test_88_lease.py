"""Exclusive mount: a second mount of the same vault from another machine (another XDG home) is
refused while the first is alive, allowed after it stops cleanly or its lease expires; a frozen
holder whose lease was taken over stops writing."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv, _tmp_root

# tampering, faults, crashes and refusals make the daemon log warnings and errors on purpose
pytestmark = pytest.mark.log_problems_expected


def second_machine(env: VaultEnv) -> VaultEnv:
    other = VaultEnv(_tmp_root(), env.store_url, extra_env=dict(env.extra_env))
    other.cli("init", env.store_url)  # attach: the config comes from the store
    return other


def test_second_mount_refused_then_allowed(mounted: tuple[VaultEnv, Path]) -> None:
    env, mnt = mounted
    (mnt / "a").write_text("from the first machine")
    other = second_machine(env)
    mnt2 = other.root / "mnt"
    mnt2.mkdir()
    res = other.cli("mount", str(mnt2), check=False)
    assert res.returncode == 8, res.stderr
    assert "the vault is mounted on" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.ismount(mnt2)
    env.umount(mnt)  # a clean unmount releases the lease
    other.mount(mnt2)
    try:
        assert (mnt2 / "a").read_text() == "from the first machine"
    finally:
        other.umount(mnt2)


def test_expired_lease_is_taken_over_and_the_old_holder_stops_writing(
        store_kind: str, request: pytest.FixtureRequest) -> None:
    root = _tmp_root()
    url = f"file://{root}/store" if store_kind == "local" else request.getfixturevalue("s3_url")
    # a lifetime long enough for the second machine's refused attempt (a CLI start and a key
    # derivation) to fit in it on a loaded machine
    env = VaultEnv(root, url, extra_env={"CRYPTFS_LEASE_SECONDS": "8"})
    env.init()
    mnt = root / "mnt"
    env.mount(mnt)
    pid = int((env.data_dir / "mount.lock").read_text())
    other = second_machine(env)
    mnt2 = other.root / "mnt"
    mnt2.mkdir()
    os.kill(pid, signal.SIGSTOP)  # frozen: no heartbeat, but alive
    try:
        try:
            assert other.cli("mount", str(mnt2), check=False).returncode == 8
            time.sleep(8.5)  # the lease expires
            other.mount(mnt2)
        finally:
            os.kill(pid, signal.SIGCONT)
        (mnt2 / "b").write_text("new owner")
        deadline = time.monotonic() + 25
        while True:  # the old holder notices at its next heartbeat and turns read-only
            try:
                with open(mnt / f"probe-{time.monotonic_ns()}", "w") as f:
                    f.write("x")
            except OSError as e:
                assert e.errno == errno.EROFS
                break
            assert time.monotonic() < deadline, "the old holder kept writing"
            time.sleep(0.3)
    finally:
        try:
            env.umount(mnt)
        finally:
            if os.path.ismount(mnt2):
                other.umount(mnt2)
    assert "lease was taken over" in env.log_text()
    # before it noticed, the old holder may have stored a few chunks of its probes: garbage
    # that nothing references, which is all verify may report, and which gc removes
    res = other.cli("verify", check=False)
    problems = [ln for ln in res.stdout.splitlines() if not ln.startswith("verify:")]
    assert all(ln.startswith("unreferenced: object data/") for ln in problems), res.stdout
    other.cli("gc", "--grace", "0")
    assert other.cli("verify", "--full").returncode == 0
