"""A curation job killed midway and rerun counts every input exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.demo import make_talking_head
from pipeline.shards import verify_index

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long
def test_killed_job_resumes_exactly_once(tmp_path):
    inputs = tmp_path / "in"
    for i in range(8):
        make_talking_head(inputs / f"talk_{i}.mp4", duration_s=2.6, seed=10 + i)
    (inputs / "broken.mp4").write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    # ~one sample per shard: many commits; features off (the resume logic does not depend on them)
    cfg.write_text("write:\n  shard_max_bytes: 65536\nfeatures:\n  enabled: false\n")
    cmd = [sys.executable, "jobs/curate.py", "--input", str(inputs), "--output", str(out), "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal = out / "_journal" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.is_dir() and len(list(journal.glob("shard-*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-run
    proc.wait()
    killed_shards = len(list(journal.glob("shard-*.json")))
    assert not (out / "index.json").exists()

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["inputs"] == 9
    assert run["summary"]["inputs_this_run"] < 9 or killed_shards == 0
    videos = pq.read_table(out / "videos.parquet").to_pylist()
    assert Counter(v["uri"] for v in videos) == Counter(str(p) for p in inputs.iterdir())
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    keys = [m["key"] for m in manifest]
    assert len(keys) == len(set(keys)), "a clip was written twice"
    index = json.loads((out / "index.json").read_text())
    assert sorted(k for e in index["shardlist"] for k in e["keys"]) == sorted(keys)
    assert verify_index(out) == []
    assert not list((out / "shards").glob(".*tmp*"))
    kept = {v["uri"] for v in videos if v["status"] == "kept"}
    assert len(kept) == 8 and {m["uri"] for m in manifest} == kept
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [r["uri"] for r in rejects if r["clip_index"] == -1] == [str(inputs / "broken.mp4")]


@pytest.mark.long
def test_worker_crash_becomes_a_retryable_reject(tmp_path):
    """An input that kills its worker (as a segfaulting decoder or the OOM killer would) does not
    hang or fail the job: it is recorded as "worker failed", and the next run retries it."""
    inputs = tmp_path / "in"
    make_talking_head(inputs / "good.mp4", duration_s=2.6, seed=1)
    make_talking_head(inputs / "poison.mp4", duration_s=2.6, seed=2)
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("features:\n  enabled: false\n")
    cmd = [sys.executable, "jobs/curate.py", "--input", str(inputs), "--output", str(out), "--config", str(cfg)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, CURATE_FAULT_CRASH_ON="poison"))
    assert r.returncode == 0, r.stderr[-3000:]
    videos = {Path(v["uri"]).name: v for v in pq.read_table(out / "videos.parquet").to_pylist()}
    assert videos["good.mp4"]["status"] == "kept"
    assert (videos["poison.mp4"]["status"], videos["poison.mp4"]["reason"]) == ("rejected", "worker failed")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)  # the fault is gone
    assert r.returncode == 0, r.stderr[-3000:]
    videos = pq.read_table(out / "videos.parquet").to_pylist()
    assert sorted((Path(v["uri"]).name, v["status"]) for v in videos) == [("good.mp4", "kept"), ("poison.mp4", "kept")]
    assert json.loads((out / "run.json").read_text())["summary"]["inputs_this_run"] == 1
    assert verify_index(out) == []


def test_second_concurrent_run_is_refused(tmp_path):
    from pipeline.journal import Journal

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.mp4").write_bytes(b"0")
    with Journal(tmp_path / "out").lock():
        r = subprocess.run([sys.executable, "jobs/curate.py", "--input", str(tmp_path / "in"), "--output",
                            str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "another run" in r.stderr
