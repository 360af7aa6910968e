"""A store in an S3 bucket (``s3://bucket[/prefix]``): one S3 object per name, below the prefix.

Contract (on top of :class:`cryptfs.stores.base.ObjectStore`):

* Every botocore/boto3 failure is raised as :class:`StoreError` (or :class:`ObjectNotFound`) with a
  one-line message; nothing else escapes.
* Transient failures (5xx, throttling, connection refused/reset, timeouts, a truncated or corrupt
  response body) are retried with exponential backoff and jitter, a bounded number of times.
* A call gives up within about ``timeout`` seconds: each attempt has connect and read timeouts of
  ``timeout / 4``, and no new attempt starts unless a full read timeout still fits before the
  deadline. (Streaming a body that keeps arriving is not cut off.)
* ``get`` never returns data whose length differs from the object's Content-Length.

Retries are done here rather than by botocore's own retry handler because its backoff (up to
20 s per sleep) knows nothing of a deadline; botocore is configured for exactly one attempt.
"""

from __future__ import annotations

import functools
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cryptfs.errors import CryptfsError, IntegrityError, ObjectNotFound, StoreError
from cryptfs.stores.base import PlainStore, check_range, checked, size_fits, too_large, wrong_size

T = TypeVar("T")

_THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "BandwidthLimitExceeded",
})
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete",
})
_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "403",
})
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_HINT_CREDENTIALS = "check the AWS credentials and the bucket policy"


class _ShortBody(Exception):
    """A GET body ended before its Content-Length; retried like a connection reset."""


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _retry_kind(e: BaseException) -> str | None:
    """``"throttle"`` or ``"transient"`` if ``e`` is worth retrying, else None."""
    if isinstance(e, ClientError):
        if _code(e) in _THROTTLE_CODES or _status(e) == 429:
            return "throttle"
        if _code(e) in _TRANSIENT_CODES or _status(e) in (500, 502, 503, 504):
            return "transient"
        return None
    if isinstance(e, SSLError):
        return None
    if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, ChecksumError,
                      FlexibleChecksumError, _ShortBody, OSError)):
        return "transient"
    return None


class S3Store(PlainStore):
    """Objects in ``bucket``; name ``a/b`` is key ``prefix/a/b``.

    ``endpoint_url`` overrides the endpoint (else boto3 honours ``AWS_ENDPOINT_URL``); credentials
    and region come from the standard AWS chain. The bucket is checked on construction: if it is
    missing, ``create=True`` creates it, otherwise :class:`StoreError` is raised. One boto3 client
    is shared by all threads.
    """

    max_attempts = 10          # per call, including the first
    open_attempts = 3          # for the bucket check in the constructor: fail fast on a bad URL
    base_delay = 0.1           # first backoff for errors and resets (doubles per retry)
    throttle_base_delay = 0.25  # first backoff for SlowDown/429
    max_delay = 5.0
    page_size = 1000           # keys per LIST request

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 create: bool = False, timeout: float = 30.0,
                 profile: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.timeout = float(timeout)
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        query = [f"endpoint={endpoint_url}"] if endpoint_url else []
        if timeout != 30.0:
            query.append(f"timeout={timeout:g}")
        if profile:
            query.append(f"profile={profile}")
        if query:
            self.url += "?" + "&".join(query)
        self._attempt_timeout = max(self.timeout / 4, 0.1)
        custom_endpoint = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                           or os.environ.get("AWS_ENDPOINT_URL"))
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},  # retries are ours, see above
            connect_timeout=self._attempt_timeout,
            read_timeout=self._attempt_timeout,
            max_pool_connections=32,
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
            # no CRC pass over every byte: downloads are authenticated by their AEAD tags, and an
            # upload's body is signed (SigV4's payload SHA-256): the store refuses it damaged
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session(profile_name=profile)
            self._region = session.region_name or "us-east-1"
            self._client = session.client("s3", endpoint_url=endpoint_url,
                                          region_name=self._region, config=config)
        except (BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot set up S3 client for {self.url}: {_one_line(e)}") from None
        self.endpoint = self._client.meta.endpoint_url
        try:
            self._open_bucket(create)
        except BaseException:
            self._client.close()
            raise

    # -- the contract ------------------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        self._call(f"put {name}", functools.partial(
            self._client.put_object, Bucket=self.bucket, Key=key, Body=bytes(data)))

    def get(self, name: str, max_size: int,
            check: Callable[[bytes], bool] | None = None) -> bytes:
        """The object, bounded: the announced Content-Length is checked before the body is
        read, and the body is read with a limit, so a server that lies about the length (or
        sends a chunked body) cannot make this read more than ``max_size + 1`` bytes."""
        key = self._key(name)

        def attempt() -> bytes:
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _code(e) in _NOT_FOUND:
                    raise ObjectNotFound(f"object {name} not found in {self.url}") from None
                raise
            body = resp["Body"]
            expected = resp.get("ContentLength")
            try:
                if expected is not None and expected > max_size:
                    raise too_large(name, int(expected), max_size)
                data = body.read(max_size + 1)
            finally:
                body.close()
            if len(data) > max_size:
                raise too_large(name, None, max_size)
            if expected is not None and len(data) != expected:
                raise _ShortBody(f"got {len(data)} of {expected} bytes")
            return data

        return checked(name, self._call(f"get {name}", attempt), check)

    def get_range(self, name: str, offset: int, length: int, size: int | None) -> bytes:
        """A Range GET; the answer's Content-Range must name exactly this range of an object of
        ``size`` bytes before the body is read (with a limit). A server that ignores Range
        (200, no Content-Range) is read whole, if its Content-Length is ``size``, and sliced."""
        check_range(name, offset, length, size)
        key = self._key(name)

        def attempt() -> bytes:
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=key,
                                               Range=f"bytes={offset}-{offset + length - 1}")
            except ClientError as e:
                if _code(e) in _NOT_FOUND:
                    raise ObjectNotFound(f"object {name} not found in {self.url}") from None
                if _code(e) == "InvalidRange" or _status(e) == 416:
                    raise wrong_size(name, None, size) from None
                raise
            body = resp["Body"]
            try:
                m = _CONTENT_RANGE.fullmatch(str(resp.get("ContentRange") or ""))
                whole = m is None and size is not None and resp.get("ContentLength") == size
                if whole:
                    assert size is not None
                    want, skip = size, offset
                elif m is None or not size_fits(int(m[3]), size, offset, length):
                    raise wrong_size(name, None if m is None else int(m[3]), size)
                elif (int(m[1]), int(m[2])) != (offset, offset + length - 1):
                    raise IntegrityError(f"object {name}: S3 answered bytes {m[1]}-{m[2]} for "
                                         f"{offset}-{offset + length - 1}")
                else:
                    want, skip = length, 0
                data = body.read(want + 1)
            finally:
                body.close()
            if len(data) > want:
                raise wrong_size(name, None, size)
            if len(data) < want:
                raise _ShortBody(f"got {len(data)} of {want} bytes")
            return data[skip : skip + length] if whole else data

        return self._call(f"get {name} (range)", attempt)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create ``name`` only if it does not exist yet (an S3 conditional write,
        ``If-None-Match: *``); False if it exists. A server without conditional writes
        overwrites: callers read the object back to confirm."""
        key = self._key(name)

        def attempt() -> bool:
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data),
                                        IfNoneMatch="*")
                return True
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise

        return self._call(f"put {name}", attempt)

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call(f"delete {name}", functools.partial(
            self._client.delete_object, Bucket=self.bucket, Key=key))

    def _objects(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(name, listing entry)`` in name order. Pages are fetched (and retried) one at a
        time, following continuation tokens, so a failure mid-way does not restart the listing."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key_prefix + prefix,
                                "MaxKeys": self.page_size}
        skip = len(self._key_prefix)
        while True:
            page = self._call(f"list {prefix or '(all)'}",
                              functools.partial(self._client.list_objects_v2, **args))
            for obj in page.get("Contents", ()):
                yield obj["Key"][skip:], obj
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        for name, obj in self._objects(prefix):
            yield name, int(obj["Size"])

    def list_aged(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        """Like :meth:`list`, with each object's modification time (seconds since the epoch)."""
        for name, obj in self._objects(prefix):
            mod = obj.get("LastModified")
            yield name, int(obj["Size"]), mod.timestamp() if mod is not None else 0.0

    def exists(self, name: str) -> bool:
        key = self._key(name)

        def attempt() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
                return True
            except ClientError as e:
                if _status(e) == 404:
                    return False
                raise

        return self._call(f"check {name}", attempt)

    def sync(self) -> None:
        """Nothing to do: an object is durable once its PUT is acknowledged."""

    def close(self) -> None:
        self._client.close()

    # -- internals ---------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise StoreError(f"invalid object name {name!r}")
        return self._key_prefix + name

    def _open_bucket(self, create: bool) -> None:
        def probe() -> bool:
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return True
            except ClientError as e:
                if _status(e) == 404 or _code(e) == "NoSuchBucket":
                    return False
                raise

        if self._call(f"open bucket {self.bucket}", probe, attempts=self.open_attempts):
            return
        if not create:
            raise StoreError(f"bucket {self.bucket} does not exist at {self.endpoint}",
                             hint="check the URL and endpoint, or create it with 'cryptfs init'")

        def make() -> None:
            args: dict[str, Any] = {"Bucket": self.bucket}
            if self._region != "us-east-1":
                args["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
            try:
                self._client.create_bucket(**args)
            except ClientError as e:
                if _code(e) != "BucketAlreadyOwnedByYou":
                    raise

        self._call(f"create bucket {self.bucket}", make)

    def _call(self, what: str, op: Callable[[], T], attempts: int | None = None) -> T:
        """Run ``op``, retrying transient failures with backoff until ``attempts`` (default
        :attr:`max_attempts`) are used up or the deadline nears; translate the final error."""
        start = time.monotonic()
        deadline = start + self.timeout
        limit = attempts or self.max_attempts
        attempt = 0
        while True:
            attempt += 1
            try:
                return op()
            except CryptfsError:
                raise
            except (BotoCoreError, ClientError, _ShortBody, OSError) as e:
                kind = _retry_kind(e)
                if kind is not None and attempt < limit:
                    base = self.throttle_base_delay if kind == "throttle" else self.base_delay
                    cap = min(self.max_delay, base * 2 ** (attempt - 1))
                    delay = cap / 2 + random.uniform(0, cap / 2)
                    if time.monotonic() + delay + self._attempt_timeout <= deadline:
                        time.sleep(delay)
                        continue
                raise self._error(e, what, attempt, time.monotonic() - start) from None

    def _error(self, e: BaseException, what: str, attempts: int, elapsed: float) -> StoreError:
        """A one-line StoreError for the final failure ``e`` of operation ``what``."""
        where = f"S3 endpoint {self.endpoint}"
        tries = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f}s"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"no usable AWS credentials for {self.url}: {_one_line(e)}",
                              hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                   "or configure an AWS profile")
        if isinstance(e, ClientError):
            code, status = _code(e), _status(e)
            message = _one_line(e.response.get("Error", {}).get("Message", "") or "")
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket} does not exist at {self.endpoint}",
                                  hint="check the URL and endpoint, or create it with "
                                       "'cryptfs init'")
            if code in _DENIED_CODES or status == 403:
                return StoreError(f"access denied by S3 to {what} in {self.url} ({code})",
                                  hint=_HINT_CREDENTIALS)
            if _retry_kind(e) == "throttle":
                return StoreError(f"S3 kept throttling requests ({code}) during {what} in "
                                  f"{self.url}; {tries}", hint="reduce the load or retry later")
            if _retry_kind(e) == "transient":
                return StoreError(f"S3 server error {status} {code} during {what} in "
                                  f"{self.url}; {tries}")
            detail = f"{code}: {message}" if message else code or str(status)
            return StoreError(f"S3 refused {what} in {self.url}: {detail}")
        if isinstance(e, SSLError):
            return StoreError(f"TLS error talking to {where}: {_one_line(e)}")
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
            return StoreError(f"cannot reach {where} for {what}; {tries}",
                              hint="check the endpoint URL and the network")
        if isinstance(e, ReadTimeoutError):
            return StoreError(f"{where} did not answer {what} in time; {tries}")
        if _retry_kind(e) == "transient":
            return StoreError(f"connection to {where} broken during {what}; {tries}")
        return StoreError(f"S3 error during {what} in {self.url}: {_one_line(e)}")
