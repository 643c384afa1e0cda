"""A real S3 API for tests: moto's standalone HTTP server on 127.0.0.1, one fresh bucket per test.

``s3_server`` (session) is a server that tests may stop and start again on the same port (its data
survives: moto keeps it in this process), to simulate an unreachable endpoint.  ``s3_run`` (function)
creates an empty bucket and returns ``(url, storage_options)``; credentials and endpoint travel only
in those options, so no environment variable or global setting leaks into other tests.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

REGION = "us-east-1"
KEY_ID = "AKIATESTKEYID0000000"
SECRET = "test-secret-never-printed-0123456789"  # tests check that it never shows up anywhere


class S3Server:
    """moto's threaded server, stoppable and restartable on the same port."""

    def __init__(self) -> None:
        self.port = 0  # the first start picks a free port; later starts reuse it
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if self._server is None:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        """Stop serving and close the listening socket, so clients get "connection refused" at once."""
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()
            server._server.server_close()

    def client(self) -> Any:
        """A plain boto3 client, independent of the code under test."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET)

    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for this server (few client retries: fault tests stay fast)."""
        return {"key": KEY_ID, "secret": SECRET, "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION},
                "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


    def environment(self) -> dict[str, str]:
        """The environment that points every s3:// URL of a subprocess (a rank of a torch.distributed
        job) at this server: fsspec reads default options for a protocol from ``FSSPEC_<PROTOCOL>``."""
        return {"FSSPEC_S3": json.dumps(self.options())}


class S3Run(NamedTuple):
    url: str
    storage_options: dict[str, Any]
    bucket: str


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one line per request otherwise
    server = S3Server()
    server.start()
    yield server
    server.stop()
    werkzeug_log.setLevel(level)


@pytest.fixture
def s3_run(s3_server: S3Server) -> Iterator[S3Run]:
    """A fresh, empty bucket: ``(url, storage_options, bucket)`` of the run ``s3://<bucket>/run``."""
    s3_server.start()  # a previous test may have stopped it
    bucket = f"unbroken-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=bucket)
    yield S3Run(f"s3://{bucket}/run", s3_server.options(), bucket)
    s3_server.start()
    _drop_bucket(s3_server.client(), bucket)


def _drop_bucket(client: Any, bucket: str) -> None:
    """Delete everything, incomplete multipart uploads included, so moto's memory stays small."""
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)
