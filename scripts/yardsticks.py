#!/usr/bin/env python3
"""Two floors for `scripts/bench`: the passthrough (scripts/passthrough.py, same binding and
mount options) plus only the one cost an encrypted filesystem of its kind cannot avoid.

    python scripts/yardsticks.py aes SRC MNT
        Each file's data is stored in SRC as AES-256-GCM segments of 16 KiB plaintext plus a
        16-byte tag (cryptfs's chunk segments, without the rest of a chunk: no names, hashes,
        padding or metadata), and every read decrypts the segments it covers. The ceiling of
        a filesystem on this binding that decrypts what it reads, in this language: the
        "sequential read, cold" of cryptfs on the local store can be compared with it.
    python scripts/yardsticks.py s3 MNT ENDPOINT BUCKET
        Files live in memory only as far as their size; their data goes to the S3 server at
        ENDPOINT in objects of 1 MiB (the cryptfs chunk size on S3), uploaded by 8 threads with
        boto3 (its default client configuration, as the bench's boto3 baseline), and
        fsync/flush/close wait for the uploads: the ceiling of a filesystem on this binding
        that stores what it is given in S3 through boto3, nothing sealed, hashed or recorded.
        Only sequential writes from offset 0 (the bench's sequential write), no reads.

Both run in the foreground until unmounted (`fusermount3 -u MNT`). They are measuring
instruments, not filesystems: the key of ``aes`` is a constant, writes are taken only in order
(``aes``: a partial segment only at a file's end), and neither keeps anything across mounts
but ``aes``'s SRC. Not imported by cryptfs.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import passthrough  # noqa: E402

SEG = 16 << 10  # plaintext bytes per segment
STORED = SEG + 16  # with its tag
KEY = bytes(range(32))  # a measuring instrument: nothing here is secret
AAD = b"cryptfs/chunk/v1\0" + bytes(16) + b"d" * 67  # as long as a chunk's associated data
OBJECT = 1 << 20


def nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def plain_size(stored: int) -> int:
    whole, rest = divmod(stored, STORED)
    return whole * SEG + max(rest - 16, 0)


def aes_operations(binding, src: str):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(KEY)

    class Aes(passthrough.PassthroughOps):
        """Reads decrypt, writes encrypt; a write's partial last segment waits (per open
        file) for the rest of it, or for flush/close."""

        def __init__(self, root: str, get_context) -> None:
            super().__init__(root, get_context)
            self._tails: dict[int, tuple[int, bytearray]] = {}  # fh: (segment, plaintext)

        def getattr(self, path, fh=None):
            d = super().getattr(path, fh)
            if stat.S_ISREG(d["st_mode"]):
                d["st_size"] = plain_size(d["st_size"])
            return d

        def read(self, path, size, offset, fh):
            first = offset // SEG
            data = memoryview(os.pread(fh, ((offset + size + SEG - 1) // SEG - first) * STORED,
                                       first * STORED))
            out = bytearray(plain_size(len(data)))
            view, at = memoryview(out), 0
            for k in range(0, len(data), STORED):
                sealed = data[k : k + STORED]
                aead.decrypt_into(nonce(first + k // STORED), sealed, AAD,
                                  view[at : at + len(sealed) - 16])
                at += len(sealed) - 16
            skip = offset - first * SEG
            return bytes(view[skip : skip + size])

        def write(self, path, data, offset, fh):
            index, tail = self._tails.pop(fh, (offset // SEG, bytearray()))
            if offset != index * SEG + len(tail):
                raise OSError(errno.EINVAL, "the aes yardstick takes writes in order only")
            tail += data
            whole = len(tail) // SEG * SEG
            if whole:
                sealed = b"".join(aead.encrypt(nonce(index + k // SEG), tail[k : k + SEG], AAD)
                                  for k in range(0, whole, SEG))
                os.pwrite(fh, sealed, index * STORED)
            if whole < len(tail):
                self._tails[fh] = (index + whole // SEG, tail[whole:])
            return len(data)

        def _seal_tail(self, fh: int) -> None:
            index, tail = self._tails.pop(fh, (0, bytearray()))
            if tail:
                os.pwrite(fh, aead.encrypt(nonce(index), bytes(tail), AAD), index * STORED)

        def flush(self, path, fh):
            self._seal_tail(fh)
            return 0

        def fsync(self, path, datasync, fh):
            self._seal_tail(fh)
            return super().fsync(path, datasync, fh)

        def truncate(self, path, length, fh=None):
            if length:
                raise OSError(errno.EINVAL, "the aes yardstick truncates to 0 only")
            return super().truncate(path, 0, fh)

    return type("AesYardstick", (Aes, binding.Operations), {})(src, binding.fuse_get_context)


def s3_operations(binding, endpoint: str, bucket: str):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    pool = ThreadPoolExecutor(8)

    class File:
        def __init__(self, ino: int) -> None:
            self.ino, self.size, self.buf, self.objects = ino, 0, bytearray(), 0
            self.pending: list[Future] = []

        def upload(self, body: bytes) -> None:
            self.pending.append(pool.submit(client.put_object, Bucket=bucket,
                                            Key=f"{self.ino}/{self.objects}", Body=body))
            self.objects += 1

    class S3(binding.Operations):
        use_ns = True

        def __init__(self) -> None:
            self.files: dict[str, File] = {}
            self.dirs = {"/": 1}  # path: inode number
            self.lock = threading.Lock()
            self.next_ino = 1

        def _attrs(self, mode: int, size: int, ino: int) -> dict:
            now = time.time_ns()
            return {"st_mode": mode, "st_nlink": 1, "st_size": size, "st_ino": ino,
                    "st_atime": now, "st_mtime": now, "st_ctime": now}

        def getattr(self, path, fh=None):
            if path in self.dirs:
                return self._attrs(stat.S_IFDIR | 0o755, 0, self.dirs[path])
            f = self.files.get(path)
            if f is None:
                raise OSError(errno.ENOENT, "no such file")
            return self._attrs(stat.S_IFREG | 0o644, f.size, f.ino)

        def readdir(self, path, fh):
            inside = [p for p in (*self.dirs, *self.files) if os.path.dirname(p) == path]
            return [".", "..", *(os.path.basename(p) for p in inside if p != "/")]

        def _ino(self) -> int:
            with self.lock:
                self.next_ino += 1
                return self.next_ino

        def mkdir(self, path, mode):
            self.dirs[path] = self._ino()
            return 0

        def create(self, path, mode, fi=None):
            self.files[path] = File(self._ino())
            return 0

        def open(self, path, flags):
            return 0

        def truncate(self, path, length, fh=None):
            if length:
                raise OSError(errno.EINVAL, "the s3 yardstick truncates to 0 only")
            self.files[path] = File(self.files[path].ino)
            return 0

        def write(self, path, data, offset, fh):
            f = self.files[path]
            if offset != f.size:
                raise OSError(errno.EINVAL, "the s3 yardstick takes writes in order only")
            f.buf += data
            f.size += len(data)
            while len(f.buf) >= OBJECT:
                f.upload(bytes(f.buf[:OBJECT]))
                del f.buf[:OBJECT]
            return len(data)

        def _sync(self, path) -> int:
            f = self.files.get(path)
            if f is not None:
                if f.buf:
                    f.upload(bytes(f.buf))
                    f.buf = bytearray()
                pending, f.pending = f.pending, []
                for p in pending:
                    p.result()
            return 0

        def flush(self, path, fh):
            return self._sync(path)

        def fsync(self, path, datasync, fh):
            return self._sync(path)

        def release(self, path, fh):
            return 0

        def unlink(self, path):
            del self.files[path]
            return 0

    return S3()


def main(argv: list[str]) -> int:
    usage = "usage: yardsticks.py aes SRC MNT | yardsticks.py s3 MNT ENDPOINT BUCKET"
    if len(argv) < 1 or (argv[0], len(argv)) not in (("aes", 3), ("s3", 4)):
        print(usage, file=sys.stderr)
        return 2
    binding = passthrough.load_binding("mfusepy")
    if argv[0] == "aes":
        ops, mnt = aes_operations(binding, argv[1]), argv[2]
    else:
        ops, mnt = s3_operations(binding, argv[2], argv[3]), argv[1]
    options = passthrough.mount_options("mfusepy")
    options["fsname"] = f"yardstick-{argv[0]}"
    binding.FUSE(ops, mnt, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
