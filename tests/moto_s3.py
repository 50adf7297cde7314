"""An S3 API on 127.0.0.1 (moto's ThreadedMotoServer) with a bucket ``out``, for the journal and
output-lock tests (tests/test_journal.py, tests/test_output_lock.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

BUCKET = "out"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """The endpoint URL of a fresh moto server, stopped on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    try:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict:
    """storage_options for s3fs (what a config's ``storage_options:`` section holds)."""
    return {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")
