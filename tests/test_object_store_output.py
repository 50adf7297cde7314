"""Curation output in object storage (issue 14, "Must show"), through the job's CLI against an S3
API on loopback (moto's server, tests/s3_server.py) reached through the standard AWS_* environment:

- a run reading its inputs from and writing its output to S3 equals the same run written to a
  local directory, its index.json checksums hold, and the trainer's loader reads and trains from it;
- the driver receives no sample bytes: what it iterates does not grow with the bytes written;
- a run SIGKILLed mid-run and rerun counts every input once, lists no orphan or partial shard and
  leaves none behind; a second run while the lock is held is refused, a dead run's lock is taken
  over once its lease has run out;
- on a 2-node Ray cluster both nodes crop clips, and each node's writer writes their shards;
- `ray job submit --runtime-env-json` carrying the storage environment to a loopback head writes
  to the S3 API (the run that resumes the killed one).

Inputs are tiny (2 synthetic talking heads of 2.4 s at 160 px and a broken file, in S3); the
face-size rule is lowered to their 35 px faces. Media is made in tmp dirs, never committed.
Every test here runs the whole job in a subprocess, the way users do (a job's Ray workers must get
the storage environment, which the suite's shared Ray does not have). To keep them in `make test`
the runs are shared: one module fixture curates the inputs three times (features on, locally and
into S3; features off into S3 on the 2-node cluster) for the comparison, the loader, the driver's
bytes and the cluster's writers; the kill test's resuming run is the `ray job submit` one, and the
head's start-up outlasts the killed run's 4 s lease. The kill test is an injected fault with a
real Ray head, so it is marked `long` (`make test-long`, which CI runs too).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from ray_head import TWO_NODE_PLACEMENT, head_env, loopback_ray_head, submit
from s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
N_TALKING = 2
N_INPUTS = N_TALKING + 1
FILTERS = "filters:\n  face_size_px_min: 24\n"
# The members that must be byte-identical however and wherever a clip is written (every one: meta.json
# carries no wall-clock timings, bookkeeper._shard_meta).
DETERMINISTIC = ("video.mp4", "meta.json", "latent.npy", "audio.npy", "kps.npy", "motion.npy")

# The job, with every row the driver iterates from Ray Data counted (its public iterators: the
# driver has no other way to receive the pipeline's rows). Written to $COUNT_ROWS_TO at exit.
COUNTED_JOB = r"""
import atexit, json, os, runpy, sys
import numpy as np
import ray.data

seen = {"rows": 0, "bytes": 0, "max_row_bytes": 0}

def size(v):
    if isinstance(v, (bytes, bytearray, memoryview, str)):
        return len(v)
    if isinstance(v, np.ndarray):
        return sum(size(x) for x in v.ravel()) if v.dtype == object else v.nbytes
    if isinstance(v, dict):
        return sum(size(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(size(x) for x in v)
    return 8

def count(n, rows=1):
    seen["rows"] += rows
    seen["bytes"] += n
    seen["max_row_bytes"] = max(seen["max_row_bytes"], n // max(rows, 1))

def iter_rows(self, *a, _orig=ray.data.Dataset.iter_rows, **k):
    for row in _orig(self, *a, **k):
        count(size(dict(row)))
        yield row

def iter_batches(self, *a, _orig=ray.data.Dataset.iter_batches, **k):
    for batch in _orig(self, *a, **k):
        cols = batch if isinstance(batch, dict) else {c: batch[c] for c in batch.columns}
        count(size(cols), max((len(v) for v in cols.values()), default=1))
        yield batch

ray.data.Dataset.iter_rows, ray.data.Dataset.iter_batches = iter_rows, iter_batches
atexit.register(lambda: open(os.environ["COUNT_ROWS_TO"], "w").write(json.dumps(seen)))
sys.argv = ["jobs/curate.py"] + sys.argv[1:]
runpy.run_path("jobs/curate.py", run_name="__main__")
"""


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def inputs(s3, tmp_path_factory) -> str:
    """s3://raw/in: the inputs every run here reads."""
    from pipeline.demo import make_talking_head

    d = tmp_path_factory.mktemp("s3_inputs")
    for i in range(N_TALKING):
        make_talking_head(d / f"talk_{i}.mp4", duration_s=2.4, size=160, seed=20 + i)
    (d / "broken.mp4").write_bytes(b"\x00" * 1000)
    s3.bucket("raw")
    s3.bucket("curated")
    return s3.upload_dir(d, "raw", "in")


def _config(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(FILTERS + text)
    return path


def _job_env(s3: S3Server, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    return {**env, **s3.env(), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def curate(s3: S3Server, input_uri: str, output: str, config: Path, counts: Path | None = None,
           env: dict | None = None, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """jobs/curate.py in a subprocess with the storage environment (rows counted into ``counts``)."""
    args = ["--input", input_uri, "--output", output, "--config", str(config)]
    cmd = [sys.executable, "-c", COUNTED_JOB, *args] if counts else [sys.executable, "jobs/curate.py", *args]
    env = {**_job_env(s3), **(env or {})}
    if counts:
        env["COUNT_ROWS_TO"] = str(counts)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def _object_name(url: str, root: str) -> str:
    """An index entry's url (relative to the output, or a full URL under ``root``) as a name in the output."""
    return url[len(root) + 1:] if url.startswith(f"{root}/") else url


def check_s3_output(s3: S3Server, bucket: str, prefix: str) -> dict:
    """index.json read from S3, every entry's object checked against it (size, sha256, keys), and
    nothing else under shards/: no orphan or partial shard, no temp object, no open upload."""
    index = json.loads(s3.read(bucket, f"{prefix}/index.json"))
    listed = set()
    for entry in index["shardlist"]:
        name = _object_name(entry["url"], f"s3://{bucket}/{prefix}")
        data = s3.read(bucket, f"{prefix}/{name}")
        assert len(data) == entry["filesize"], f"{name}: size differs from index.json"
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name}: sha256 differs from index.json"
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
        assert keys == entry["keys"] and len(keys) == entry["nsamples"], name
        listed.add(name)
    shards = {n for n in s3.keys(bucket, prefix) if n.startswith("shards/")}
    assert shards == listed, f"objects under shards/ not in index.json: {sorted(shards - listed)}"
    assert not [n for n in s3.keys(bucket, prefix) if ".tmp" in n], "temp objects left behind"
    assert s3.open_multipart_uploads(bucket, prefix) == [], "an upload was left open"
    return index


def output_state(out: Path, root: str) -> dict:
    """What two runs are compared by (a local directory, or a downloaded copy of an S3 output):
    sorted rows (manifest without the shard a clip landed in, videos without timings) and the
    sha256 of every deterministic member of every sample. ``root``: the output's own URL."""
    def rows(name: str, drop: tuple[str, ...] = ()) -> list[str]:
        return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True, default=str)
                      for r in pq.read_table(out / name).to_pylist())

    index = json.loads((out / "index.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for entry in index["shardlist"]:
        with tarfile.open(out / _object_name(entry["url"], root)) as tar:
            for m in tar.getmembers():
                key, member = m.name.split(".", 1)
                samples.setdefault(key, {})[member] = tar.extractfile(m).read()
    videos = pq.read_table(out / "videos.parquet").to_pylist()
    return {
        "keys": sorted(samples),
        "index_keys": sorted(k for e in index["shardlist"] for k in e["keys"]),
        "members": {k: {m: hashlib.sha256(b).hexdigest() for m, b in ms.items() if m in DETERMINISTIC}
                    for k, ms in samples.items()},
        "manifest": rows("manifest.parquet", drop=("shard",)),
        "rejects": rows("rejects.parquet"),
        "scores": rows("scores.parquet"),
        "videos": sorted((v["uri"], v["status"], v["stage"], v["reason"], v["n_candidates"], v["n_kept"],
                          v["n_rejected_clips"], v["duration_s"]) for v in videos),
    }


def bytes_under(s3: S3Server, bucket: str, prefix: str, sub: str = "shards/") -> int:
    total = 0
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{sub}"):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


# ---------------------------------------------------------------------------------------------
# 1. S3 output equals local output; the loader trains from it. 2. The driver sees no sample bytes.


# one input at a time per actor sends the two talking heads to the two detection actors at once
CLUSTER_CONFIG = "write:\n  shard_max_bytes: 65536\n" + TWO_NODE_PLACEMENT


@contextlib.contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def two_node_cluster_run(s3, inputs, tmp: Path, output: str, counts: Path) -> dict:
    """The job on a 2-node ``ray.cluster_utils.Cluster`` (2 CPUs a node, the storage environment
    in the nodes' environment, as an instance role or a Secret gives it), features off."""
    from ray.cluster_utils import Cluster

    with _environ(s3.env()):  # the raylets the Cluster starts inherit this process's environment
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        with _environ(s3.env()):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        node_ids = sorted(n.node_id for n in cluster.list_all_nodes())
        r = curate(s3, inputs, output, _config(tmp, "cluster", CLUSTER_CONFIG), counts=counts,
                   env={"RAY_ADDRESS": cluster.address})
        assert r.returncode == 0, f"cluster run: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    finally:
        cluster.shutdown()
    return {"node_ids": node_ids}


@pytest.fixture(scope="module")
def runs(s3, inputs, tmp_path_factory) -> dict:
    """The same inputs (in S3) curated with features on (the loader needs them) into a local
    directory and into S3, and with features off into S3 on a 2-node Ray cluster (fewer bytes
    written); the rows the driver iterates counted in each."""
    tmp = tmp_path_factory.mktemp("s3_runs")
    features = _config(tmp, "features", "write:\n  shard_max_bytes: 1500000\n")
    result = {"tmp": tmp, "timings": {}}
    for name, output, cfg in (("local", str(tmp / "local"), features),
                              ("s3", "s3://curated/features", features)):
        t = time.time()
        r = curate(s3, inputs, output, cfg, counts=tmp / f"{name}.counts.json")
        assert r.returncode == 0, f"{name}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
        result["timings"][name] = time.time() - t
        result[name] = {"output": output, "driver": json.loads((tmp / f"{name}.counts.json").read_text())}
    t = time.time()
    cluster = two_node_cluster_run(s3, inputs, tmp, "s3://curated/light", tmp / "light.counts.json")
    result["timings"]["s3_light_cluster"] = time.time() - t
    result["s3_light"] = {"output": "s3://curated/light", "driver": json.loads((tmp / "light.counts.json").read_text()),
                          **cluster}
    return result


def test_s3_output_equals_local_output(runs, s3, tmp_path):
    index = check_s3_output(s3, "curated", "features")
    copy = s3.download("curated", "features", tmp_path / "copy")
    remote = output_state(copy, "s3://curated/features")
    local = output_state(Path(runs["local"]["output"]), runs["local"]["output"])
    assert len(local["keys"]) >= N_TALKING and local["keys"] == local["index_keys"]
    for part in local:  # one part at a time: a failure names what differs
        assert remote[part] == local[part], f"{part}: the S3 output differs from the local one"
    assert set(index["members"]) >= {"latent.npy", "video.mp4", "meta.json"}
    videos = pq.read_table(copy / "videos.parquet").to_pylist()
    assert Counter(v["status"] for v in videos) == {"kept": N_TALKING, "rejected": 1}
    assert all(v["uri"].startswith("s3://raw/in/") for v in videos)
    run = json.loads(s3.read("curated", "features/run.json"))
    assert run["summary"]["inputs"] == N_INPUTS and run["summary"]["clips_kept"] == len(local["keys"])
    assert not [k for k in s3.keys("curated", "features") if k.startswith("_demo")]


def test_loader_reads_and_trains_from_the_s3_output(runs, s3, tmp_path):
    import torch

    from loopy_model.data import LoaderConfig, StreamingWindowDataset
    from loopy_model.train import TrainConfig, train

    def batches(uri, **kw):
        cfg = LoaderConfig(uri=uri, global_batch_size=1, allow_smoke=True, **kw)
        return list(StreamingWindowDataset(cfg, rank=0, world_size=1))

    remote = batches("s3://curated/features", storage_options=s3.storage_options(),
                     cache_dir=str(tmp_path / "cache"), verify_sha256=True)
    local = batches(runs["local"]["output"])
    assert len(remote) == len(local) >= N_TALKING
    for a, b in zip(local, remote):
        assert a["keys"] == b["keys"]
        for name, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[name]), name
    run_dir = tmp_path / "run"
    train(TrainConfig(data="s3://curated/features", storage_options=s3.storage_options(),
                      cache_dir=str(tmp_path / "train_cache"), out=str(run_dir), preset="tiny", stage=1,
                      global_batch_size=1, num_workers=0, max_steps=1, allow_smoke=True, progress=False,
                      mixed_precision="no", checkpoint_every=1000))
    with open(run_dir / "metrics.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    assert len(steps) == 1 and math.isfinite(float(steps[0]["loss"])) and steps[0]["skipped_shards"] == "0"


def test_driver_receives_no_sample_bytes(runs, s3):
    """The features-on run writes several times the bytes of the features-off run over the same
    inputs; what the driver iterates stays the same small records."""
    heavy, light = runs["s3"]["driver"], runs["s3_light"]["driver"]
    heavy_written = bytes_under(s3, "curated", "features")
    light_written = bytes_under(s3, "curated", "light")
    print(f"\n[object store] written: {light_written} B (features off), {heavy_written} B (features on); "
          f"driver iterated {light['rows']} rows / {light['bytes']} B and {heavy['rows']} rows / {heavy['bytes']} B "
          f"(largest row {light['max_row_bytes']} B / {heavy['max_row_bytes']} B); run times "
          + ", ".join(f"{k} {v:.1f} s" for k, v in runs["timings"].items()))
    assert heavy_written > 3 * light_written, "the two runs should differ in bytes written"
    assert heavy["rows"] > 0 and light["rows"] > 0, "no rows counted: the driver iterates none?"
    # what the driver received: no more with 3x the bytes written, and a small share of either
    assert heavy["bytes"] - light["bytes"] < 0.01 * (heavy_written - light_written)
    assert heavy["bytes"] < 0.02 * heavy_written
    assert heavy["max_row_bytes"] < 64 * 1024  # a sample is ~1 MB here (latents)


# ---------------------------------------------------------------------------------------------
# 3. kill and resume; 4. the single-writer lock on an object store; 6. ray job submit with the
# storage environment in --runtime-env-json (the resuming run)


def _load_curate_main():
    spec = importlib.util.spec_from_file_location("curate_job_s3", ROOT / "jobs" / "curate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _lock_objects(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    """The output lock's objects (_journal/lock.json, or its generations _journal/lock/NNNNNN.json)."""
    return [k for k in s3.keys(bucket, prefix) if any(part.startswith("lock") for part in k.split("/"))]


@pytest.mark.long  # an injected fault and a real Ray head (pyproject's `long`): ~2.5 min of `make test`
def test_killed_run_on_s3_resumed_by_ray_job_submit_exactly_once_and_a_held_lock_refuses(
        s3, inputs, tmp_path, monkeypatch, capsys):
    """A: a run SIGKILLed right after journaling its first shard (its own fault point). While A
    holds the lock, B (in this process) is refused. After A's lease has run out, C, submitted with
    `ray job submit --runtime-env-json` carrying the storage environment to a loopback head, takes
    over the dead run's lock, cleans its orphans (and one planted the way a killed writer leaves one)
    and finishes with every input counted once, in the S3 API."""
    lease = 4  # A renews it every second; C waits it out after the kill
    cfg = _config(tmp_path, "kill", f"write:\n  shard_max_bytes: 65536\n  lock_lease_s: {lease}\n"
                                    "features:\n  enabled: false\n")
    args = ["--input", inputs, "--output", "s3://curated/killed", "--config", str(cfg)]
    a_log = tmp_path / "a.log"
    with open(a_log, "wb") as log:  # a file, not a pipe: a full pipe would stall the job
        a = subprocess.Popen([sys.executable, "jobs/curate.py", *args], cwd=ROOT, start_new_session=True,
                             stdout=log, stderr=subprocess.STDOUT, env=_job_env(s3, CURATE_FAULT_KILL_AFTER_SHARDS="1"))
    try:
        deadline = time.time() + 300
        while a.poll() is None and not _lock_objects(s3, "curated", "killed") and time.time() < deadline:
            time.sleep(0.2)
        assert a.poll() is None, f"run A ended before it took the lock: {a_log.read_text()[-3000:]}"

        for k, v in s3.env().items():  # B: the job's main() here, refused before it starts Ray
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        ray_was_up = ray.is_initialized()  # the suite's Ray may be up already
        assert _load_curate_main()(args) == 2, "a second run was not refused while the lock is held"
        assert "another run" in capsys.readouterr().err
        assert ray.is_initialized() == ray_was_up, "the refused run started Ray"

        a.wait(timeout=300)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
    killed_at = time.time()
    assert a.returncode == -signal.SIGKILL, f"run A was not killed mid-run: {a.returncode} {a_log.read_text()[-3000:]}"
    assert "index.json" not in s3.keys("curated", "killed")
    assert _lock_objects(s3, "curated", "killed"), "the killed run's lock is gone"
    # an orphan as a writer killed between its upload and the journal entry leaves one
    real = [k for k in s3.keys("curated", "killed") if k.startswith("shards/")]
    assert real, "run A uploaded no shard before it was killed"
    orphan = re.sub(r"(\d+)(\.tar)$", lambda m: f"{int(m.group(1)) + 900:0{len(m.group(1))}d}{m.group(2)}", real[0])
    s3.client.put_object(Bucket="curated", Key=f"killed/{orphan}", Body=s3.read("curated", f"killed/{real[0]}"))
    # and a partial shard as a writer killed mid-upload leaves it: a multipart upload never completed
    partial = s3.client.create_multipart_upload(Bucket="curated", Key=f"killed/{orphan[:-4]}-partial.tar")
    s3.client.upload_part(Bucket="curated", Key=partial["Key"], UploadId=partial["UploadId"], PartNumber=1,
                          Body=b"\0" * 4096)
    assert s3.open_multipart_uploads("curated", "killed")

    # C: `ray job submit` to a loopback head that has no AWS_* variables: only the job's runtime env
    # carries the storage environment (the way a cluster's jobs get it).
    env = head_env()
    runtime_env = {"env_vars": {**s3.env(), "PYTHONUNBUFFERED": "1"}, "excludes": ["benchmarks/", "docs/"]}
    with loopback_ray_head(tmp_path / "head.log", env) as address:
        time.sleep(max(0.0, killed_at + lease + 1 - time.time()))  # the dead run's lease runs out
        r = submit(address, ["python", "jobs/curate.py", *args], env, cwd=ROOT, runtime_env=runtime_env)
    log = r.stdout + r.stderr  # the job's own output, followed by `ray job submit`
    assert r.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
    assert re.search(r"(took|taking) over the lock", log), log[-3000:]
    index = check_s3_output(s3, "curated", "killed")  # the planted orphan and partial upload are gone too
    assert orphan not in s3.keys("curated", "killed")
    copy = s3.download("curated", "killed", tmp_path / "copy")
    videos = pq.read_table(copy / "videos.parquet").to_pylist()
    assert sorted(v["uri"] for v in videos) == sorted(f"{inputs}/{n}" for n in
                                                       ["broken.mp4"] + [f"talk_{i}.mp4" for i in range(N_TALKING)])
    assert Counter(v["status"] for v in videos) == {"kept": N_TALKING, "rejected": 1}
    manifest = [m["key"] for m in pq.read_table(copy / "manifest.parquet").to_pylist()]
    assert len(manifest) == len(set(manifest)), "a clip was written twice"
    assert sorted(manifest) == sorted(k for e in index["shardlist"] for k in e["keys"])
    run = json.loads(s3.read("curated", "killed/run.json"))
    assert run["summary"]["inputs"] == N_INPUTS and run["summary"]["inputs_this_run"] < N_INPUTS
    assert not _lock_objects(s3, "curated", "killed"), "the finished run left its lock"


# ---------------------------------------------------------------------------------------------
# 5. a 2-node cluster: the shards are written by the writers on the nodes


def test_two_node_cluster_shards_written_on_both_nodes_by_their_writers(runs, s3):
    """Both nodes cropped clips (their actors placed by resources, CLUSTER_CONFIG), and each node's
    samples went into shards written by the writer on that node: every shard's writer is one of the
    two, each node's writer wrote at least one, and run.json counts the shards by node the same."""
    from pipeline.journal import Journal
    from pipeline.store import open_store

    index = check_s3_output(s3, "curated", "light")
    run = json.loads(s3.read("curated", "light/run.json"))
    node_ids = runs["s3_light"]["node_ids"]
    assert len(node_ids) == 2
    # the journal's shard entries name the writer that wrote each shard, and its node
    entries = Journal(open_store("s3://curated/light", s3.storage_options())).shard_entries()
    assert sorted(e["url"] for e in entries) == sorted(e["url"] for e in index["shardlist"])
    writers = {e["writer"]["writer"]: e["writer"]["node_id"] for e in entries}
    by_node = Counter(e["writer"]["node_id"] for e in entries)
    print(f"\n[object store] 2-node cluster: {len(entries)} shards, by node {dict(by_node)}; "
          f"nodes that ran a stage: {run['nodes_used']}")
    # one writer per node (run.json), pinned there: a writer's shards all name the same node
    assert run["writers"]["count"] == 2 and run["writers"]["node_ids"] == node_ids
    assert len({(e["writer"]["writer"], e["writer"]["node_id"]) for e in entries}) == len(writers)
    assert sorted(writers.values()) == node_ids, f"shards written by the writers {writers}, nodes {node_ids}"
    assert run["summary"]["shards_by_node"] == dict(sorted(by_node.items()))
    assert sorted(run["nodes_used"]) == node_ids
    assert index["nsamples"] == run["summary"]["clips_kept"]
