"""A hostile config (issue 12): the store's config object and the local config file are read
field by field; whatever they hold, the answer is one line and a documented exit code, never a
traceback, never a key derivation that takes the machine's memory, and nothing on disk changes.

The layer tests run in process (VaultConfig, the local config loader); the rest through the CLI.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mount_fixtures import CRYPTFS, PASSPHRASE, VaultEnv, _tmp_root

from cryptfs.errors import ConfigError, CryptfsError
from cryptfs.format import crypto
from cryptfs.format.vaultconfig import MAX_SLOTS, VaultConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.log_problems_expected]

HUGE_KDFS = [  # (n, r, p): each beyond the bounds; the first two are the examples
    (2**22, 8, 1),  # 4 GiB
    (2**20, 32, 1),  # 4 GiB by r
    (2**20, 8, 16),  # 1 GiB, 16 passes
    (2**21, 8, 1),
    (2**64, 8, 1),
    (2**14, 8, 2),
    (2**13, 8, 1),  # below the minimum cost
    (3 * 2**14, 8, 1),  # not a power of two
    (2**14, 1, 1),
]


# -- helpers --------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "daemon.log"}


def one_line_error(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cryptfs: "), lines
    assert "Traceback" not in res.stderr + res.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])


# Runs the CLI from a small interpreter and reports its child's peak RSS on a pipe: a child
# forked from pytest itself would count pytest's own resident pages (hundreds of MiB late in a
# full run) in its ru_maxrss, since Linux carries the pre-exec peak across exec.
_MEASURE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "os.write(fd, str(usage.ru_maxrss).encode())\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(env: VaultEnv, *args: str) -> tuple[subprocess.CompletedProcess[str], float,
                                                      int]:
    """Run the CLI; (result, seconds, peak RSS in bytes of that one process)."""
    r, w = os.pipe()
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-c", _MEASURE, str(w), CRYPTFS, *args],
                             env=env.env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, pass_fds=(w,), timeout=120)
    finally:
        os.close(w)
    elapsed = time.monotonic() - t0
    with os.fdopen(r) as pipe:
        kib = int(pipe.read() or 0)
    assert kib > 0, res.stderr
    return subprocess.CompletedProcess(list(args), res.returncode, res.stdout, res.stderr), \
        elapsed, kib * 1024


def local_cfg_path(env: VaultEnv) -> Path:
    return env.root / "config" / "cryptfs" / "vaults" / f"{env.name}.json"


def edit_local(env: VaultEnv, change: Any) -> None:
    p = local_cfg_path(env)
    body = json.loads(p.read_text())
    change(body)
    p.write_text(json.dumps(body))


def edit_store_config(env: VaultEnv, change: Any) -> None:
    assert env.store_dir is not None
    p = env.store_dir / "config"
    body = json.loads(p.read_text())
    change(body)
    p.write_text(json.dumps(body))


def new_config(slots: int = 1) -> dict[str, Any]:
    cfg, master = VaultConfig.create(b"pw", 65536, scrypt_n=2**14)
    for _ in range(slots - 1):
        cfg.slots.append(copy.deepcopy(cfg.slots[0]))
        cfg.slots[-1]["id"] = os.urandom(4).hex()
    return cfg.to_dict()


def refused(d: dict[str, Any]) -> str:
    """The one-line ConfigError that reading ``d`` gives (fails if it is accepted)."""
    with pytest.raises(ConfigError) as e:
        VaultConfig.from_bytes(json.dumps(d).encode(), "the config")
    line = e.value.line()
    assert "\n" not in line and "tampered with" in line, line
    return line


# -- the config layer, in process ----------------------------------------------------------------
def _b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


SLOT_DAMAGE: dict[str, Any] = {
    "missing kdf": lambda s: s.pop("kdf"),
    "missing wrapped": lambda s: s.pop("wrapped"),
    "missing id": lambda s: s.pop("id"),
    "kdf not an object": lambda s: s.update(kdf="scrypt"),
    "kdf n a string": lambda s: s["kdf"].update(n="16384"),
    "kdf n a float": lambda s: s["kdf"].update(n=16384.0),
    "kdf n a bool": lambda s: s["kdf"].update(n=True),
    "kdf n null": lambda s: s["kdf"].update(n=None),
    "kdf n huge": lambda s: s["kdf"].update(n=10**30),
    "kdf n infinite": lambda s: s["kdf"].update(n=float("inf")),
    "kdf name": lambda s: s["kdf"].update(name="argon2id"),
    "kdf extra field": lambda s: s["kdf"].update(maxmem=1),
    "salt bad base64": lambda s: s["kdf"].update(salt="!!not base64!!"),
    "salt bad padding": lambda s: s["kdf"].update(salt="qkR90pPxYzd9DDb13Xx9Yg="),
    "salt short": lambda s: s["kdf"].update(salt=_b64(8)),
    "salt long": lambda s: s["kdf"].update(salt=_b64(65)),
    "salt a number": lambda s: s["kdf"].update(salt=12345),
    "salt non-ascii": lambda s: s["kdf"].update(salt="qkR90pPxYzd9DDb13Xx9Y\u00e9=="),
    "salt megabytes": lambda s: s["kdf"].update(salt="A" * (4 << 20)),
    "wrapped bad base64": lambda s: s.update(wrapped="%%%"),
    "wrapped short": lambda s: s.update(wrapped=_b64(59)),
    "wrapped a list": lambda s: s.update(wrapped=[1, 2]),
    "id not hex": lambda s: s.update(id="../../x"),
    "id a number": lambda s: s.update(id=741),
    "unknown type": lambda s: s.update(type="fido2"),
    "type missing": lambda s: s.pop("type"),
    "unknown field": lambda s: s.update(extra="x"),
    "label a number": lambda s: s.update(label=5),
    "label with escapes": lambda s: s.update(label="laptop\x1b[2J\n"),
    "label too long": lambda s: s.update(label="x" * 201),
    "slot a string": lambda s: None,  # replaced whole below
}


@pytest.mark.parametrize("damage", sorted(SLOT_DAMAGE))
def test_malformed_slot_is_one_config_error(damage: str) -> None:
    d = new_config()
    if damage == "slot a string":
        d["slots"][0] = "passphrase"
    else:
        SLOT_DAMAGE[damage](d["slots"][0])
    refused(d)


PUBLIC_KEY_SLOT = {"id": "0badc0de", "type": "public-key", "alg": "rsa-oaep-sha256",
                   "bits": 3072, "fingerprint": "ab" * 32, "wrapped": _b64(384)}


@pytest.mark.parametrize("damage", [
    ("bits", 1 << 20), ("bits", 1024), ("bits", "3072"), ("bits", 3072.5), ("alg", "rsa-pkcs1"),
    ("fingerprint", "AB" * 32), ("fingerprint", "ab" * 31), ("wrapped", _b64(383)),
    ("wrapped", None)])
def test_malformed_public_key_slot(damage: tuple[str, Any]) -> None:
    d = new_config()
    good = dict(PUBLIC_KEY_SLOT)
    d["slots"].append(good)
    VaultConfig.from_bytes(json.dumps(d).encode(), "the config")  # the undamaged slot is fine
    good[damage[0]] = damage[1]
    refused(d)


@pytest.mark.parametrize("field,value", [
    ("chunk_size", "65536"), ("chunk_size", 65536.0), ("chunk_size", True), ("chunk_size", 1024),
    ("chunk_size", 10**30), ("vault_id", "AB" * 16), ("vault_id", "ab" * 15), ("vault_id", 5),
    ("created", {"a": 1}), ("created", "2026\n"), ("created", "x" * 65), ("mac", "zz" * 32),
    ("mac", None)])
def test_malformed_config_field(field: str, value: Any) -> None:
    d = new_config()
    d[field] = value
    assert field in refused(d)


def test_chunk_name_hash_of_each_config_version() -> None:
    """A new vault's config is version 3, naming chunks with BLAKE3 (its MAC covers the
    choice); version 3 without it, with another, or a version 2 config with one, is refused;
    a version 2 config still opens and names chunks with BLAKE2b."""
    d = new_config()
    assert d["version"] == 3 and d["name_hash"] == "blake3"
    assert VaultConfig.from_dict(d, "the config").name_hash == "blake3"
    for value in ("blake2b", "BLAKE3", None, 3):
        assert "name_hash" in refused(dict(d, name_hash=value))
    assert "name_hash" in refused({k: v for k, v in d.items() if k != "name_hash"})
    cfg, master = VaultConfig.create(b"pw", 65536, scrypt_n=2**14, name_hash="blake2b")
    old = cfg.to_dict()
    assert old["version"] == 2 and "name_hash" not in old
    back = VaultConfig.from_dict(old, "the config")
    assert back.name_hash == "blake2b" and back.verify_mac(master)
    assert "name_hash" in refused(dict(old, name_hash="blake3"))
    # a version 3 config whose version is lowered (its name_hash dropped) fails its MAC
    new, key = VaultConfig.create(b"pw", 65536, scrypt_n=2**14)
    assert new.verify_mac(key)
    low = VaultConfig.from_dict({k: v for k, v in dict(new.to_dict(), version=2).items()
                                 if k != "name_hash"}, "the config")
    assert low.name_hash == "blake2b" and not low.verify_mac(key)


def test_slot_count_and_ids() -> None:
    VaultConfig.from_dict(new_config(MAX_SLOTS), "the config")  # 32 slots are allowed
    assert "33 key slots" in refused(new_config(MAX_SLOTS + 1))
    assert "0 key slots" in refused(dict(new_config(), slots=[]))
    assert "not a list" in refused(dict(new_config(), slots={"a": 1}))
    d = new_config(2)
    d["slots"][1]["id"] = d["slots"][0]["id"]
    assert "same id" in refused(d)


@pytest.mark.parametrize("nrp", HUGE_KDFS, ids=[f"n{n}-r{r}-p{p}" for n, r, p in HUGE_KDFS])
def test_kdf_beyond_bounds_refused_before_any_work(nrp: tuple[int, int, int]) -> None:
    n, r, p = nrp
    d = new_config()
    d["slots"][0]["kdf"].update(n=n, r=r, p=p)
    t0 = time.monotonic()
    line = refused(d)
    assert time.monotonic() - t0 < 0.5  # the smallest refused cost would take seconds
    assert "scrypt" in line
    # the last guard, for a caller that skipped validation: still no allocation
    with pytest.raises(ConfigError):
        crypto.derive_kek(b"pw", os.urandom(16), n, r, p)


def test_total_kdf_work_is_bounded() -> None:
    d = new_config(5)
    for s in d["slots"]:
        s["kdf"]["n"] = crypto.SCRYPT_MAX_N
    assert "together" in refused(d)  # five slots at 1 GiB each: 5 passes
    d["slots"].pop()
    VaultConfig.from_dict(d, "the config")  # four are allowed


# -- the local config file: every field, every wrong type, in process ---------------------------
WRONG_VALUES: list[Any] = [None, True, -1, 2**70, 1e308, float("inf"), "", "x" * 3000, [], {},
                           [1], {"a": None}, "%00"]


def _paths_in(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths_in(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths_in(v, (*prefix, i))


def test_every_local_config_field_with_wrong_values(local_env: VaultEnv,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each field of the local config file replaced by each kind of wrong value: loading and
    unlocking either works or raises a CryptfsError (a one-line message), nothing else."""
    from cryptfs.paths import VaultPaths
    from cryptfs.vault.localstate import load_local_config
    from cryptfs.vault.unlock import Credentials

    for k, v in local_env.env.items():
        if k.startswith(("XDG_", "CRYPTFS_")):
            monkeypatch.setenv(k, v)
    pf = local_env.root / "pass"
    pf.write_text(PASSPHRASE)
    cfgfile = local_cfg_path(local_env)
    original = json.loads(cfgfile.read_text())
    paths = VaultPaths(local_env.name)
    load_local_config(paths)  # the undamaged file loads
    tried = codes = 0
    seen: set[int] = set()
    for path in list(_paths_in(original))[1:]:
        for bad in WRONG_VALUES:
            body = copy.deepcopy(original)
            node = body
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = bad
            cfgfile.write_text(json.dumps(body))
            tried += 1
            try:
                Credentials(passphrase_file=str(pf)).unlock(load_local_config(paths)[1])
            except CryptfsError as e:
                assert "\n" not in e.line()
                seen.add(e.exit_code)
                codes += 1
    cfgfile.write_text(json.dumps(original))
    assert tried > 150 and codes > tried * 0.8, (tried, codes)
    assert seen <= {3, 4, 6}, seen  # wrong key, bad config, or a MAC that fails


# -- through the CLI ------------------------------------------------------------------------------
def test_local_config_with_bad_salt(local_env: VaultEnv) -> None:
    """The issue's case: a bad salt in the local config gave a binascii.Error traceback."""
    edit_local(local_env, lambda b: b["vault"]["slots"][0]["kdf"].update(salt="not base64!"))
    before = snapshot(local_env.root)
    mnt = local_env.root / "mnt"
    mnt.mkdir()
    one_line_error(local_env.cli("mount", str(mnt), check=False), 4, "salt", "tampered with")
    one_line_error(local_env.cli("key", "list", check=False), 4, "salt")
    assert snapshot(local_env.root) == before
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("where", ["local", "store"])
def test_huge_kdf_refused_quickly_without_the_memory(local_env: VaultEnv, where: str) -> None:
    """A config demanding scrypt N=2^22 (4 GiB) is refused at once, in a small process."""
    def huge(body: dict[str, Any]) -> None:
        vault = body["vault"] if "vault" in body else body
        vault["slots"][0]["kdf"]["n"] = 2**22

    if where == "local":
        edit_local(local_env, huge)
        args = ["log", "-n", "1"]
    else:
        edit_store_config(local_env, huge)
        args = ["info", local_env.store_url]
    before = snapshot(local_env.root)
    res, seconds, rss = run_measured(local_env, *args)
    one_line_error(res, 4, "scrypt N", "tampered with")
    assert seconds < 10, seconds  # 4 GiB of scrypt takes ~25 s here; the CLI start ~0.5 s
    assert rss < 300 << 20, rss  # far below the 4 GiB it asked for
    assert snapshot(local_env.root) == before


def test_attach_store_with_a_slot_without_kdf(local_env: VaultEnv) -> None:
    """The issue's case: attaching a vault whose store config has a slot without "kdf" gave a
    KeyError traceback."""
    edit_store_config(local_env, lambda b: b["slots"][0].pop("kdf"))
    before = snapshot(local_env.root)
    res = local_env.cli("init", local_env.store_url, "--name", "other", check=False)
    one_line_error(res, 4, "no kdf")
    assert snapshot(local_env.root) == before
    assert not (local_env.root / "config" / "cryptfs" / "vaults" / "other.json").exists()


@pytest.mark.parametrize("damage", ["wrong types", "bad base64", "too many slots"])
def test_store_config_slot_damage_through_info_and_attach(local_env: VaultEnv,
                                                          damage: str) -> None:
    def change(b: dict[str, Any]) -> None:
        s = b["slots"][0]
        if damage == "wrong types":
            s["kdf"]["n"] = "16384"
        elif damage == "bad base64":
            s["wrapped"] = "*" * 80
        else:
            b["slots"] = [dict(s, id=f"{i:08x}") for i in range(MAX_SLOTS + 1)]

    edit_store_config(local_env, change)
    before = snapshot(local_env.root)
    one_line_error(local_env.cli("info", local_env.store_url, check=False), 4, "tampered with")
    one_line_error(local_env.cli("init", local_env.store_url, "--name", "other", check=False), 4,
                   "tampered with")
    assert snapshot(local_env.root) == before


@pytest.mark.parametrize("text", [
    "[]", '"a string"', "{}", '{"store": 5}', '{"stores": [{"id": 1}]}',
    '{"stores": [], "store": "file:///x"}', '{"store": "file:///x", "vault": []}',
    '{"stores": [{"id": "a", "url": "file:///x"}], "copies": 1e999}',
    '{"stores": [{"id": "a", "url": "file:///x"}], "copies": 7}',
    "[" * 100000 + "]" * 100000,
])
def test_local_config_of_wrong_shape(local_env: VaultEnv, text: str) -> None:
    local_cfg_path(local_env).write_text(text)
    before = snapshot(local_env.root)
    for args in (["log"], ["key", "list"], ["store", "list"]):
        one_line_error(local_env.cli(*args, check=False), 4, "corrupt")
    assert snapshot(local_env.root) == before


@pytest.mark.parametrize("url", ["file:///tmp/a%00b", "file:///tmp/a%ffb", "file:///tmp/%0a",
                                 "s3://bucket/a%00b?endpoint=http://127.0.0.1:9"])
def test_store_url_with_bad_escapes(url: str) -> None:
    root = _tmp_root()
    env = VaultEnv(root, url)
    one_line_error(env.cli("init", url, check=False), 2, "malformed store URL")
    one_line_error(env.cli("info", url, check=False), 2, "malformed store URL")
    assert not (root / "config").exists()


@pytest.mark.parametrize("args", [
    ["log", "-n", "99999999999999999999"],  # the case: an OverflowError in SQLite
    ["log", "-n", "0"],
    ["log", "-n", "-5"],
    ["log", "-n", "9" * 5000],
    ["gc", "--grace", "nan"],  # would have deleted everything: no age is < nan
    ["gc", "--grace", "inf"],
    ["gc", "--grace", "1e400"],
    ["key", "generate", "KEYFILE", "--bits", "99999999"],
    ["init", "--copies", "99999999999999999999"],
    ["init", "--quorum", "-1"],
    ["init", "--chunk-size", "1" + "0" * 30],
])
def test_absurd_numbers_are_usage_errors(local_env: VaultEnv, args: list[str]) -> None:
    args = [str(local_env.root / "k") if a == "KEYFILE" else a for a in args]
    before = snapshot(local_env.root)
    one_line_error(local_env.cli(*args, check=False), 2)
    assert snapshot(local_env.root) == before


@pytest.mark.parametrize("size", ["1e400", "-1", "nan", "2P", "inf"])
def test_absurd_cache_size(local_env: VaultEnv, size: str) -> None:
    mnt = local_env.root / "mnt"
    mnt.mkdir()
    before = snapshot(local_env.root)
    one_line_error(local_env.cli("mount", str(mnt), "-o", f"cache_size={size}", check=False), 2,
                   "invalid size")
    assert snapshot(local_env.root) == before
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("value", ["abc", "1e9", "12345", str(2**21), str(2**200)])
def test_bad_scrypt_n_from_the_environment(value: str) -> None:
    root = _tmp_root()
    env = VaultEnv(root, f"file://{root}/store", extra_env={"CRYPTFS_SCRYPT_N": value})
    one_line_error(env.cli("init", env.store_url, check=False), 2, "CRYPTFS_SCRYPT_N")
    assert not (root / "config").exists()


@pytest.mark.parametrize("label", ["x" * 201, "two\nlines", "bell\x07"])
def test_bad_label_refused_when_adding(local_env: VaultEnv, label: str) -> None:
    before = snapshot(local_env.root)
    res = local_env.cli("key", "add", "--passphrase", "--label", label, check=False,
                        env=dict(local_env.env, CRYPTFS_NEW_PASSPHRASE="second"))
    one_line_error(res, 2, "label")
    assert snapshot(local_env.root) == before


def test_huge_secret_files_are_refused(local_env: VaultEnv) -> None:
    mnt = local_env.root / "mnt"
    mnt.mkdir()
    for opt in ("--passphrase-file", "--key-file", "--master-key-file"):
        res = local_env.cli("mount", str(mnt), opt, "/dev/zero", check=False, timeout=30)
        one_line_error(res, 2, "larger than 1 MiB")
    assert not os.path.ismount(mnt)


def test_passphrase_that_is_not_utf8() -> None:
    """$CRYPTFS_PASSPHRASE is used as the bytes given (it was a UnicodeEncodeError traceback
    when they were not UTF-8); a passphrase file with the same bytes opens the same vault."""
    root = _tmp_root()
    raw = b"caf\xe9 latin-1 \xff"
    env = VaultEnv(root, f"file://{root}/store", passphrase=os.fsdecode(raw))
    env.init()
    assert env.cli("log", "-n", "1").returncode == 0
    pf = root / "pass"
    pf.write_bytes(raw + b"\n")
    bare = {k: v for k, v in env.env.items() if k != "CRYPTFS_PASSPHRASE"}
    assert env.cli("log", "--passphrase-file", str(pf), env=bare).returncode == 0
    wrong = dict(env.env, CRYPTFS_PASSPHRASE=os.fsdecode(b"caf\xe9"))
    one_line_error(env.cli("log", env=wrong, check=False), 3, "wrong passphrase")
