"""Corrupt and missing shards (issue 12): the loader retries, then skips the shard with a warning
naming it, counts it per reason, and reads stand-in clips in its place (docs/loader.md "Faults");
the epoch keeps its length, and the same faults give the same batches on resume and with any
number of workers. Training on such a dataset runs to the end with the counters in metrics.csv."""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from loader_fixtures import loader_config, make_dataset, take
from loopy_model.data import StreamingLoader, StreamingWindowDataset
from loopy_model.data.store import NoReadableShardError

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(global_batch_size=4, retry_backoff_s=0.01)  # 20 clips -> 5 batches; retries in ms


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("faults"), [4, 4, 4, 4, 4], frames=(12, 20))


@pytest.fixture(scope="module")
def clean_epoch(clean):
    return _epoch(clean)


def _epoch(root, workers=0, **cfg):
    loader = StreamingLoader(StreamingWindowDataset(loader_config(root, **{**FAST, **cfg}), 0, 1),
                             num_workers=workers)
    return list(loader), loader


def _index(root) -> dict:
    return json.loads((root / "index.json").read_text())


def _shard(root, i) -> tuple[Path, list[str]]:
    entry = _index(root)["shardlist"][i]
    return root / entry["url"], entry["keys"]


def _write(path: Path, data: bytes) -> None:
    path.unlink()  # shards are written read-only
    path.write_bytes(data)


def _rewrite_members(root, i, change) -> Path:
    """Rewrite shard ``i`` with ``change(name, bytes) -> bytes | None`` (None drops the member) and
    fix index.json's filesize and sha256: only the tar's content is wrong, as in a bad writer."""
    path, _ = _shard(root, i)
    buf = io.BytesIO()
    with tarfile.open(path, "r:") as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for m in src:
            data = change(m.name, src.extractfile(m).read())
            if data is not None:
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    _write(path, buf.getvalue())
    index = _index(root)
    index["shardlist"][i].update(filesize=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (root / "index.json").write_text(json.dumps(index))
    return path


def _in_member(member, edit):
    return lambda name, data: edit(data) if name.endswith(member) else data


def _object_npy(_data):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npy_rows_cut(data):  # header intact, last rows gone
    return data[:-64]


def _npy_bad_magic(data):
    return b"\x93NUMPZ" + data[6:]


def _truncate(root, i):
    path, _ = _shard(root, i)
    _write(path, path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(root, i):
    path, _ = _shard(root, i)
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF  # same size: only the sha256 sees it
    _write(path, bytes(data))


def _not_a_tar(root, i):
    path, _ = _shard(root, i)
    _write(path, b"<html>503</html>".ljust(path.stat().st_size, b" "))


CORRUPT = [  # (id, corrupt(root, shard), extra loader config, problem named in the warning)
    ("truncated_tar", _truncate, {}, "truncated"),
    ("sha256_mismatch", _flip_byte, {"verify_sha256": True}, "sha256 mismatch"),
    ("not_a_tar", _not_a_tar, {}, "not a readable tar shard"),
    ("npy_bad_header", lambda r, i: _rewrite_members(r, i, _in_member("vid006_0006.audio.npy", _npy_bad_magic)), {},
     "vid006_0006.audio.npy: not a readable .npy header"),
    ("npy_wrong_size", lambda r, i: _rewrite_members(r, i, _in_member("vid007_0000.kps.npy", _npy_rows_cut)), {},
     "vid007_0000.kps.npy: truncated .npy member"),
    ("npy_object_dtype", lambda r, i: _rewrite_members(r, i, _in_member("vid005_0005.latent.npy", _object_npy)), {},
     "vid005_0005.latent.npy: only C-order, non-object"),
    ("member_missing", lambda r, i: _rewrite_members(r, i, lambda n, d: None if n == "vid004_0004.motion.npy" else d),
     {}, "sample 'vid004_0004' has no member 'motion.npy'"),
]


def _assert_stand_ins(batches, clean_batches, bad_keys: set[str]) -> int:
    """Same steps as the clean epoch; a clip of the bad shard is replaced (flagged, same position),
    every other position holds the clean run's clip with bit-identical tensors. Returns the count."""
    assert [b["batch_index"] for b in batches] == [b["batch_index"] for b in clean_batches]
    stand_ins = 0
    for got, want in zip(batches, clean_batches):
        assert torch.equal(got["sample_position"], want["sample_position"])
        for row, key in enumerate(want["keys"]):
            if key in bad_keys:
                assert got["is_stand_in"][row] and got["keys"][row] not in bad_keys
                stand_ins += 1
                continue
            assert not got["is_stand_in"][row] and got["keys"][row] == key
            for name, value in want.items():
                if isinstance(value, torch.Tensor) and name != "is_stand_in":
                    assert torch.equal(got[name][row], value[row]), (key, name)
    return stand_ins


@pytest.mark.parametrize("name,corrupt,extra,problem", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_shard_is_skipped_counted_and_named(clean, clean_epoch, tmp_path, caplog, name, corrupt, extra,
                                                    problem):
    root = Path(shutil.copytree(clean, tmp_path / "ds"))
    corrupt(root, 1)
    path, bad_keys = _shard(root, 1)
    with caplog.at_level(logging.WARNING, logger="loopy_model.data"):
        batches, loader = _epoch(root, **extra)
    n = _assert_stand_ins(batches, clean_epoch[0], set(bad_keys))
    assert n == sum(k in bad_keys for b in clean_epoch[0] for k in b["keys"]) > 0
    assert loader.fault_stats() == {"skipped_shards": 1, "skipped_missing": 0, "skipped_corrupt": 1,
                                    "skipped_unavailable": 0, "stand_in_clips": n}
    assert list(loader.skipped_shards) == ["shards/shard-000001.tar"]
    warned = [r.getMessage() for r in caplog.records if "skipping shard" in r.getMessage()]
    assert len(warned) == 1 and "shards/shard-000001.tar" in warned[0] and problem in warned[0], warned


def test_skip_is_deterministic_across_workers_and_resume(clean, tmp_path):
    """One corrupt and one missing shard: 2 DataLoader workers give the batches of 0 workers, and a
    run resumed after 2 steps (in a new loader) continues with exactly the uninterrupted batches."""
    root = Path(shutil.copytree(clean, tmp_path / "ds"))
    _truncate(root, 0)
    _shard(root, 3)[0].unlink()
    whole, loader = _epoch(root)
    assert loader.fault_stats()["skipped_shards"] == 2
    two_workers, _ = _epoch(root, workers=2)
    first = StreamingLoader(StreamingWindowDataset(loader_config(root, **FAST), 0, 1))
    take(first, 2)
    resumed = StreamingLoader(StreamingWindowDataset(loader_config(root, **FAST), 0, 1))
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    for other in (two_workers, whole[:2] + rest):
        assert len(other) == len(whole)
        for a, b in zip(whole, other):
            assert a["keys"] == b["keys"]
            for name, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, b[name]), name


def test_missing_local_shard_gets_few_retries_then_is_skipped(clean, clean_epoch, tmp_path, caplog):
    root = Path(shutil.copytree(clean, tmp_path / "ds"))
    path, bad_keys = _shard(root, 2)
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="loopy_model.data"):
        batches, loader = _epoch(root, retries=5, permanent_retries=2)
    _assert_stand_ins(batches, clean_epoch[0], set(bad_keys))
    retries = [r.getMessage() for r in caplog.records
               if "shard-000002.tar" in r.getMessage() and "; retry " in r.getMessage()]
    assert [m.split("; retry ")[1].split(" ")[0] for m in retries] == ["1/2", "2/2"], retries  # not 5
    assert loader.fault_stats()["skipped_missing"] == 1
    assert "missing: " in loader.skipped_shards["shards/shard-000002.tar"]


def test_every_shard_gone_is_an_error_naming_them(clean, tmp_path):
    root = Path(shutil.copytree(clean, tmp_path / "ds"))
    for p in (root / "shards").glob("*.tar"):
        p.unlink()
    with pytest.raises(NoReadableShardError) as err:
        _epoch(root)
    msg = str(err.value)
    assert str(root) in msg and "could not be read" in msg and msg.count("(missing)") == 5, msg


def test_failures_in_a_row_stop_the_store_and_a_success_resets_the_count(clean, tmp_path):
    """``max_failed_in_a_row`` failed fetches with none readable between: the storage is gone."""
    from loopy_model.data.index import DatasetIndex
    from loopy_model.data.store import MissingShardError, ShardStore

    root = Path(shutil.copytree(clean, tmp_path / "ds"))
    for i in (0, 1, 3):
        _shard(root, i)[0].unlink()
    store = ShardStore(DatasetIndex.load(str(root)), backoff_s=0.001, max_failed_in_a_row=2)
    try:
        with pytest.raises(MissingShardError, match="shard-000000.tar: not in storage"):
            store.open(0)
        store.open(2)  # readable: the count starts again
        with pytest.raises(MissingShardError):
            store.open(3)
        with pytest.raises(MissingShardError):
            store.open(0)  # known already: raised again at once, not counted twice
        with pytest.raises(NoReadableShardError, match=r"the last 2 shards fetched could not be read") as err:
            store.open(1)
        assert "shard-000001.tar (missing)" in str(err.value) and "shard-000003.tar (missing)" in str(err.value)
    finally:
        store.close()


class _FaultyServer(SimpleHTTPRequestHandler):
    """Static files; ``status[path]`` answers with that HTTP status instead (a fixed int, or a list
    consumed one request at a time); every request is counted per path."""
    status: dict = {}
    requests: Counter = Counter()

    def _fault(self):
        self.requests[self.path] += 1
        code = self.status.get(self.path)
        if isinstance(code, list):
            code = code.pop(0) if code else None
        if code:
            self.send_error(code)
            return True
        return False

    def do_GET(self):
        if not self._fault():
            super().do_GET()

    def do_HEAD(self):
        if not self._fault():
            super().do_HEAD()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_dataset(clean, tmp_path):
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")
    root = Path(shutil.copytree(clean, tmp_path / "ds"))
    handler = type("Handler", (_FaultyServer,), {"status": {}, "requests": Counter()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler, tmp_path / "cache"
    server.shutdown()


def test_http_transient_errors_are_retried_404_reported(clean, http_dataset, clean_epoch, caplog):
    """Over HTTP: a shard answering 503 twice is read on a later try (nothing skipped); a shard
    answering 503 always is skipped as unavailable after all retries; a 404 is skipped as missing
    after the few permanent retries -- fewer requests than the 503s got."""
    uri, handler, cache = http_dataset
    handler.status.update({"/shards/shard-000000.tar": [503, 503], "/shards/shard-000002.tar": 503,
                           "/shards/shard-000004.tar": 404})
    cfg = dict(cache_dir=str(cache), retries=3, permanent_retries=1)
    with caplog.at_level(logging.WARNING, logger="loopy_model.data"):
        batches, loader = _epoch(uri, **cfg)
    assert loader.fault_stats() == {"skipped_shards": 2, "skipped_missing": 1, "skipped_corrupt": 0,
                                    "skipped_unavailable": 1, "stand_in_clips": loader.stand_in_clips}
    assert "503" in loader.skipped_shards["shards/shard-000002.tar"]
    assert loader.skipped_shards["shards/shard-000004.tar"].startswith("missing: ")
    bad = set(_shard(clean, 2)[1] + _shard(clean, 4)[1])  # the server serves a copy of clean
    assert _assert_stand_ins(batches, clean_epoch[0], bad) == loader.stand_in_clips > 0
    retried = lambda shard: [r.getMessage().split("; retry ")[1].split(" ")[0] for r in caplog.records  # noqa: E731
                             if f"download shards/{shard}" in r.getMessage()]
    assert retried("shard-000000.tar") and "shards/shard-000000.tar" not in loader.skipped_shards  # recovered
    assert retried("shard-000002.tar") == ["1/3", "2/3", "3/3"]  # transient: every retry
    assert retried("shard-000004.tar") == ["1/1"]  # permanent: the few
    assert handler.requests["/shards/shard-000004.tar"] < handler.requests["/shards/shard-000002.tar"]


def test_s3_missing_object_is_skipped(clean, clean_epoch, tmp_path):
    """A shard deleted from the bucket (moto's S3 API on 127.0.0.1): skipped as missing."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket="data")
        for path in clean.rglob("*"):
            if path.is_file() and path.name != "shard-000003.tar":
                client.upload_file(str(path), "data", f"ds/{path.relative_to(clean).as_posix()}")
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        batches, loader = _epoch("s3://data/ds", storage_options=options, cache_dir=str(tmp_path / "cache"))
    finally:
        server.stop()
    _, bad_keys = _shard(clean, 3)
    assert _assert_stand_ins(batches, clean_epoch[0], set(bad_keys)) == loader.stand_in_clips > 0
    assert loader.fault_stats()["skipped_missing"] == 1
    assert "s3://data/ds/shards/shard-000003.tar: not in storage" in loader.skipped_shards["shards/shard-000003.tar"]


def test_training_runs_through_corrupt_and_missing_shards(tmp_path):
    """jobs/train.py (tiny preset, 2 loader workers) on 4 shards of which shard 0 is truncated
    (the one the trainer first inspects for the data layout), shard 2 is gone and shard 3 has one
    byte flipped (seen by --verify-shards): it finishes, names the three shards, and metrics.csv
    counts them."""
    root = make_dataset(tmp_path / "ds", [2, 2, 2, 2], frames=(20, 30))
    _truncate(root, 0)
    _shard(root, 2)[0].unlink()
    _flip_byte(root, 3)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(root), "--stage", "1",
                        "--preset", "tiny", "--out", str(out), "--max-steps", "3", "--batch-size", "2",
                        "--precision", "no", "--loader-workers", "2", "--no-progress", "--verify-shards"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    for shard in ("shards/shard-000000.tar", "shards/shard-000002.tar", "shards/shard-000003.tar"):
        assert f"skipping shard {shard}" in p.stderr, p.stderr[-3000:]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    last = rows[-1]
    assert (last["skipped_shards"], last["skipped_corrupt"], last["skipped_missing"]) == ("3", "2", "1")
    assert int(last["stand_in_clips"]) > 0
    summary = json.loads(p.stdout.split("done: ", 1)[1].splitlines()[0])
    assert summary["steps"] == 3 and set(summary["skipped_shard_problems"]) == {
        "shards/shard-000000.tar", "shards/shard-000002.tar", "shards/shard-000003.tar"}
    assert "truncated" in summary["skipped_shard_problems"]["shards/shard-000000.tar"]
    assert "sha256" in summary["skipped_shard_problems"]["shards/shard-000003.tar"]
