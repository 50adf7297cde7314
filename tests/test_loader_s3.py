"""Reading through an S3 API (moto server on 127.0.0.1, s3fs) gives the same samples as local,
with the shard cache kept under its byte limit."""
import logging
import os
from pathlib import Path

import pytest
import torch

from loader_fixtures import loader_config, make_dataset, take
from loopy_model.data import StreamingLoader, StreamingWindowDataset

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed")
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    creds = dict(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint, **creds)
    client.create_bucket(Bucket="data")
    root = make_dataset(tmp_path_factory.mktemp("s3src"), [5, 8, 3, 9, 7], frames=(12, 60))
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "data", f"ds/{path.relative_to(root).as_posix()}")
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    yield root, "s3://data/ds", options
    server.stop()


def _run(cfg, rank, world, workers=0):
    loader = StreamingLoader(StreamingWindowDataset(cfg, rank=rank, world_size=world), num_workers=workers)
    return list(loader)


def test_s3_matches_local_and_cache_stays_bounded(s3, tmp_path):
    local_root, uri, options = s3
    biggest = max(p.stat().st_size for p in (local_root / "shards").glob("*.tar"))
    limit = int(2.5 * biggest)
    for rank in range(2):
        cfg_local = loader_config(local_root, global_batch_size=8, where="sync_conf >= 0")
        cfg_s3 = loader_config(uri, global_batch_size=8, where="sync_conf >= 0", storage_options=options,
                               cache_dir=str(tmp_path / "cache"), cache_limit_bytes=limit,
                               verify_sha256=True, prefetch_shards=1)
        local = _run(cfg_local, rank, 2)
        remote = _run(cfg_s3, rank, 2, workers=2 if rank else 0)  # rank 1: two processes share the cache
        assert len(local) == len(remote) == 4
        for a, b in zip(local, remote):
            assert a["keys"] == b["keys"]
            for name, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, b[name]), name
    cached = [p for p in Path(tmp_path / "cache").rglob("*.tar")]
    assert cached and sum(p.stat().st_size for p in cached) <= limit
    assert not [p for p in Path(tmp_path / "cache").rglob("*.tmp*")]


def test_s3_resume_state_is_interchangeable_with_local(s3, tmp_path):
    local_root, uri, options = s3
    remote = StreamingLoader(StreamingWindowDataset(
        loader_config(uri, global_batch_size=8, storage_options=options, cache_dir=str(tmp_path)), 0, 1))
    take(remote, 2)
    local = StreamingLoader(StreamingWindowDataset(loader_config(local_root, global_batch_size=8), 0, 1))
    local.load_state_dict(remote.state_dict())  # same shards (sha256) -> same fingerprint
    full = take(StreamingLoader(StreamingWindowDataset(loader_config(local_root, global_batch_size=8), 0, 1)), 3)
    assert take(local, 1)[0]["keys"] == full[2]["keys"]
    assert os.listdir(tmp_path)  # the remote run used its cache
