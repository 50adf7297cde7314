"""An S3 API on loopback for the object-store tests: moto's server in a thread of the test process.

The job reaches it the way it reaches any S3-compatible store in production, through the standard
environment (``env()``: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which botocore/s3fs read in the
driver, and which Ray workers inherit from the process that starts their node (an embedded Ray:
the job; a cluster: the nodes' environment, or the job's runtime env).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class S3Server:
    def __init__(self):
        moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
        pytest.importorskip("s3fs", reason="s3fs is not installed")
        boto3 = pytest.importorskip("boto3")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.endpoint = "http://{}:{}".format(*self._server.get_host_and_port())
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        """The storage environment a job gets (a Kubernetes Secret's keys in production)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def storage_options(self) -> dict:
        """fsspec/s3fs options for readers in the test process (the trainer's loader)."""
        return {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> str:
        """Every file under ``local`` to s3://bucket/prefix/...; returns that URI."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def keys(self, bucket: str, prefix: str) -> list[str]:
        """Names of the objects under s3://bucket/prefix/, relative to it, sorted."""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            names += [o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])]
        return sorted(names)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def download(self, bucket: str, prefix: str, dest: Path) -> Path:
        """A local copy of s3://bucket/prefix/ (the checks written for local outputs then apply)."""
        for name in self.keys(bucket, prefix):
            target = Path(dest) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(bucket, f"{prefix}/{name}"))
        return Path(dest)

    def open_multipart_uploads(self, bucket: str, prefix: str) -> list[str]:
        """Keys of multipart uploads started and never completed nor aborted (a killed writer's)."""
        r = self.client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/")
        return sorted(u["Key"] for u in r.get("Uploads", []))
