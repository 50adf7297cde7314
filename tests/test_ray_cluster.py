"""The curation job on real Ray clusters: `ray job submit` to a local head, and a 2-node cluster.

Both run the job in a subprocess, the way users do; the clusters listen on loopback only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.shards import verify_index
from ray_head import TWO_NODE_PLACEMENT, head_env, loopback_ray_head, submit

ROOT = Path(__file__).resolve().parents[1]


def _check_demo_output(out: Path) -> dict:
    assert (out / "index.json").exists(), "no index.json: the job did not commit"
    assert verify_index(out) == []
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["inputs"] == 2 and run["summary"]["clips_kept"] >= 2
    return run


@pytest.mark.long
def test_ray_job_submit_to_local_head(tmp_path):
    out = tmp_path / "out"
    env = head_env()
    with loopback_ray_head(tmp_path / "head.log", env) as address:
        # The documented command: the repo is the working dir (.gitignore keeps .venv out of the upload).
        r = submit(address, ["python", "jobs/curate.py", "--demo", "--output", str(out)], env, cwd=ROOT, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    _check_demo_output(out)


# the joined node's writer starts within a second, well before its crop actor is up
PLACED_BY_RESOURCES = TWO_NODE_PLACEMENT + "write:\n  node_poll_s: 1\n"


@pytest.mark.long
def test_a_node_that_joins_mid_run_gets_a_shard_writer_and_writes_its_samples(tmp_path):
    """An autoscaled group starts empty (docker/kuberay/raycluster.yaml's GPU group): a node that joins
    after the run started gets its own shard writer, and the samples made on it are written there."""
    import time

    from ray.cluster_utils import Cluster

    from pipeline.journal import Journal

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    job = None
    try:
        out = tmp_path / "out"
        env = dict(os.environ, RAY_ADDRESS=cluster.address, RAY_USAGE_STATS_ENABLED="0")
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(PLACED_BY_RESOURCES)
        job = subprocess.Popen([sys.executable, "jobs/curate.py", "--demo", "--output", str(out), "--config", str(cfg)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # the run has begun (its number is taken just before its writers start on the nodes there are)
        deadline = time.monotonic() + 300
        while not (out / "_journal" / "runs" / "000001.json").exists():
            assert job.poll() is None and time.monotonic() < deadline, "the job did not begin its run"
            time.sleep(0.2)
        time.sleep(3)
        head = {n.node_id for n in cluster.list_all_nodes()}
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        joined = {n.node_id for n in cluster.list_all_nodes()} - head
        log, _ = job.communicate(timeout=400)
        assert job.returncode == 0, log[-4000:]
        run = _check_demo_output(out)
        assert len(joined) == 1 and run["writers"]["joined_node_ids"] == sorted(joined), (run["writers"], log[-2000:])
        assert "joined: shard writer" in log
        node_ids = head | joined
        assert run["writers"]["count"] == 2 and set(run["writers"]["node_ids"]) == node_ids
        # both nodes cropped a clip; each was written on its own node, by that node's writer
        entries = Journal(out).shard_entries()
        assert {e["writer"]["node_id"] for e in entries} == node_ids, entries
        assert sum(e["nsamples"] for e in entries) == run["summary"]["clips_kept"]
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        cluster.shutdown()


def test_the_library_takes_a_ray_that_is_up(tmp_path):
    """Ray start-up is the entry point's (jobs/_ray.py): run_curation called with no Ray up says so
    instead of starting a default Ray behind the caller's back."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.mp4").write_bytes(b"0")
    code = ("import sys; from pipeline.config import load_config; from pipeline.inputs import expand_inputs; "
            "from pipeline.runner import run_curation; "
            "run_curation(expand_inputs([sys.argv[1]]), sys.argv[2], load_config(None)); ")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "out")], cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "RuntimeError: Ray is not running" in r.stderr, r.stderr[-2000:]
    assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_full_pools_wait_for_all_their_actors_before_the_first_input(ray_local):
    """ray.full_pools: Ray Data would otherwise send the first inputs to the first actor up (on a
    cluster, all their samples to its node's writer; the 2-node run of test_object_store_output.py
    shows the placement this gives). The wait is the dataset's own setting, not the process-wide one."""
    from ray.data import DataContext

    from pipeline.config import load_config
    from pipeline.inputs import InputItem, video_id_for
    from pipeline.runner import build_dataset

    items = [InputItem(uri="/in/a.mp4", source="/in", video_id=video_id_for("/in/a.mp4"))]
    default = DataContext.get_current().wait_for_min_actors_s
    full = build_dataset(items, load_config(None, **{"ray.full_pools": True, "ray.full_pools_wait_s": 45}))
    assert full.context.wait_for_min_actors_s == 45
    grown = build_dataset(items, load_config(None))
    assert grown.context.wait_for_min_actors_s == default
    assert DataContext.get_current().wait_for_min_actors_s == default
