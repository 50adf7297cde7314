"""The single-writer lock of an output: flock on a local directory, a renewed lease object on an
S3 API (moto on 127.0.0.1). A second run is refused at once and told who holds the output; a
killed run's lock is free at once (flock) or taken over after its lease (object store); a run whose
lease was taken over stops before its next journal write."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.journal import Journal, LockLost, OutputLocked
from pipeline.store import open_store

ROOT = Path(__file__).resolve().parents[1]
LEASE_S = 3.0  # short, with room for a loaded machine (a renewal every 0.75 s)


def _output(kind: str, request, tmp_path) -> tuple[str, dict]:
    if kind == "local":
        return str(tmp_path / "out"), {}
    from moto_s3 import s3_options

    return f"s3://out/{request.node.name.replace('[', '-').rstrip(']')}", s3_options(request.getfixturevalue("s3_endpoint"))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return _output(request.param, request, tmp_path)


@pytest.fixture
def s3_output(request, tmp_path):
    return _output("s3", request, tmp_path)


# A run holding the lock in another process: it journals an input every 0.1 s until it is killed,
# or until it learns that its lease was taken over (exit 3, the error on stdout).
_HOLDER = textwrap.dedent("""
    import json, sys, time
    from pipeline.journal import Journal, LockLost
    from pipeline.store import open_store

    url, options, lease_s = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    journal = Journal(open_store(url, options))
    with journal.lock(lease_s=lease_s):
        try:
            for i in range(10**6):
                journal.record_videos([{"video": {"uri": f"/in/holder-{i}.mp4"}, "retryable": False}])
                if i == 0:
                    print("locked", flush=True)
                time.sleep(0.1)
        except LockLost as e:
            print(f"LockLost: {e}", flush=True)
            sys.exit(3)
""")


def _start_holder(url: str, options: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, url, json.dumps(options), str(LEASE_S)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"the holder did not take the lock: {line}{proc.stderr.read()}")
    return proc


def test_a_second_run_is_refused_while_the_first_holds_the_output(output):
    url, options = output
    first = Journal(open_store(url, options))
    with first.lock(lease_s=LEASE_S):
        with pytest.raises(OutputLocked, match=rf"is being written by another run.*pid {os.getpid()}") as refused:
            with Journal(open_store(url, options)).lock(lease_s=LEASE_S):
                pass
        assert Journal(open_store(url, options)).holder()["pid"] == os.getpid()  # what --dry-run reports
        if not url.startswith("/"):
            assert "lease ends at" in str(refused.value)
            time.sleep(LEASE_S + 0.5)  # longer than a lease: the holder's renewals keep it
            record = json.loads(first.store.read_bytes(first._lease.name))
            assert record["renewed"] > record["acquired"] and record["pid"] == os.getpid()
            with pytest.raises(OutputLocked):
                with Journal(open_store(url, options)).lock(lease_s=LEASE_S):
                    pass
        first.record_videos([{"video": {"uri": "/in/a.mp4"}, "retryable": False}])  # still the holder
    with Journal(open_store(url, options)).lock(lease_s=LEASE_S):  # released on exit
        pass
    assert first.store.list("_journal/lock") == []
    assert Journal(open_store(url, options)).holder() is None


def test_a_locked_output_is_refused_before_ray_starts_and_a_new_one_is_left_untouched(output, tmp_path):
    """jobs/curate.py checks the lock (runner.refuse_if_locked) before it starts Ray: refused while
    another run holds it, without taking it; an output that does not exist yet gets nothing created."""
    from pipeline.config import load_config
    from pipeline.runner import refuse_if_locked

    url, options = output
    config = load_config(None, storage_options=options)
    refuse_if_locked(url, config)  # free
    store = open_store(url, options)
    assert store.list("") == [] and (not url.startswith("/") or not Path(url).exists())
    holder = Journal(store)
    with holder.lock(lease_s=LEASE_S):
        with pytest.raises(OutputLocked, match=rf"being written by another run \(pid {os.getpid()}"):
            refuse_if_locked(url, config)
        holder.record_videos([{"video": {"uri": "/in/a.mp4"}, "retryable": False}])  # the check took nothing
    refuse_if_locked(url, config)  # released: free again


def test_a_killed_runs_lock_is_free_at_once_or_after_its_lease(output, capfd):
    url, options = output
    holder = _start_holder(url, options)
    holder.kill()
    holder.wait()
    successor = Journal(open_store(url, options))
    if url.startswith("/"):  # flock: the kernel released it with the process
        with successor.lock():
            assert len(successor.finished()) >= 1
        return
    with pytest.raises(OutputLocked, match=rf"pid {holder.pid} on .*lease ends at"):
        with successor.lock(lease_s=LEASE_S):
            pass
    time.sleep(LEASE_S + 0.2)
    with successor.lock(lease_s=LEASE_S):
        assert successor.store.list("_journal/lock") == ["_journal/lock/000002.json"]  # the dead run's is gone
        record = json.loads(successor.store.read_bytes("_journal/lock/000002.json"))
        assert record["pid"] == os.getpid() and record["owner"] == successor._lease.owner
        successor.record_videos([{"video": {"uri": "/in/successor.mp4"}, "retryable": False}])
    assert f"took over the lock {successor.store.uri('_journal/lock/000001.json')}: held by pid {holder.pid}" in \
        capfd.readouterr().err
    assert "/in/successor.mp4" in successor.finished()


def test_a_run_whose_lease_was_taken_over_stops(s3_output):
    """A holder paused past its lease (SIGSTOP: a stalled VM, a long GC) is taken over; resumed, it
    finds out before its next journal write and stops, leaving the new holder's lock alone."""
    url, options = s3_output
    holder = _start_holder(url, options)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(LEASE_S + 0.5)
        successor = Journal(open_store(url, options))
        with successor.lock(lease_s=30):
            os.kill(holder.pid, signal.SIGCONT)
            out, err = holder.communicate(timeout=60)
            assert holder.returncode == 3, err
            assert "LockLost" in out and "stops" in out
            written = len(successor.finished())  # the holder wrote nothing after the takeover
            successor.check_lock()
            record = json.loads(successor.store.read_bytes(successor._lease.name))
            assert record["owner"] == successor._lease.owner  # the stopped run did not delete it
            successor.record_videos([{"video": {"uri": "/in/successor.mp4"}, "retryable": False}])
        assert len(Journal(open_store(url, options)).finished()) == written + 1
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()


def test_the_lease_holder_stops_when_a_newer_generation_appears(s3_output):
    """In-process: another run creates the next generation of the lock (a takeover); the renewal
    thread sees it within lease/4 and the next journal write raises LockLost."""
    url, options = s3_output
    journal = Journal(open_store(url, options))
    with journal.lock(lease_s=1.0):
        journal.record_videos([{"video": {"uri": "/in/a.mp4"}, "retryable": False}])
        assert journal._lease.name == "_journal/lock/000001.json"
        other = {"owner": "another-run", "host": "elsewhere", "pid": 1, "acquired": time.time(),
                 "renewed": time.time(), "lease_s": 1.0}
        journal.store.put_bytes("_journal/lock/000002.json", json.dumps(other).encode())
        deadline = time.monotonic() + 10
        while journal._lease._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockLost, match="taken over by pid 1 on elsewhere"):
            journal.record_videos([{"video": {"uri": "/in/b.mp4"}, "retryable": False}])
    assert journal.store.list("_journal/lock") == ["_journal/lock/000001.json", "_journal/lock/000002.json"]
    assert set(Journal(open_store(url, options)).finished()) == {"/in/a.mp4"}


def test_runs_racing_for_a_stale_lock_take_it_exactly_once(s3_output):
    """Four runs start at once on an output whose lock a killed run left long ago: one takes it
    over, the others are refused (none deletes anything before it has won)."""
    url, options = s3_output
    store = open_store(url, options)
    dead = {"owner": "killed-run", "host": "gone", "pid": 7, "acquired": time.time() - 600,
            "renewed": time.time() - 500, "lease_s": 120.0}
    store.put_bytes("_journal/lock/000004.json", json.dumps(dead).encode())
    attempted = threading.Barrier(4)
    outcomes = []

    def start_a_run():
        journal = Journal(open_store(url, options))
        try:
            with journal.lock(lease_s=60):
                outcomes.append("took it")
                attempted.wait(timeout=60)  # hold it until every run has tried
        except OutputLocked as e:
            outcomes.append(str(e))
            attempted.wait(timeout=60)

    runs = [threading.Thread(target=start_a_run) for _ in range(4)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(timeout=120)
    assert outcomes.count("took it") == 1, outcomes
    assert all("is being written by another run" in o for o in outcomes if o != "took it")
    assert store.list("_journal/lock") == []  # the winner deleted the dead run's lock, then released its own
