"""An in-memory store for unit tests of the layers above the stores."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from cryptfs.errors import ObjectNotFound
from cryptfs.stores.base import PlainStore, check_range, checked, size_fits, too_large, wrong_size


class MemoryStore(PlainStore):
    """Objects in a dict. Not persistent; for tests only."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        with self._lock:
            self.objects[name] = bytes(data)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        with self._lock:
            if name in self.objects:
                return False
            self.objects[name] = bytes(data)
            return True

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        with self._lock:
            try:
                data = self.objects[name]
            except KeyError:
                raise ObjectNotFound(f"object {name} not found in {self.url}") from None
        if len(data) > max_size:
            raise too_large(name, len(data), max_size)
        return checked(name, data, check)

    def get_range(self, name: str, offset: int, length: int, size: int | None) -> bytes:
        check_range(name, offset, length, size)
        with self._lock:
            try:
                data = self.objects[name]
            except KeyError:
                raise ObjectNotFound(f"object {name} not found in {self.url}") from None
        if not size_fits(len(data), size, offset, length):
            raise wrong_size(name, len(data), size)
        return data[offset : offset + length]

    def delete(self, name: str) -> None:
        with self._lock:
            self.objects.pop(name, None)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        with self._lock:
            items = sorted((n, len(d)) for n, d in self.objects.items() if n.startswith(prefix))
        yield from items

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        """Like :meth:`list`; a memory store keeps no times, so every object is new."""
        now = time.time()
        for name, size in self.list(prefix):
            yield name, size, now

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self.objects

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
