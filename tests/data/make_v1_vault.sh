#!/bin/sh
# Remake tests/data/v1_vault.tar.gz: a small local-store vault written by cryptfs as it was at
# commit 846eb6b (metadata schema version 1: no stamp, PRAGMA user_version 0; vault config
# version 1). Usage, from the repository root with the dev venv set up:
#
#   git worktree add /tmp/v1-src 846eb6b
#   tests/data/make_v1_vault.sh /tmp/v1-src tests/data/v1_vault.tar.gz
#   git worktree remove /tmp/v1-src
#
# The archive holds config/, data/ and store/ of one vault named "default", relative to a root
# the test extracts to a temporary directory (the local config's store URL must be rewritten
# there). Passphrase "v1 vault passphrase", scrypt N 16384, chunk size 64 KiB. The content is
# deterministic (seeded); tests/test_26_v1_vault.py holds its SHA-256 digests.
set -eu
SRC=$(cd "$1" && pwd)
OUT=$(realpath "$2")
PY=${PYTHON:-$(pwd)/.venv/bin/python}
ROOT=$(mktemp -d /tmp/cryptfs-v1-XXXXXX)
chmod 755 "$ROOT"
trap 'mountpoint -q "$ROOT/mnt" && fusermount3 -uz "$ROOT/mnt"; rm -rf "$ROOT"' EXIT

export PYTHONPATH="$SRC"
cd "$ROOT"  # python -c puts the working directory first on sys.path
export XDG_CONFIG_HOME="$ROOT/config" XDG_DATA_HOME="$ROOT/data" XDG_CACHE_HOME="$ROOT/cache"
export HOME="$ROOT" CRYPTFS_PASSPHRASE="v1 vault passphrase" CRYPTFS_SCRYPT_N=16384
cryptfs() { "$PY" -c 'import sys; from cryptfs.cli import main; sys.exit(main())' "$@"; }

"$PY" -c 'import cryptfs, sys; sys.exit(not cryptfs.__file__.startswith(sys.argv[1]))' "$SRC"
cryptfs init "file://$ROOT/store" --chunk-size 65536
mkdir "$ROOT/mnt"
cryptfs mount "$ROOT/mnt"
"$PY" - "$ROOT/mnt" <<'EOF'
import os, random, sys
m = sys.argv[1]
rnd = random.Random(13)
os.mkdir(f"{m}/dir", 0o750)
os.mkdir(f"{m}/dir/sub")
with open(f"{m}/hello.txt", "w") as f:
    f.write("hello from a version 1 vault\n")
with open(f"{m}/dir/chunks.bin", "wb") as f:  # three full chunks and a partial one
    f.write(rnd.randbytes(3 * 65536 + 12345))
with open(f"{m}/dir/sub/small.bin", "wb") as f:
    f.write(rnd.randbytes(1000))
with open(f"{m}/sparse.bin", "wb") as f:  # a hole, then one chunk's worth
    f.seek(2 * 65536)
    f.write(rnd.randbytes(5000))
os.chmod(f"{m}/hello.txt", 0o640)
os.symlink("dir/chunks.bin", f"{m}/link")
os.link(f"{m}/hello.txt", f"{m}/dir/hardlink.txt")
os.setxattr(f"{m}/hello.txt", "user.comment", b"kept since v1")
os.setxattr(f"{m}/dir", "user.tag", b"a directory")
EOF
cryptfs umount "$ROOT/mnt"
rmdir "$ROOT/mnt"
rm -rf "$ROOT/cache"
rm -f "$ROOT"/data/cryptfs/vaults/default/daemon.log
tar -C "$ROOT" --owner=0 --group=0 --numeric-owner --sort=name --mtime=@1796000000 \
    -czf "$OUT" config data store
echo "wrote $OUT ($(stat -c %s "$OUT") bytes)"
