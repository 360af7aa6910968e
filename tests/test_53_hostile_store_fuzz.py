"""Fuzz of a hostile store (issue 12): random damage to every kind of object of a vault over two
local stores. Beside test_52_hostile_store.py (whose helpers it uses) in a file of its own: it
takes about as long as the rest of test_52 together, and the suite's two workers take whole
files.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
from mount_fixtures import VaultEnv, _tmp_root, force_unmount
from test_50_ledger import mounted_at
from test_52_hostile_store import daemon_pid, no_traceback, one_line

pytestmark = [pytest.mark.log_problems_expected, pytest.mark.timeout(300)]


# -- fuzz: every kind of object, random damage ----------------------------------------------------
KINDS = ("chunk", "snapshot", "checkpoint", "config", "lease", "store-id")


def _damage(rng: random.Random, blob: bytes, how: str) -> bytes:
    if how == "truncate":
        return blob[: rng.randrange(len(blob))]
    if how == "flip":
        b = bytearray(blob)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    return blob + rng.randbytes(rng.choice([1, 4096, 300_000]))  # inflate


def test_fuzz_damaged_objects_give_eio_or_one_line(tmp_path: Path) -> None:
    """Random truncations, bit flips and inflations of every kind of object in a vault over two
    local stores, each followed by `verify --full`, a read-only mount reading every file, and
    a read-write mount attempt: every outcome is the right bytes, EIO or one clear line."""
    rng = random.Random(int(os.environ.get("CRYPTFS_FUZZ_SEED", "52")))
    rounds = int(os.environ.get("CRYPTFS_FUZZ_ROUNDS", "1"))
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/a", extra_env={"CRYPTFS_LEASE_SECONDS": "2"})
    env.cli("init", f"file://{root}/a", f"file://{root}/b", "--chunk-size", "65536")
    files = {"small": rng.randbytes(3000), "big": rng.randbytes(3 * 65536 + 77)}
    with mounted_at(env) as mnt:
        for n, data in files.items():
            (mnt / n).write_bytes(data)
    env.mount(root / "mnt")  # a lease object to damage: left by a mount that was killed
    os.kill(daemon_pid(env), 9)
    force_unmount(str(root / "mnt"))
    pristine = tmp_path / "pristine"
    for part in ("a", "b", "data"):
        shutil.copytree(root / part if part != "data" else env.data_dir, pristine / part)
    names = {k: [] for k in KINDS}
    for path in sorted((pristine / "a").rglob("*")):
        if path.is_file() and not path.name.startswith(".tmp."):
            rel = str(path.relative_to(pristine / "a"))
            kind = {"data": "chunk", "meta": "snapshot", "checkpoints": "checkpoint"}.get(
                rel.split("/")[0], rel)
            if kind in names:
                names[kind].append(rel)
    assert all(names.values()), names
    # bounded in count (rounds x 3 passes x every kind) and in time: each pass damages every
    # kind of object, and the three kinds of damage are spread over the kinds in every pass,
    # so the first pass alone covers them all; later passes stop once the budget is spent (a
    # loaded machine), never the first
    hows = ("truncate", "flip", "inflate")
    deadline = time.monotonic() + 180
    cases = 0
    for r in range(rounds * len(hows)):
        if r and time.monotonic() > deadline:
            break
        for j, kind in enumerate(KINDS):
            how = hows[(j + r) % len(hows)]
            for part in ("a", "b"):
                shutil.rmtree(root / part)
                shutil.copytree(pristine / part, root / part)
            shutil.rmtree(env.data_dir)
            shutil.copytree(pristine / "data", env.data_dir)
            name = rng.choice(names[kind])
            targets = ("a", "b") if kind in ("chunk", "snapshot", "checkpoint") else ("a",)
            for part in targets:
                p = root / part / name
                p.write_bytes(_damage(rng, p.read_bytes(), how))
            _check_outcomes(env, files, f"{how} {kind} {name}")
            cases += 1
    assert len(KINDS) <= cases <= rounds * len(KINDS) * len(hows)
    assert cases % len(KINDS) == 0
    shutil.rmtree(root, ignore_errors=True)


def _check_outcomes(env: VaultEnv, files: dict[str, bytes], what: str) -> None:
    res = env.cli("verify", "--full", check=False, timeout=60)
    no_traceback(res.stdout, res.stderr)
    assert res.returncode in (0, 4, 6), (what, res.returncode, res.stdout, res.stderr)
    if res.returncode == 4:
        one_line(res.stderr)
    mnt = env.root / "mnt"
    mnt.mkdir(exist_ok=True)
    ro = env.cli("mount", str(mnt), "-o", "ro", check=False, timeout=60)
    no_traceback(ro.stderr)
    if ro.returncode == 0:
        try:
            for n, data in files.items():
                try:
                    got = (mnt / n).read_bytes()
                except OSError as e:
                    assert e.errno == 5, (what, e)
                    continue
                assert got == data, f"{what}: wrong bytes from {n}"
        finally:
            env.umount(mnt)
    else:
        one_line(ro.stderr)
    rw = env.cli("mount", str(mnt), check=False, timeout=60)
    no_traceback(rw.stderr)
    if rw.returncode == 0:
        env.umount(mnt)
    else:
        one_line(rw.stderr)
    no_traceback(env.log_text())
