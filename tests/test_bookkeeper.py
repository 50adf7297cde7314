"""The driver's Bookkeeper, fed synthetic records (no Ray, no video): what it journals and when.

Records arrive as the writer stage emits them (pipeline/writer.py): ``summary``/``reject`` rows
of the stages, ``written`` for a kept clip, ``shard`` for a shard a writer closed, in whatever
order the workers' outputs reach the driver. The journal is the real one, on a temp directory.
"""
from __future__ import annotations

import errno
import json

import pytest

from journal_rows import outcome_rows, synthetic_items
from pipeline.bookkeeper import SHARD, WRITE_ERROR, WRITTEN, Bookkeeper, _is_retryable, write_error_payload
from pipeline.journal import Journal
from pipeline.stages import new_row


def _row(item, kind, payload, clip_index=-1):
    row = new_row(item.video_id, item.uri, item.source, kind, payload, clip_index=clip_index)
    return {k: row[k] for k in ("video_id", "uri", "source", "kind", "clip_index", "payload")}


def _summary(item, n):
    return _row(item, "summary", {"n_candidates": n, "probe": {"duration_s": 10.0}, "timings": {"detect": 1.5},
                                  "nodes": {"detect": "node-a"}})


def _written(item, ci, shard="shards/shard-r0001-w000-000000.tar"):
    return _row(item, WRITTEN, {"key": f"{item.video_id}_{ci:04d}", "duration_s": 4.0, "shard": shard,
                                "sample_bytes": 1000}, clip_index=ci)


def _reject(item, ci, reason="no speech", **extra):
    return _row(item, "reject", {"uri": item.uri, "video_id": item.video_id, "clip_index": ci,
                                 "key": None if ci < 0 else f"{item.video_id}_{ci:04d}", "stage": "score",
                                 "reason": reason, "detail": "", "duration_s": 4.0, "source": item.source,
                                 **extra}, clip_index=ci)


def _shard(keys, n=0, closed_by="cap", writer=0):
    url = f"shards/shard-r0001-w{writer:03d}-{n:06d}.tar"
    return {"shard": {"url": url, "nsamples": len(keys), "filesize": 10240 * len(keys), "sha256": "ab" * 32,
                      "keys": list(keys), "writer": {"node_id": "n1", "node_ip": "10.0.0.1", "writer": writer},
                      "closed_by": closed_by},
            "manifest": [{"key": k, "shard": url, "duration_s": 4.0} for k in keys],
            "scores": [{"key": k, "status": "kept"} for k in keys]}


def _shard_row(record):
    return {"video_id": "", "uri": "", "source": "", "kind": SHARD, "clip_index": -1, "payload": json.dumps(record)}


@pytest.fixture
def journal(tmp_path):
    return Journal(tmp_path / "out")


def _finished(journal):
    return {v["video"]["uri"]: v for v in journal.videos()}


def test_an_input_is_journaled_once_its_clips_are_in_a_journaled_shard(journal):
    a, b = synthetic_items(2)
    books = Bookkeeper(journal, [a, b], flush_every=1)
    books.add(_summary(a, 2))
    books.add(_written(a, 0))
    books.add(_reject(a, 1))
    books.add(_row(b, "reject", {"uri": b.uri, "video_id": b.video_id, "clip_index": -1, "key": None,
                                 "stage": "detect", "reason": "no face found", "duration_s": 3.0}))
    assert set(_finished(journal)) == {b.uri}  # a waits for its shard
    assert books.in_flight == 1
    books.add(_shard_row(_shard([f"{a.video_id}_0000"])))
    done = _finished(journal)
    assert done[a.uri]["video"]["status"] == "kept" and done[a.uri]["video"]["n_kept"] == 1
    assert [r["reason"] for r in done[a.uri]["rejects"]] == ["no speech"] and not done[a.uri]["retryable"]
    assert done[b.uri]["video"]["reason"] == "no face found"
    assert [e["shard"]["closed_by"] for e in journal.shards()] == ["cap"]
    assert journal.shards()[0]["shard"]["writer"] == {"node_id": "n1", "node_ip": "10.0.0.1", "writer": 0}
    assert books.in_flight == 0 and books.stage_seconds == {"detect": 1.5} and books.nodes_used == {"node-a"}


def test_a_shard_record_may_arrive_before_the_written_records_of_its_samples(journal):
    a, b = synthetic_items(2)
    books = Bookkeeper(journal, [a, b], flush_every=1)
    books.add(_summary(a, 1))
    # b's clip closed the shard on another worker; its records come later than the shard's
    books.add(_shard_row(_shard([f"{a.video_id}_0000", f"{b.video_id}_0000"])))
    assert _finished(journal) == {}
    books.add(_written(a, 0))
    assert set(_finished(journal)) == {a.uri}
    books.add(_written(b, 0))
    books.add(_summary(b, 1))
    assert set(_finished(journal)) == {a.uri, b.uri}
    assert all(v["video"]["status"] == "kept" for v in journal.videos())
    books.finish()
    assert books.worker_failed == [] and len(journal.videos()) == 2


def test_clips_published_by_a_killed_run_stay_kept(journal):
    (a,) = synthetic_items(1)
    committed = {f"{a.video_id}_0000", f"{a.video_id}_0001"}
    books = Bookkeeper(journal, [a], committed, flush_every=1)
    books.add(_summary(a, 3))
    books.add(_written(a, 0, shard=None))  # the write stage did not write it again
    books.add(_reject(a, 1, reason="internal error"))  # this run's transient failure of a published clip
    books.add(_reject(a, 2))
    (entry,) = journal.videos()
    assert entry["video"]["status"] == "kept" and entry["video"]["n_kept"] == 2
    assert [r["clip_index"] for r in entry["rejects"]] == [2] and not entry["retryable"]
    assert journal.shards() == []


def test_end_of_stream_journals_inputs_without_outcome_as_worker_failed(journal):
    """A failed task (no records), and a failed writer (its open shard never closed): "worker
    failed", retryable; clips in a journaled shard stay kept, those of the lost shard do not."""
    a, b, c, d = synthetic_items(4)
    books = Bookkeeper(journal, [a, b, c, d], flush_every=1)
    books.add(_summary(a, 2))
    books.add(_written(a, 0, shard="shards/shard-r0001-w000-000000.tar"))
    books.add(_written(a, 1, shard="shards/shard-r0001-w001-000000.tar"))  # writer 1 died with it open
    books.add(_shard_row(_shard([f"{a.video_id}_0000"])))
    books.add(_summary(b, 1))  # b's written record was lost with its task, its shard was journaled
    books.add(_shard_row(_shard([f"{b.video_id}_0000"], n=1)))
    books.add(_summary(d, 1))
    books.add(_written(d, 0))
    assert _finished(journal) == {}
    books.add_shard(_shard([f"{d.video_id}_0000"], n=2, closed_by="end"))  # close_writers: a tail shard
    assert set(_finished(journal)) == {d.uri}
    books.finish()
    done = _finished(journal)
    assert set(done) == {a.uri, b.uri, c.uri, d.uri} and sorted(books.worker_failed) == sorted([a.uri, b.uri, c.uri])
    for uri in (a.uri, b.uri, c.uri):
        v = done[uri]
        assert (v["video"]["status"], v["video"]["reason"], v["retryable"]) == ("rejected", "worker failed", True)
        assert v["rejects"][0]["stage"] == "ray" and "retried by the next run" in v["rejects"][0]["detail"]
    assert done[a.uri]["video"]["n_kept"] == 1 and "never closed" in done[a.uri]["rejects"][0]["detail"]
    assert done[b.uri]["video"]["n_kept"] == 1 and done[c.uri]["video"]["n_kept"] == 0
    assert done[d.uri]["video"]["status"] == "kept"
    assert len(journal.shards()) == 3 and [s.closed_by for s in books.shards] == ["cap", "cap", "end"]
    assert journal.finished() == {a.uri: True, b.uri: True, c.uri: True, d.uri: False}


def test_a_shard_that_cannot_be_journaled_is_discarded(tmp_path):
    class FullJournal(Journal):
        def record_shard(self, info, manifest_rows, score_rows=None):
            raise OSError(errno.ENOSPC, "No space left on device", "x")

    (a,) = synthetic_items(1)
    discarded = []
    books = Bookkeeper(FullJournal(tmp_path / "out"), [a], discard_shard=discarded.append)
    with pytest.raises(OSError) as e:
        books.add(_shard_row(_shard([f"{a.video_id}_0000"])))
    assert e.value.errno == errno.ENOSPC and discarded == ["shards/shard-r0001-w000-000000.tar"]


def test_a_write_error_stops_the_run_with_its_errno(journal):
    (a,) = synthetic_items(1)
    payload = write_error_payload(OSError(errno.ENOSPC, "No space left on device", "/out/shards/.x.tmp1"),
                                  "/out/shards/x.tar")
    books = Bookkeeper(journal, [a])
    with pytest.raises(OSError) as e:
        books.add(_row(a, WRITE_ERROR, payload))
    assert e.value.errno == errno.ENOSPC and "/out/shards/x.tar" in str(e.value)


def test_a_key_written_twice_in_one_run_is_an_error(journal):
    a, b = synthetic_items(2)
    twin = b.__class__(uri=b.uri, source=b.source, video_id=a.video_id)
    books = Bookkeeper(journal, [a, twin])
    books.add(_written(a, 0))
    with pytest.raises(RuntimeError, match="produced twice"):
        books.add(_written(twin, 0))


def test_finished_inputs_are_journaled_in_parts(journal):
    items = synthetic_items(10)
    now = [0.0]
    books = Bookkeeper(journal, items, flush_every=4, flush_after_s=10, clock=lambda: now[0])
    for it in items[:3]:
        books.add(_reject(it, -1))
    assert journal.videos() == []
    books.add(_reject(items[3], -1))
    assert len(journal.videos()) == 4  # a part of 4
    books.add(_reject(items[4], -1))
    now[0] = 11.0
    books.add(_reject(items[5], -1))  # more than 10 s since the last part
    assert len(journal.videos()) == 6
    books.finish()
    assert len(journal.videos()) == 10 and len(books.worker_failed) == 4


def test_records_of_the_synthetic_stage_rows_through_the_real_writer(tmp_path):
    """journal_rows' stage rows (blobs included) through write_rows and a real ShardSink: every input
    journaled once, every kept clip in exactly one journaled shard."""
    from journal_rows import plan
    from pipeline.store import open_store
    from pipeline.writer import LocalWriter, ShardSink, close_writers, write_rows

    store = open_store(tmp_path / "out")
    journal = Journal(store.local_path())
    items = synthetic_items(30)
    writers = [LocalWriter(ShardSink(store, 40_000, run=1, writer=0))]
    books = Bookkeeper(journal, items)
    rows = (r for i, it in enumerate(items) for r in outcome_rows(i, it))
    for record in write_rows(rows, writers):
        assert set(record) == {"video_id", "uri", "source", "kind", "clip_index", "payload"}
        books.add(record)
    records, failed, error = close_writers(writers)
    assert failed == [] and error is None and len(records) == 1
    books.add_shard(records[0])
    books.finish()
    assert books.worker_failed == []
    keys = [k for e in journal.shard_entries() for k in e["keys"]]
    assert len(keys) == len(set(keys)) == sum(plan(i)[0] for i in range(30))
    assert sorted(store.list("shards")) == sorted(e["url"] for e in journal.shard_entries())
    assert len(journal.finished()) == 30


def test_explicit_retryable_field_wins_over_the_reason():
    assert _is_retryable({"reason": "no speech", "retryable": True})
    assert not _is_retryable({"reason": "worker failed", "retryable": False})
    assert _is_retryable({"reason": "worker failed"}) and not _is_retryable({"reason": "timed out"})


def test_the_driver_receives_records_whatever_the_sample_size(tmp_path):
    """run_curation with the stage rows (row_source) of 40 inputs whose mp4 members are 2 KB, then 200 KB:
    the shards grow 33x, the bytes of the rows the driver iterates (run.json timings) stay put."""
    from pipeline.config import load_config
    from pipeline.runner import run_curation

    # one shard either way: the driver gets a record per input outcome and kept clip, and one per shard
    config = load_config(None, **{"features.enabled": False, "write.shard_max_bytes": 16 << 20})
    items = synthetic_items(40)
    facts = {}
    for mp4_bytes in (2048, 204_800):
        def rows(todo, mp4_bytes=mp4_bytes):
            for i, it in enumerate(todo):
                for r in outcome_rows(i, it):
                    yield dict(r, mp4=bytes(mp4_bytes)) if r["kind"] == "clip" else r

        out = tmp_path / f"out-{mp4_bytes}"
        run_curation(items, out, config, progress_every_s=3600, row_source=rows)
        run = json.loads((out / "run.json").read_text())
        written = sum(p.stat().st_size for p in (out / "shards").iterdir())
        facts[mp4_bytes] = (run["timings"]["driver_rows"], run["timings"]["driver_row_bytes"], written)
    (rows_a, bytes_a, written_a), (rows_b, bytes_b, written_b) = facts[2048], facts[204_800]
    assert written_b > 30 * written_a
    assert rows_a == rows_b and abs(bytes_b - bytes_a) < 0.01 * bytes_a  # only sizes' digits differ
    assert bytes_b < written_b / 10
