"""Faults during a curation job: a Ray worker killed by pid, a node of a 2-node cluster removed,
the driver killed and started again, the output disk full. Each run must end with every input
accounted exactly once, and with the same result as an uninterrupted run.

One uninterrupted reference run (module fixture) is the yardstick; runs that need no Ray of
their own go through `jobs/curate.py`'s main() in this process, on the session's Ray, to keep
the file cheap. Inputs are tiny (2 synthetic talking heads of 2.4 s at 160 px, and a broken file);
the face-size rule is lowered to their 35 px faces.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.shards import verify_index

ROOT = Path(__file__).resolve().parents[1]
# One sample per shard (many commits to kill between); features off: their members are checked
# for determinism separately and do not change how faults are handled.
CONFIG = "write:\n  shard_max_bytes: 65536\nfeatures:\n  enabled: false\nfilters:\n  face_size_px_min: 24\n"
N_TALKING = 2


def _load_curate_main():
    spec = importlib.util.spec_from_file_location("curate_job", ROOT / "jobs" / "curate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(inputs dir, config path, curate(out) -> exit code, run in this process)."""
    from pipeline.demo import make_talking_head

    d = tmp_path_factory.mktemp("faults")
    inputs = d / "in"
    for i in range(N_TALKING):
        make_talking_head(inputs / f"talk_{i}.mp4", duration_s=2.4, size=160, seed=20 + i)
    (inputs / "broken.mp4").write_bytes(b"\x00" * 1000)
    cfg = d / "cfg.yaml"
    cfg.write_text(CONFIG)
    main = _load_curate_main()

    def curate(out: Path) -> int:
        return main(["--input", str(inputs), "--output", str(out), "--config", str(cfg)])

    return inputs, cfg, curate


@pytest.fixture(scope="module")
def reference(job, ray_local, tmp_path_factory) -> dict:
    """The outcome of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert job[2](out) == 0
    state = output_state(out)
    assert sum(v[1] == "kept" for v in state["videos"]) == N_TALKING and len(state["videos"]) == N_TALKING + 1
    return state


def output_state(out: Path) -> dict:
    """Everything a run's result is judged by, in a form two runs can be compared in: sorted rows
    (manifest without the shard a clip landed in, which depends on arrival order; videos without
    their timings), and the sha256 of every sample member."""
    from conftest import read_samples

    assert verify_index(out) == []
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == [], f"temp files left behind: {leftovers}"

    def rows(name: str, drop: tuple[str, ...] = ()) -> list[str]:
        # JSON text: NaN scores compare equal to NaN, which row dicts would not
        return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True, default=str)
                      for r in pq.read_table(out / name).to_pylist())

    index, samples = read_samples(out)
    videos = pq.read_table(out / "videos.parquet").to_pylist()
    uris = [v["uri"] for v in videos]
    assert len(uris) == len(set(uris)), "an input is counted twice"
    return {
        "kept_keys": sorted(samples),
        "index_keys": sorted(k for e in index["shardlist"] for k in e["keys"]),
        "manifest": rows("manifest.parquet", drop=("shard",)),
        "scores": rows("scores.parquet"),
        "rejects": rows("rejects.parquet"),
        "videos": sorted((v["uri"], v["status"], v["stage"], v["reason"], v["n_candidates"], v["n_kept"],
                          v["n_rejected_clips"], v["duration_s"], v["coverage"]) for v in videos),
        "members": {k: {m: hashlib.sha256(b).hexdigest() for m, b in ms.items()} for k, ms in samples.items()},
    }


def assert_same_result(out: Path, reference: dict) -> dict:
    state = output_state(out)
    for part in reference:  # one part at a time: a failure names what differs
        assert state[part] == reference[part], f"{part} differs from the uninterrupted run"
    return state


def retryable_videos(out: Path) -> list[str]:
    return [v["uri"] for v in pq.read_table(out / "videos.parquet").to_pylist() if v["reason"] == "worker failed"]


# ---- processes of a job, found through /proc (no psutil here)

def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    table = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(p.name)] = (ppid, cmdline)
    return table


def busy_stage_workers(root_pid: int, stage: str) -> list[tuple[int, str]]:
    """Ray worker processes below ``root_pid`` running a task of the actor of ``stage``: Ray sets
    their title to ``ray::MapWorker(FlatMap(CropScoreStage)).submit`` while a task (an input) is in
    it, and back to ``ray::MapWorker(...)`` when idle."""
    table = _proc_table()
    below, frontier = set(), {root_pid}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - below
        below |= frontier
    return [(pid, table[pid][1]) for pid in sorted(below)
            if table[pid][1].startswith("ray::") and stage in table[pid][1] and table[pid][1].endswith(".submit")]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


class WorkerKiller(threading.Thread):
    """SIGKILLs a worker below ``root_pid`` busy with an input of ``stage``, ``times`` times (each
    time the restarted one)."""

    def __init__(self, root_pid: int, stage: str, times: int = 1, deadline_s: float = 300):
        super().__init__(daemon=True)
        self.root_pid, self.stage, self.times, self.deadline = root_pid, stage, times, time.time() + deadline_s
        self.killed: list[tuple[int, str]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and time.time() < self.deadline and len(self.killed) < self.times:
            for pid, _ in busy_stage_workers(self.root_pid, self.stage):
                title = _cmdline(pid)
                if title.endswith(".submit") and pid not in {k[0] for k in self.killed}:  # still busy
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((pid, title))
                    break
            time.sleep(0.05)


# ---- 1. a Ray worker process killed by pid

@pytest.mark.long
def test_worker_killed_mid_input_loses_nothing(job, reference, tmp_path):
    """Three kills: more than one retry of an input allows (it may end as a retryable reject), and
    more restarts than Ray's budget used to allow (2): the pool must get its actor back each time."""
    out = tmp_path / "out"
    killer = WorkerKiller(os.getpid(), "CropScoreStage", times=3)  # this process holds the session's Ray
    killer.start()
    t0 = time.time()
    try:
        assert job[2](out) == 0
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.killed) == 3, f"only {len(killer.killed)} CropScoreStage workers were seen busy with an input"
    failed = retryable_videos(out)
    if failed:  # Ray gave up on the task: a retryable reject, which the next run finishes
        assert job[2](out) == 0
        assert retryable_videos(out) == []
    assert_same_result(out, reference)
    print(f"\n[faults] workers SIGKILLed mid-input: {killer.killed}; "
          f"{len(reference['videos'])} inputs, lost 0, 'worker failed' after the first run: {len(failed)}; "
          f"{time.time() - t0:.1f} s")


# ---- 3. the job killed mid-run and started again

@pytest.mark.long
def test_killed_and_resumed_equals_uninterrupted(job, reference, tmp_path):
    inputs, cfg, curate = job
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/curate.py", "--input", str(inputs), "--output", str(out), "--config", str(cfg)]
    t0 = time.time()
    # The job SIGKILLs its own process group (driver and embedded Ray) right after journaling its
    # first shard: a kill mid-run at the same point on a fast or a loaded machine.
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                          start_new_session=True, env=dict(os.environ, CURATE_FAULT_KILL_AFTER_SHARDS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    journal = out / "_journal" / "shards"
    published = len(list(journal.glob("shard-*.json")))
    assert published == 1 and not (out / "index.json").exists()

    assert curate(out) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["inputs"] == N_TALKING + 1
    assert_same_result(out, reference)
    print(f"\n[faults] driver SIGKILLed after {published} of {N_TALKING} shards; resumed run processed "
          f"{run['summary']['inputs_this_run']} inputs; result equals the uninterrupted run; lost 0; "
          f"{time.time() - t0:.1f} s")


# ---- 2. a node of a 2-node cluster removed mid-job

@pytest.mark.long
def test_node_removed_mid_job(job, reference, tmp_path):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    inputs, cfg, _ = job
    out = tmp_path / "out"
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    proc = None
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        worker_raylet = worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        env = dict(os.environ, RAY_ADDRESS=cluster.address, RAY_USAGE_STATS_ENABLED="0")
        t0 = time.time()
        # Two actors per stage so that the worker node gets inputs (the head alone has CPUs for
        # one of each, which is what the job falls back to once the node is gone).
        cfg2 = tmp_path / "cfg.yaml"
        cfg2.write_text(CONFIG + "ray:\n  detect_actors: 2\nscore:\n  actors: 2\n")
        proc = subprocess.Popen([sys.executable, "jobs/curate.py", "--input", str(inputs), "--output", str(out),
                                 "--config", str(cfg2)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        busy: list[tuple[int, str]] = []
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not busy:
            busy = busy_stage_workers(worker_raylet, "Stage")
            time.sleep(0.05)
        assert busy, "no input was ever in flight on the worker node"
        titles = [title for _, title in busy]
        cluster.remove_node(worker, allow_graceful=False)
        log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, log.decode(errors="replace")[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    failed = retryable_videos(out)
    if failed:
        assert job[2](out) == 0
    state = assert_same_result(out, reference)
    print(f"\n[faults] worker node removed while running {titles}; {len(state['videos'])} inputs, lost 0, "
          f"'worker failed' after the first run: {len(failed)}; {time.time() - t0:.1f} s")


# ---- 4. the output disk full

def _require_root():
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    _require_root()
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_atomic_writers_leave_no_temp_file_when_the_disk_is_full(tmp_path):
    from pipeline.journal import Journal
    from pipeline.shards import ShardWriter, atomic_write_bytes, atomic_write_json

    with small_tmpfs(tmp_path / "mnt", "64k") as mnt:
        atomic_write_bytes(mnt / "table.parquet", b"old")
        with pytest.raises(OSError) as e:
            atomic_write_bytes(mnt / "table.parquet", os.urandom(100_000))
        assert e.value.errno == errno.ENOSPC
        assert (mnt / "table.parquet").read_bytes() == b"old"  # the old file is untouched
        with pytest.raises(OSError, match="No space left"):
            atomic_write_json(mnt / "run.json", {"x": "y" * 100_000})
        journal = Journal(mnt / "out")
        with pytest.raises(OSError, match="No space left"):
            journal.record_videos([{"video": {"uri": "u" * 100_000}, "rejects": []}])
        assert journal.videos() == []
        writer = ShardWriter(mnt / "out", 1 << 20)
        with pytest.raises(OSError, match="No space left"):
            for i in range(10):
                writer.write(f"clip_{i:04d}", {"video.mp4": os.urandom(20_000)})
        writer.abort()
        assert sorted(p.name for p in mnt.rglob("*") if p.is_file()) == ["table.parquet"]


@pytest.mark.long
def test_disk_full_mid_shard_stops_cleanly_and_resumes(job, reference, tmp_path, capsys):
    out_mnt = tmp_path / "mnt"
    # A shard (one ~180 KB sample) and the journal fit; the second shard does not.
    with small_tmpfs(out_mnt, "280k"):
        out = out_mnt / "out"
        t0 = time.time()
        capsys.readouterr()
        rc = job[2](out)
        err = capsys.readouterr().err
        assert rc == 1
        assert "no space left on device" in err.lower() and str(out) in err and "Traceback" not in err
        assert not (out / "index.json").exists()
        shards = sorted(p.name for p in (out / "shards").iterdir())
        journaled = sorted(Path(json.loads(p.read_text())["shard"]["url"]).name
                           for p in (out / "_journal" / "shards").glob("shard-*.json"))
        assert shards == journaled and len(shards) < N_TALKING, "a shard is published without its journal entry"
        assert [p for p in out.rglob("*") if ".tmp" in p.name] == []
        for entry in (json.loads(p.read_text())["shard"] for p in (out / "_journal" / "shards").glob("*.json")):
            from pipeline.shards import sha256_file

            assert sha256_file(out / entry["url"]) == entry["sha256"]
        subprocess.run(["mount", "-o", "remount,size=8m", str(out_mnt)], check=True)
        assert job[2](out) == 0
        state = assert_same_result(out, reference)
    print(f"\n[faults] disk full after {len(shards)} of {N_TALKING} shards: exit 1, {err.strip().splitlines()[-1]!r}; "
          f"rerun with space: {len(state['videos'])} inputs, lost 0; {time.time() - t0:.1f} s")


# ---- which members are deterministic

ENCODE_UNDER_AFFINITY = """
import hashlib, os, sys
import numpy as np
os.sched_setaffinity(0, set(range(int(sys.argv[1]))))  # before FFmpeg counts the CPUs
from pipeline.media import encode_clip
rng = np.random.default_rng(0)
frames = [np.roll(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), 3 * i, axis=1) for i in range(30)]
print(hashlib.sha256(encode_clip(frames, np.zeros(16000, np.float32))).hexdigest())
"""


def test_clip_bytes_do_not_depend_on_the_cpus_of_the_machine():
    """x264's output depends on its thread count, whose default follows the CPUs: the encoder's is
    fixed (media.X264_THREADS), so video.mp4 is the same on a 1-CPU and a 2-CPU machine."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to compare")
    digests = [subprocess.run([sys.executable, "-c", ENCODE_UNDER_AFFINITY, str(n)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=True).stdout.strip() for n in (1, 2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


@pytest.mark.long
def test_shard_whose_journal_entry_cannot_be_written_is_not_published(job, reference, tmp_path, monkeypatch, capsys):
    """ENOSPC injected at the one moment a tmpfs cannot target: the shard is renamed into place,
    then its journal entry fails. The shard is removed at once (not left as an orphan)."""
    from pipeline.journal import Journal

    def no_space(self, info, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.dir / "shards" / "x.json"))

    monkeypatch.setattr(Journal, "record_shard", no_space)
    out = tmp_path / "out"
    capsys.readouterr()
    assert job[2](out) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err.lower() and str(out) in err
    assert list((out / "shards").iterdir()) == [] and not (out / "index.json").exists()
    assert list((out / "_journal" / "shards").iterdir()) == []
