"""The curation job on real Ray clusters: `ray job submit` to a local head, and a 2-node cluster.

Both run the job in a subprocess, the way users do; the clusters listen on loopback only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.shards import verify_index

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_demo_output(out: Path) -> dict:
    assert (out / "index.json").exists(), "no index.json: the job did not commit"
    assert verify_index(out) == []
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["inputs"] == 2 and run["summary"]["clips_kept"] >= 2
    return run


@pytest.mark.long
def test_ray_job_submit_to_local_head(tmp_path):
    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    head_log = open(tmp_path / "head.log", "wb")
    # Ray 2.5x+ heads require a token by default; the CLI client only sends one in token mode.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ['PATH']}")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats",
         # own agent/metrics ports: another Ray on this machine (the suite's embedded one) holds the defaults
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            # Ray prints the job API address it actually serves (it may differ from the dashboard port).
            m = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", (tmp_path / "head.log").read_text(errors="replace"))
            if m:
                address = m.group(1)
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the Ray head did not come up: {(tmp_path / 'head.log').read_text()[-3000:]}")
        # The documented command: the repo is the working dir (.gitignore keeps .venv out of the upload).
        deadline = time.time() + 180  # on a loaded 2-core machine the agent can take a minute or more
        while True:
            r = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                 "python", "jobs/curate.py", "--demo", "--output", str(out)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
            # The job API answers before the head's job agent is up; Ray asks to try again.
            if "No available agent to submit job" not in r.stderr + r.stdout or time.time() > deadline:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr).lower()
        _check_demo_output(out)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.long
def test_two_node_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        env = dict(os.environ, RAY_ADDRESS=cluster.address, RAY_USAGE_STATS_ENABLED="0")
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("ray:\n  detect_actors: 2\n")
        r = subprocess.run([sys.executable, "jobs/curate.py", "--demo", "--output", str(out), "--config", str(cfg)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        run = _check_demo_output(out)
        node_ids = {n.node_id for n in cluster.list_all_nodes()}
        assert len(node_ids) == 2
        assert set(run["nodes_used"]) <= node_ids and run["nodes_used"]
        # a shard writer on each node; every shard written by one of them, on its node
        assert run["writers"]["count"] == 2 and set(run["writers"]["node_ids"]) == node_ids
        from pipeline.journal import Journal

        entries = Journal(out).shard_entries()
        assert entries and {e["writer"]["node_id"] for e in entries} <= node_ids
        assert sum(e["nsamples"] for e in entries) == run["summary"]["clips_kept"]
    finally:
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
