"""Measure cryptfs's filesystem layer (no FUSE) at several chunk sizes on both stores.

    .venv/bin/python scripts/chunk_size_sweep.py [--mib 128] [--sizes 256K,1M,4M]

For each chunk size and store (local directory, moto S3 server on 127.0.0.1): sequential write of
a file followed by close and a checkpoint (everything in the store), sequential read of it with
the chunk cache emptied and the vault reopened, and random 4 KiB reads for a few seconds. The
numbers decide the default chunk size (see README, "Chunk size").
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def run_one(url_for: object, chunk: int, mib: int, rand_s: float) -> tuple[float, float, float]:
    from cryptfs.paths import VaultPaths
    from cryptfs.vault.core import Vault, create_vault

    base = tempfile.mkdtemp(prefix="cryptfs-sweep-")
    for var, sub in (("XDG_CONFIG_HOME", "c"), ("XDG_DATA_HOME", "d"), ("XDG_CACHE_HOME", "k")):
        os.environ[var] = f"{base}/{sub}"
    try:
        paths = VaultPaths("default")
        create_vault(paths, [url_for(base)], b"sweep", chunk, 0, 0)  # type: ignore[operator]
        v = Vault.open(paths, b"sweep")
        fs = v.fs
        assert fs is not None
        _node, fh = fs.create(1, b"big", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        blocks = [os.urandom(1 << 20) for _ in range(mib)]  # distinct: no dedup
        t = time.perf_counter()
        for i in range(mib):
            fs.write(fh, i << 20, blocks[i])
        fs.release(fh)
        v.sync()
        write = mib / (time.perf_counter() - t)
        v.close()
        shutil.rmtree(f"{base}/k", ignore_errors=True)
        v = Vault.open(paths, b"sweep")
        fs = v.fs
        assert fs is not None
        fh = fs.open(fs.lookup(1, b"big").ino, os.O_RDONLY)
        t = time.perf_counter()
        off = 0
        while data := fs.read(fh, off, 128 << 10):
            off += len(data)
        read = mib / (time.perf_counter() - t)
        fs.release(fh)
        v.close()
        shutil.rmtree(f"{base}/k", ignore_errors=True)
        v = Vault.open(paths, b"sweep")
        fs = v.fs
        assert fs is not None
        fh = fs.open(fs.lookup(1, b"big").ino, os.O_RDONLY)
        rnd = random.Random(1)
        n = 0
        t = time.perf_counter()
        while time.perf_counter() - t < rand_s:
            fs.read(fh, rnd.randrange(0, (mib << 20) - 4096) & ~4095, 4096)
            n += 1
        rand = n / (time.perf_counter() - t)
        fs.release(fh)
        v.close()
        return write, read, rand
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--sizes", default="256K,512K,1M,2M,4M")
    ap.add_argument("--random-seconds", type=float, default=3.0)
    a = ap.parse_args()
    os.environ.setdefault("CRYPTFS_SCRYPT_N", "16384")
    os.environ.update(AWS_ACCESS_KEY_ID="sweep", AWS_SECRET_ACCESS_KEY="sweep",
                      AWS_DEFAULT_REGION="us-east-1")
    from s3server import MotoServer

    with MotoServer() as moto:
        counter = iter(range(10**6))
        stores = {
            "local": lambda base: f"file://{base}/store",
            "s3": lambda base: f"s3://sweep-{next(counter)}/v?endpoint={moto.endpoint}",
        }
        print(f"{'chunk':>6} {'store':>6} {'write MB/s':>11} {'read MB/s':>10} {'rand 4K/s':>10}")
        for size in a.sizes.split(","):
            for name, url_for in stores.items():
                w, r, q = run_one(url_for, parse_size(size), a.mib, a.random_seconds)
                print(f"{size:>6} {name:>6} {w:>11.0f} {r:>10.0f} {q:>10.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
