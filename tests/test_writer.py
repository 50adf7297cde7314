"""Shard writers (pipeline/writer.py) on a local directory and an S3 API (moto on 127.0.0.1), and as
Ray actors behind the write stage: names unique per run and writer, shards whole or absent,
small records to the driver, a dead writer's samples redone rather than lost."""
from __future__ import annotations

import errno
import hashlib
import time
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from moto_s3 import s3_options

from journal_rows import outcome_rows, plan, synthetic_items
from pipeline.bookkeeper import SHARD, WRITTEN, Bookkeeper
from pipeline.journal import Journal
from pipeline.store import open_store
from pipeline.writer import (RECORD_COLUMNS, LocalWriter, ShardSink, WriterUnavailable, close_writers, write_rows)

ROOT = Path(__file__).resolve().parents[1]
NAME = r"shards/shard-r(\d{4})-w(\d{3})-(\d{6})\.tar"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """(url, storage_options) of an empty output."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://out/writer-{request.node.name.replace('[', '-').rstrip(']')}", s3_options(endpoint)


def _sample(key: str, nbytes: int, seed: int) -> dict:
    video = hashlib.sha256(f"{seed}".encode()).digest() * (nbytes // 32)
    members = {"video.mp4": video, "meta.json": json.dumps({"key": key}).encode()}
    return {"key": key, "members": members, "manifest": {"key": key, "shard": None, "sample_bytes": len(video)},
            "scores": {"key": key, "status": "kept"}}


def _tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_two_writers_write_whole_shards_under_unique_names(store_url):
    import re

    url, options = store_url
    store = open_store(url, options)
    store.put_bytes("shards/shard-r0001-w000-000000.tar", b"an earlier run's shard")
    sinks = [ShardSink(url, 3 * 12_000, run=2, writer=i, storage_options=options) for i in range(2)]
    written, records = {}, []
    for n in range(14):
        sample = _sample(f"vid{n:03d}_0000", 9_000, n)
        result = sinks[n % 2].write(sample)
        written[sample["key"]] = (result["shard"], sample["members"])
        records += result["closed"]
    assert not store.exists(written["vid013_0000"][0])  # the open shards are not visible
    for sink in sinks:
        records += sink.close()["closed"]
    names = [r["shard"]["url"] for r in records]
    assert len(names) == len(set(names)) == 6  # 7 samples per writer: 3 + 3 (at the cap) + 1 (the tail)
    assert sorted(store.list("shards")) == sorted(names + ["shards/shard-r0001-w000-000000.tar"])
    assert store.read_bytes("shards/shard-r0001-w000-000000.tar") == b"an earlier run's shard"
    for r in records:
        entry = r["shard"]
        run, writer, _ = (int(g) for g in re.fullmatch(NAME, entry["url"]).groups())
        assert (run, writer) == (2, entry["writer"]["writer"]) and entry["writer"]["node_id"] is None
        data = store.read_bytes(entry["url"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["filesize"], entry["sha256"])
        assert len(data) <= 3 * 12_000 + tarfile.RECORDSIZE  # the cap, plus tarfile's end-of-archive padding
        members = _tar_members(data)
        assert sorted({m.split(".", 1)[0] for m in members}) == sorted(entry["keys"])
        for key in entry["keys"]:
            assert written[key][0] == entry["url"]
            assert {m: members[f"{key}.{m}"] for m in written[key][1]} == written[key][1]
        assert [m["key"] for m in r["manifest"]] == entry["keys"] and {m["shard"] for m in r["manifest"]} == {entry["url"]}
        assert [s["key"] for s in r["scores"]] == entry["keys"]
    closed_by = {w: [r["shard"]["closed_by"] for r in records if r["shard"]["writer"]["writer"] == w] for w in (0, 1)}
    assert closed_by == {0: ["cap", "cap", "end"], 1: ["cap", "cap", "end"]}
    with pytest.raises(WriterUnavailable):
        sinks[0].write(_sample("late_0000", 10, 0))  # closed: a late sample would never be published


def test_an_aborted_writer_leaves_no_object(store_url):
    url, options = store_url
    sink = ShardSink(url, 25_000, run=1, writer=3, storage_options=options)
    results = [sink.write(_sample(f"vid{n:03d}_0000", 9_000, n)) for n in range(5)]
    closed = [r["shard"]["url"] for res in results for r in res["closed"]]
    assert len(closed) == 2 and results[-1]["shard"] not in closed
    sink.abort()
    store = open_store(url, options)
    assert store.list() == sorted(closed)
    if store.is_local:
        assert sorted(p.name for p in store.local_path("shards").iterdir()) == sorted(Path(c).name for c in closed)
    with pytest.raises(WriterUnavailable):
        sink.write(_sample("late_0000", 10, 0))


def test_a_killed_writer_process_leaves_no_object(store_url):
    """SIGKILL in the middle of a shard (no abort runs): nothing appears under shards/ on the S3
    API; locally only the temp file, which the next run's cleanup deletes (remove_stale_temp_files)."""
    from pipeline.shards import remove_stale_temp_files

    url, options = store_url
    code = f"""
import os, signal, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from pipeline.writer import ShardSink
from test_writer import _sample
sink = ShardSink({url!r}, 8 << 20, run=1, writer=0, storage_options={options!r})
for n in range(3):
    sink.write(_sample(f"vid{{n:03d}}_0000", 3 << 20, n))  # 9 MB into an 8 MB cap: one shard closed
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    store = open_store(url, options)
    if store.is_local:  # the open shard's temp file ".shard-r0001-w000-000001.tar.tmp<pid>"
        assert [Path(n).name.split(".tar")[0] for n in store.list("shards")] == [".shard-r0001-w000-000001",
                                                                                 "shard-r0001-w000-000000"]
        remove_stale_temp_files(store.local_path())
    assert store.list("shards") == ["shards/shard-r0001-w000-000000.tar"]


def test_write_rows_sends_samples_on_and_passes_small_records(tmp_path):
    store = open_store(tmp_path / "out")
    items = synthetic_items(10)
    rows = [r for i, it in enumerate(items) for r in outcome_rows(i, it)]
    closed = ShardSink(store, 1 << 20, run=1, writer=0)
    closed.close()
    live = LocalWriter(ShardSink(store, 1 << 20, run=1, writer=1))
    committed = {f"{items[2].video_id}_0000"}
    records = list(write_rows(rows, [LocalWriter(closed), live], committed_keys=committed, features=False))
    assert all(tuple(r) == RECORD_COLUMNS for r in records)  # no blob column
    written = [json.loads(r["payload"]) for r in records if r["kind"] == WRITTEN]
    assert len(written) == sum(plan(i)[0] for i in range(10))
    assert {w["key"] for w in written if w["shard"] is None} == committed  # not written again
    assert {w["shard"] for w in written if w["shard"]} == {"shards/shard-r0001-w001-000000.tar"}
    assert all(w["sample_bytes"] > 2048 for w in written if w["shard"])
    assert [r["kind"] for r in records if r["kind"] not in (WRITTEN, "summary", "reject")] == []
    (tail,) = live.close()["closed"]
    assert tail["shard"]["closed_by"] == "end" and committed.isdisjoint(tail["shard"]["keys"])
    assert len(tail["manifest"]) == len(written) - 1

    # no writer left: the clips become retryable "worker failed" rejects, the rest passes
    records = list(write_rows(outcome_rows(3, items[3]), [LocalWriter(closed), live]))  # a summary, a kept clip
    assert [r["kind"] for r in records] == ["summary", "reject"]
    rejects = [json.loads(r["payload"]) for r in records if r["kind"] == "reject"]
    assert [(p["stage"], p["reason"], p["retryable"]) for p in rejects] == [("write", "worker failed", True)]
    assert "no shard writer could take its sample" in rejects[0]["detail"]

    # a meta.json off its schema (a bug upstream): an internal error of that clip, not the job's end
    rows = outcome_rows(3, items[3])
    meta = json.loads(rows[1]["payload"])
    rows[1] = dict(rows[1], payload=json.dumps(dict(meta, schema_version=2)))
    (reject,) = [json.loads(r["payload"]) for r in write_rows(rows, [live]) if r["kind"] == "reject"]
    assert (reject["reason"], reject["retryable"]) == ("internal error", True) and "could not be built" in reject["detail"]


def test_a_full_disk_stops_the_run_and_leaves_no_temp_file(tmp_path):
    from test_faults import small_tmpfs

    with small_tmpfs(tmp_path / "mnt", "64k") as mnt:
        store = open_store(mnt / "out")
        writer = LocalWriter(ShardSink(store, 1 << 20, run=1, writer=0))
        items = synthetic_items(40)
        rows = (r for i, it in enumerate(items) for r in outcome_rows(i, it))
        books = Bookkeeper(Journal(tmp_path / "journal"), items)
        with pytest.raises(OSError) as e:
            for record in write_rows(rows, [writer]):
                books.add(record)
        assert e.value.errno == errno.ENOSPC and str(mnt / "out" / "shards") in str(e.value)
        writer.abort()
        assert [p for p in mnt.rglob("*") if p.is_file()] == []

        # the disk fills up before the tail shard's end: close reports it, and nothing is published
        writer = LocalWriter(ShardSink(store, 1 << 20, run=2, writer=0))
        assert "shard" in writer.write(_sample("vid000_0000", 20_000, 0))
        with open(mnt / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"x" * 4096)
        records, failed, error = close_writers([writer])
        assert (records, failed, error["errno"]) == ([], [], errno.ENOSPC)
        assert "shard-r0002-w000-000000.tar" in error["message"]
        assert [p.name for p in mnt.rglob("*") if p.is_file()] == ["filler"]


def test_write_stage_on_ray_two_writers_and_a_dead_one(tmp_path, ray_local):
    """The write stage on embedded Ray with 2 writer actors: shards from both, records of a few
    KB (manifest and scores rows) for samples of 256 KB; then a writer killed mid-run: the samples after the kill
    go to the other writer, its open shard never appears, and the inputs it held end "worker failed"."""
    import ray

    from pipeline.writer import RayWriter, add_write_stage, start_writers, stop_writers

    store = open_store(tmp_path / "out")
    items = synthetic_items(24)
    rows = []
    for i, it in enumerate(items):
        for r in outcome_rows(i, it):
            if r["kind"] == "clip":
                r["mp4"] = os.urandom(256 << 10)
            rows.append(r)
    writers = start_writers(store.url, {}, 1_200_000, run=1, count=2)
    assert [w.index for w in writers] == [0, 1] and all(isinstance(w, RayWriter) for w in writers)
    journal = Journal(store.local_path())
    books = Bookkeeper(journal, items)
    ds = add_write_stage(ray.data.from_items(rows, override_num_blocks=12), writers, frozenset(), False)
    driver_bytes = 0
    for row in ds.iter_rows():
        driver_bytes += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row.values())
        books.add(row)
    records, failed, error = close_writers(writers)
    for record in records:
        books.add_shard(record)
    books.finish()
    stop_writers(writers)
    kept = sum(plan(i)[0] for i in range(24))
    assert failed == [] and error is None and books.worker_failed == []
    entries = journal.shard_entries()
    assert {e["writer"]["writer"] for e in entries} == {0, 1}
    assert sorted(k for e in entries for k in e["keys"]) == sorted(f"{it.video_id}_{c:04d}" for i, it in
                                                                    enumerate(items) for c in range(plan(i)[0]))
    assert sorted(store.list("shards")) == sorted(e["url"] for e in entries)
    for e in entries:
        data = store.read_bytes(e["url"])
        assert hashlib.sha256(data).hexdigest() == e["sha256"]
        assert len(data) == e["filesize"] <= 1_200_000 + tarfile.RECORDSIZE
    # records (~16 KB per kept clip, mostly its scores row's identity embedding), not samples
    assert driver_bytes < kept * (256 << 10) / 10

    # A writer dies mid-run (its node lost, OOM): in-process write_rows over the actor handles.
    out2 = open_store(tmp_path / "out2")
    victim, survivor = start_writers(out2.url, {}, 1 << 20, run=1, count=2)
    journal2 = Journal(out2.local_path())
    books = Bookkeeper(journal2, items)
    for i, it in enumerate(items):
        if i == 12:
            ray.kill(victim.handle, no_restart=True)
            # ray.kill is asynchronous: wait until the actor is gone, so items 12.. find it dead
            with pytest.raises(ray.exceptions.RayActorError):
                for _ in range(600):
                    ray.get(victim.handle.node.remote())
                    time.sleep(0.05)
        for record in write_rows(outcome_rows(i, it), [victim, survivor]):
            books.add(record)
    records, failed, error = close_writers([victim, survivor])
    assert len(failed) == 1 and failed[0].startswith("writer 0") and error is None
    for record in records:
        books.add_shard(record)
    books.finish()
    stop_writers([survivor])
    lost = {it.uri for i, it in enumerate(items[:12]) if plan(i)[0]}  # their clips were in the victim's open shard
    assert set(books.worker_failed) == lost
    finished = journal2.finished()
    assert len(finished) == 24 and {u for u, retry in finished.items() if retry} == lost
    (entry,) = journal2.shard_entries()
    assert entry["writer"]["writer"] == 1 and entry["closed_by"] == "end"
    assert sorted(entry["keys"]) == sorted(f"{it.video_id}_{c:04d}" for i, it in enumerate(items)
                                           if i >= 12 for c in range(plan(i)[0]))
    # the victim's open shard: only its temp file, which the next run's cleanup deletes
    assert [n for n in out2.list("shards") if n != entry["url"]] == [
        n for n in out2.list("shards") if Path(n).name.startswith(".shard-r0001-w000-000000.tar.tmp")]
    from pipeline.shards import remove_stale_temp_files

    remove_stale_temp_files(out2.local_path())
    assert out2.list("shards") == [entry["url"]]


def test_the_end_of_a_run_deletes_its_unjournaled_shards_only(tmp_path):
    """A shard whose record was lost with its write task, or closed while the run was stopping, and a
    dead writer's temp file: this run's, without a journal entry, deleted once its writers are stopped."""
    from pipeline.runner import _remove_unjournaled_shards

    store = open_store(tmp_path / "out")
    names = ["shards/shard-000007.tar", "shards/shard-r0001-w000-000000.tar",  # earlier runs'
             "shards/shard-r0002-w000-000000.tar", "shards/shard-r0002-w001-000000.tar",  # this run's
             "shards/.shard-r0002-w001-000001.tar.tmp4242"]  # a dead writer's open shard
    for name in names:
        store.put_bytes(name, b"x")
    removed = _remove_unjournaled_shards(store, 2, {"shards/shard-r0002-w000-000000.tar"})
    assert sorted(removed) == ["shards/.shard-r0002-w001-000001.tar.tmp4242", "shards/shard-r0002-w001-000000.tar"]
    assert store.list("shards") == sorted(names[:3])


def test_writer_actors_write_to_the_s3_api(s3_endpoint, ray_local):
    """Writer actors open the store themselves from (url, storage_options): shards land on the S3 API,
    whole, sha256 and size as recorded."""
    from pipeline.writer import start_writers, stop_writers

    url, options = "s3://out/writer-actors", s3_options(s3_endpoint)
    writers = start_writers(url, options, 40_000, run=5, count=2)
    items = synthetic_items(12)
    records = []
    try:
        for i, it in enumerate(items):
            order = writers if i % 2 else writers[::-1]
            records += [json.loads(r["payload"]) for r in write_rows(outcome_rows(i, it), order) if r["kind"] == SHARD]
        tails, failed, error = close_writers(writers)
    finally:
        stop_writers(writers)
    assert failed == [] and error is None
    entries = [r["shard"] for r in records + tails]
    store = open_store(url, options)
    assert sorted(store.list("shards")) == sorted(e["url"] for e in entries)
    assert {e["writer"]["writer"] for e in entries} == {0, 1} and all(e["url"].startswith("shards/shard-r0005-")
                                                                       for e in entries)
    for e in entries:
        data = store.read_bytes(e["url"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (e["filesize"], e["sha256"])
    assert sorted(k for e in entries for k in e["keys"]) == sorted(
        f"{it.video_id}_{c:04d}" for i, it in enumerate(items) for c in range(plan(i)[0]))
