"""Object stores and :func:`open_store`, which picks one from a store URL.

Supported URLs:

* ``file:///absolute/path`` -- :class:`LocalStore`, one file per object;
* ``s3://bucket[/prefix][?endpoint=http://host:port][&timeout=SECONDS][&profile=NAME]`` --
  :class:`S3Store`; ``timeout`` bounds each call including retries (default 30 s); ``endpoint``
  overrides ``AWS_ENDPOINT_URL``; ``profile`` takes the credentials of that AWS profile (so each
  store of a replicated vault can have its own);
* ``memory://`` -- :class:`MemoryStore`, a new empty store each time (tests only).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from cryptfs.errors import UsageError
from cryptfs.stores.base import ObjectStore

__all__ = ["ObjectStore", "open_store", "SUPPORTED_URLS"]

SUPPORTED_URLS = "file:///path, s3://bucket[/prefix][?endpoint=URL], memory://"
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


def open_store(url: str, create: bool = False) -> ObjectStore:
    """Open the store named by ``url``. With ``create=True`` a missing local directory or S3
    bucket is created (for ``cryptfs init``); otherwise it is a :class:`StoreError`. A malformed
    URL or unknown scheme is a :class:`UsageError`."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UsageError(f"malformed store URL {url!r}: {e}; use {SUPPORTED_URLS}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _open_file(url, parts.netloc, parts.path, parts.query or parts.fragment, create)
    if scheme == "s3":
        return _open_s3(url, parts.netloc, parts.path, parts.query, parts.fragment, create)
    if scheme == "memory":
        from cryptfs.stores.memory import MemoryStore
        return MemoryStore(url)
    if not scheme:
        raise UsageError(f"store URL {url!r} has no scheme; use {SUPPORTED_URLS}")
    raise UsageError(f"unsupported store URL scheme {scheme!r} in {url!r}; use {SUPPORTED_URLS}")


def _open_file(url: str, host: str, path: str, extra: str, create: bool) -> ObjectStore:
    from cryptfs.stores.local import LocalStore

    if host not in ("", "localhost") or not path.startswith("/") or extra:
        raise UsageError(f"malformed store URL {url!r}; use file:///absolute/path")
    return LocalStore(_unquote_strict(url, path), create=create)


def _unquote_strict(url: str, text: str) -> str:
    """Percent-decode a URL path: it must decode to UTF-8 without NUL or control characters
    (``%00`` or ``%ff`` is a malformed URL, not a different path)."""
    try:
        out = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        out = "\0"
    if any(ord(c) < 32 or ord(c) == 127 for c in out):
        raise UsageError(f"malformed store URL {url!r}: the path must decode to UTF-8 text "
                         "without control characters")
    return out


def _open_s3(url: str, bucket: str, path: str, query: str, fragment: str,
             create: bool) -> ObjectStore:
    if not _BUCKET.fullmatch(bucket):
        raise UsageError(f"malformed store URL {url!r}: {bucket!r} is not a bucket name; "
                         "use s3://bucket[/prefix][?endpoint=URL]")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        params = {"": []}
    unknown = sorted(set(params) - {"endpoint", "timeout", "profile"})
    if unknown or fragment or any(len(v) > 1 for v in params.values()):
        raise UsageError(f"malformed store URL {url!r}: the query parameters allowed are "
                         "endpoint=URL, timeout=SECONDS and profile=NAME, once each")
    timeout = 30.0
    if "timeout" in params:
        try:
            timeout = float(params["timeout"][0])
        except ValueError:
            timeout = -1
        if not 1 <= timeout <= 600:
            raise UsageError(f"malformed store URL {url!r}: timeout must be 1 to 600 seconds")
    endpoint = params["endpoint"][0] if "endpoint" in params else None
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise UsageError(f"malformed store URL {url!r}: endpoint {endpoint!r} is not an "
                             "http:// or https:// URL")
    from cryptfs.stores.s3 import S3Store  # boto3 is slow to import; only load it when needed

    profile = params["profile"][0] if "profile" in params else None
    return S3Store(bucket, _unquote_strict(url, path).strip("/"), endpoint_url=endpoint,
                   create=create, timeout=timeout, profile=profile)
