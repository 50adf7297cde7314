"""An S3 API on 127.0.0.1 (tests/s3_server.py's moto server) with a bucket ``out``, for the store,
journal, lock, writer and finalisation tests (the ``s3_endpoint`` fixture in conftest.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

BUCKET = "out"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """The endpoint URL of a fresh moto server, stopped on exit."""
    from s3_server import S3Server

    server = S3Server()
    try:
        server.bucket(BUCKET)
        yield server.endpoint
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict:
    """storage_options for s3fs (what a config's ``storage_options:`` section holds)."""
    return {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")
