"""pipeline/finalize.py on a local directory and on an S3 API (moto on 127.0.0.1): the tables streamed
from a real journal, run.json, and index.json last with checksums of the shard objects; a failure
part-way publishes no table and no index; refilter works through the store and a later curation run
applies its thresholds while building the tables once."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

import pyarrow as pa
import pytest

import schemas
from pipeline.config import load_config
from pipeline.finalize import (RunFacts, TableCounts, apply_filters, finalize_curation, read_index, read_table,
                               save_filters)
from pipeline.journal import Journal
from pipeline.shards import ShardInfo
from pipeline.store import open_store
from schemas import records

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")

TABLE_NAMES = ["manifest.parquet", "rejects.parquet", "scores.parquet", "videos.parquet"]


# ---- a small journal: 4 inputs, 3 kept clips in 2 real shards, 1 rejected clip, 2 rejected inputs ----

FACE_SIZES = {"a_0000": 150.0, "a_0001": 200.0, "b_0000": 250.0}


def _meta(video_id: str, ci: int) -> dict:
    key = f"{video_id}_{ci:04d}"
    return {"key": key, "video_id": video_id, "clip_index": ci, "profile": "smoke",
            "source": {"uri": f"/in/{video_id}.mp4", "source": "/in"},
            "clip": {"start_s": 2.0 * ci, "end_s": 2.0 * ci + 2.0, "n_frames": 50, "fps": 25, "track_id": 0},
            "crop": {"x0": 10.0, "y0": 20.0, "size": 300.0, "face_size_px": FACE_SIZES[key]},
            "scores": {"face_size_px": FACE_SIZES[key], "speech_ratio": 0.9, "sync_weights": "smoke-random",
                       "max_faces": 1}}


def _shard(store, url: str, metas: list[dict]) -> tuple[ShardInfo, list[dict], list[dict]]:
    """A real tar shard uploaded to the store, its index entry from the upload's size and sha256, and
    the manifest and scores rows of its samples."""
    buf = io.BytesIO()
    sizes = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for meta in metas:
            members = {"video.mp4": hashlib.sha256(meta["key"].encode()).digest() * 40,
                       "meta.json": json.dumps(meta).encode()}
            sizes[meta["key"]] = sum(len(v) for v in members.values())
            for name, data in members.items():
                info = tarfile.TarInfo(f"{meta['key']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with store.open_write(url) as up:
        up.write(buf.getvalue())
    info = ShardInfo(url=url, nsamples=len(metas), filesize=up.size, sha256=up.sha256, keys=[m["key"] for m in metas])
    manifest = [records.manifest_row_from_meta(m, shard=url, sample_bytes=sizes[m["key"]]) for m in metas]
    scores = [records.kept_scores_row(m, source="/in", features_computed=False) for m in metas]
    return info, manifest, scores


def _video(video_id: str, status: str, reason: str | None, n_candidates: int, n_kept: int, n_rejected: int) -> dict:
    return {"uri": f"/in/{video_id}.mp4", "video_id": video_id, "source": "/in", "status": status,
            "stage": None if status == "kept" else "detect", "reason": reason, "n_candidates": n_candidates,
            "n_kept": n_kept, "n_rejected_clips": n_rejected, "duration_s": 10.0, "timings": "{}", "coverage": None}


def build_journal(store, root, *, bad_video_row: bool = False) -> Journal:
    journal = Journal(root)
    for url, metas in (("shards/shard-000000.tar", [_meta("a", 0), _meta("a", 1)]),
                       ("shards/shard-000001.tar", [_meta("b", 0)])):
        journal.record_shard(*_shard(store, url, metas))
    common = {"uri": "/in/a.mp4", "video_id": "a", "source": "/in"}
    clip_reject = records.clip_reject(**common, clip_index=2, key="a_0002", stage="score", reason="no speech",
                                      retryable=False, rule="filters.speech_ratio_min", value=0.1, threshold=0.2,
                                      duration_s=2.0)
    clip_scores = records.scores_row(scores={"face_size_px": 300.0, "speech_ratio": 0.1}, key="a_0002", video_id="a",
                                     clip_index=2, uri="/in/a.mp4", source="/in", track_id=0, start_s=4.0, n_frames=50,
                                     fps=25, status="rejected", reject_stage="score", reject_reason="no speech",
                                     features_computed=False)
    no_face = records.input_reject(uri="/in/c.mp4", video_id="c", source="/in", stage="detect",
                                   reason="no face detected", retryable=False)
    crashed = records.input_reject(uri="/in/d.mp4", video_id="d", source="/in", stage="ray", reason="worker failed",
                                   retryable=True)
    d_row = _video("d", "rejected", "worker failed", 0, 0, 0)
    if bad_video_row:
        d_row["n_candidates"] = "several"  # not an int32: the videos table cannot be built
    journal.record_videos([
        {"video": _video("a", "kept", None, 3, 2, 1), "rejects": [clip_reject], "scores": [clip_scores], "retryable": False},
        {"video": _video("b", "kept", None, 1, 1, 0), "rejects": [], "scores": [], "retryable": False},
        {"video": _video("c", "rejected", "no face detected", 0, 0, 0), "rejects": [no_face], "scores": [],
         "retryable": False},
        {"video": d_row, "rejects": [crashed], "scores": [], "retryable": True},
    ])
    return journal


def _facts() -> RunFacts:
    return RunFacts(started=time.time(), inputs=4, inputs_this_run=4, argv=["jobs/curate.py"],
                    stage_seconds={"detect": 1.5}, nodes_used={"node-a"}, input_stats={"duplicates": 1},
                    driver_rows={"rows": 11, "row_bytes": 4321})


def _written_in_order(store, monkeypatch) -> list[str]:
    """Names the store is asked to write, in call order."""
    names: list[str] = []
    open_write, put_bytes = store.open_write, store.put_bytes

    def log(name):
        if not names or names[-1] != name:  # put_bytes may go through open_write: one write
            names.append(name)

    def logged_open_write(name):
        log(name)
        return open_write(name)

    def logged_put_bytes(name, data):
        log(name)
        return put_bytes(name, data)

    monkeypatch.setattr(store, "open_write", logged_open_write)
    monkeypatch.setattr(store, "put_bytes", logged_put_bytes)
    return names


def _check_index(store) -> dict:
    index = read_index(store)
    schemas.validate_index(index)
    for entry in index["shardlist"]:
        data = store.read_bytes(entry["url"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["filesize"], entry["sha256"])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers())) == entry["keys"]
    return index


def test_tables_run_json_and_index_last(store, tmp_path, monkeypatch, capsys):
    journal = build_journal(store, tmp_path / "journal")
    written = _written_in_order(store, monkeypatch)
    config = load_config(None)
    summary = finalize_curation(store, journal, config, _facts())

    assert sorted(written[:4]) == TABLE_NAMES and written[4:] == ["run.json", "index.json"]  # the index last
    assert sorted(store.list()) == sorted(TABLE_NAMES + ["index.json", "run.json", "shards/shard-000000.tar",
                                                         "shards/shard-000001.tar"])  # no temp object left
    manifest = read_table(store, "manifest.parquet")
    assert manifest.schema == schemas.MANIFEST_SCHEMA
    assert [(r["key"], r["shard"], r["duration_s"]) for r in manifest.to_pylist()] == [
        ("a_0000", "shards/shard-000000.tar", 2.0), ("a_0001", "shards/shard-000000.tar", 2.0),
        ("b_0000", "shards/shard-000001.tar", 2.0)]
    rejects = read_table(store, "rejects.parquet")
    assert rejects.schema == schemas.REJECTS_SCHEMA  # retryable stays in the journal, not a column
    assert [(r["video_id"], r["clip_index"], r["reason"]) for r in rejects.to_pylist()] == [
        ("a", 2, "no speech"), ("c", -1, "no face detected"), ("d", -1, "worker failed")]
    scores = read_table(store, "scores.parquet").to_pylist()
    assert [(r["key"], r["status"], r["face_size_px"]) for r in scores] == [
        ("a_0000", "kept", 150.0), ("a_0001", "kept", 200.0), ("b_0000", "kept", 250.0), ("a_0002", "rejected", 300.0)]
    assert [r["status"] for r in read_table(store, "videos.parquet").to_pylist()] == ["kept", "kept", "rejected", "rejected"]

    run = json.loads(store.read_bytes("run.json"))
    assert run["summary"] == summary
    assert {k: summary[k] for k in ("inputs", "inputs_kept", "inputs_rejected", "clips_kept", "clips_rejected", "shards",
                                    "input_duplicates", "shards_by_node", "tail_shards")} == {
        "inputs": 4, "inputs_kept": 2, "inputs_rejected": 2, "clips_kept": 3, "clips_rejected": 1, "shards": 2,
        "input_duplicates": 1, "shards_by_node": {}, "tail_shards": 0}  # entries without writer facts: none counted
    assert summary["inputs_rejected_by_reason"] == {"no face detected": 1, "worker failed": 1}
    assert summary["kept_hours"] == pytest.approx(6.0 / 3600) and summary["input_hours"] == pytest.approx(40.0 / 3600)
    assert (run["timings"]["driver_rows"], run["timings"]["driver_row_bytes"]) == (11, 4321)
    assert run["nodes_used"] == ["node-a"]
    assert run["config_fingerprint"] and run["timings"]["stage_cpu_s"] == {"detect": 1.5}

    index = _check_index(store)
    assert index["nsamples"] == 3 and "selection" not in index
    assert index["members"] == sorted(records.sample_members(config.features.enabled))
    assert len(index["members"]) == (6 if config.features.enabled else 2)
    assert f"Output: {store.url}" in capsys.readouterr().err


def test_a_failure_part_way_publishes_no_table_and_no_index(store, tmp_path):
    journal = build_journal(store, tmp_path / "journal", bad_video_row=True)
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError)):
        finalize_curation(store, journal, load_config(None), _facts())
    # the manifest and rejects were complete, but nothing is published unless every table is
    assert sorted(store.list()) == ["shards/shard-000000.tar", "shards/shard-000001.tar"]


def test_refilter_through_the_store_then_a_curation_keeps_its_thresholds(store, tmp_path):
    journal = build_journal(store, tmp_path / "journal")
    config = load_config(None)
    finalize_curation(store, journal, config, _facts())
    stricter = config.filters.model_copy(update={"face_size_px_min": 180.0})

    report = apply_filters(store, stricter, journal=journal)
    assert (report["kept"], report["left"], report["entered"]) == (2, ["a_0000"], [])
    assert read_table(store, "manifest.parquet").column("key").to_pylist() == ["a_0001", "b_0000"]
    left = [r for r in read_table(store, "rejects.parquet").to_pylist() if r["stage"] == "refilter"]
    assert [(r["key"], r["reason"], r["value"], r["threshold"]) for r in left] == [("a_0000", "face too small", 150.0, 180.0)]
    assert read_table(store, "needs_rerun.parquet").num_rows == 0
    run = json.loads(store.read_bytes("run.json"))
    assert len(run["refilters"]) == 1 and run["config"]["filters"]["face_size_px_min"] == 180.0
    index = _check_index(store)
    assert index["selection"]["nsamples"] == 2 and index["nsamples"] == 3  # the shards still hold all three

    # A later curation run into this output (nothing new): the saved thresholds shape its tables.
    save_filters(store, stricter)
    summary = finalize_curation(store, journal, config, _facts())
    assert read_table(store, "manifest.parquet").column("key").to_pylist() == ["a_0001", "b_0000"]
    run = json.loads(store.read_bytes("run.json"))
    assert summary["clips_kept"] == 3 and [r["left"] for r in run["refilters"]] == [["a_0000"]]
    assert _check_index(store)["selection"]["nsamples"] == 2


def test_run_json_counts_shards_by_node_and_tail_shards():
    """Shard entries with the distributed writers' facts; entries of older runs have none."""
    def entry(url, node, closed_by, inside=False):
        shard = {"url": url, "nsamples": 1, "filesize": 10, "sha256": "0" * 64, "keys": [url[-5]]}
        facts = {"writer": {"node_id": node, "node_ip": "10.0.0.1", "writer": 0}, "closed_by": closed_by}
        if inside:
            shard.update(facts)
            return {"shard": shard, "manifest": [], "scores": []}
        return dict({"shard": shard, "manifest": [], "scores": []}, **facts)

    counts = TableCounts()
    for e in [entry("shards/s1.tar", "n1", "cap"), entry("shards/s2.tar", "n1", "end"),
              entry("shards/s3.tar", "n2", "end", inside=True),
              {"shard": {"url": "shards/old.tar", "nsamples": 1, "filesize": 10, "sha256": "0" * 64}, "manifest": []}]:
        counts.add_shard(e)
    assert counts.shards_by_node == {"n1": 2, "n2": 1} and counts.tail_shards == 2
    assert [s.as_index_entry().keys() for s in counts.shards][2] == {"url", "nsamples", "filesize", "sha256", "keys"}


def test_a_full_disk_publishes_nothing_and_leaves_no_temp_file(tmp_path):
    """No space left while the tables stream (a 64 KiB tmpfs): the error is the OSError the runner turns
    into OutputFullError, and not a byte of any table, run.json or index.json remains."""
    import errno
    import os

    from test_faults import small_tmpfs

    journal = Journal(tmp_path / "journal")
    journal.record_videos([{"video": _video(f"v{i}", "rejected", "no face detected", 0, 0, 0), "retryable": False,
                            "rejects": [records.input_reject(uri=f"/in/v{i}.mp4", video_id=f"v{i}", source="/in",
                                                             stage="detect", reason="no face detected", retryable=False,
                                                             detail=os.urandom(1000).hex())], "scores": []}
                           for i in range(200)])  # ~400 KB of incompressible details
    with small_tmpfs(tmp_path / "mnt", "64k") as mnt:
        store = open_store(mnt / "out")
        with pytest.raises(OSError) as e:
            finalize_curation(store, journal, load_config(None), _facts())
        assert e.value.errno == errno.ENOSPC
        assert [p for p in mnt.rglob("*") if p.is_file()] == []
