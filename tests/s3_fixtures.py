"""Pytest fixtures for S3: one real moto server process per test run, a fresh bucket per test.

* ``s3_server`` (session): a running :class:`MotoServer`. While it runs, ``os.environ`` holds
  dummy AWS credentials and region, AWS config files point to /dev/null, instance metadata is
  disabled and ``AWS_ENDPOINT_URL``/``AWS_PROFILE`` are removed, so boto3 (also in subprocesses
  the tests start) never looks beyond the test machine. Tests pass the endpoint explicitly.
* ``s3_client`` (session): a boto3 S3 client for that server, to inspect or tamper with objects.
* ``s3_bucket`` (function): the name of a new, empty bucket; emptied and deleted afterwards.
* ``s3_url`` (function): ``s3://<bucket>/vault?endpoint=<endpoint>`` for :func:`open_store`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from s3server import MotoServer

_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
_REMOVED_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _DUMMY_ENV.items():
            mp.setenv(name, value)
        for name in _REMOVED_ENV:
            mp.delenv(name, raising=False)
        with MotoServer() as server:
            yield server


@pytest.fixture(scope="session")
def s3_client(s3_server: MotoServer) -> Iterator[Any]:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"mode": "standard", "max_attempts": 3}))
    yield client
    client.close()


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[str]:
    name = f"cryptfs-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    try:
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", ()):
                s3_client.delete_object(Bucket=name, Key=obj["Key"])
        s3_client.delete_bucket(Bucket=name)
    except Exception:  # best effort: the server may be gone or the test deleted the bucket
        pass


@pytest.fixture
def s3_url(s3_server: MotoServer, s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/vault?endpoint={s3_server.endpoint}"
