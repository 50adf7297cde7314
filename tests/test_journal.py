"""The progress journal's crash windows, without Ray: what a restart keeps and what it drops."""
from __future__ import annotations

import json
import os

import pytest

import pipeline.journal as journal_mod
from pipeline.config import load_config
from pipeline.journal import Journal, config_fingerprint
from pipeline.runner import run_curation
from pipeline.shards import ShardInfo, ShardWriter, verify_index
from pipeline.store import open_store


def test_restart_drops_unpublished_and_unjournaled_shards(tmp_path):
    out = tmp_path / "out"
    journal = Journal(out)
    writer = ShardWriter(out, 1 << 20)
    writer.write("vid-a_0000", {"meta.json": b"{}"})
    info = writer.close_current()
    journal.record_shard(info, [{"key": "vid-a_0000", "uri": "/x/a.mp4", "duration_s": 2.0}], [])  # published + journaled
    writer.write("vid-b_0000", {"meta.json": b"{}"})
    writer.close_current()  # renamed into place, killed before its journal entry: an orphan
    writer.write("vid-c_0000", {"meta.json": b"{}"})  # still a temp file when the run died
    assert list((out / "shards").glob(".shard-000002.tar.tmp*"))  # the store's temp name: .NAME.tmp<pid>

    config = load_config(None, **{"features.enabled": False})
    run_curation([], out, config, progress_every_s=60)  # nothing new to do: just the restart path
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.tar"]
    index = json.loads((out / "index.json").read_text())
    assert [e["keys"] for e in index["shardlist"]] == [["vid-a_0000"]]
    assert verify_index(out) == []
    assert Journal(out).next_shard_index() == 1


def test_fingerprint_ignores_resources_not_results():
    base = load_config(None).model_dump(mode="json")
    resized = load_config(None, **{"features.actors": 8, "features.num_gpus": 0.5, "ray.detect_actors": 4,
                                   "score.actors": 2, "score.num_cpus": 0.5, "ray.full_pools": True,
                                   "write.dataset_name": "other"}).model_dump(mode="json")
    changed = load_config(None, **{"segment.min_clip_s": 3.0}).model_dump(mode="json")
    assert config_fingerprint(base) == config_fingerprint(resized)
    assert config_fingerprint(base) != config_fingerprint(changed)
    assert resized["write"]["dataset_name"] == "other"  # the fingerprint does not mutate the config


def test_resume_across_an_upgrade_that_only_added_fields(tmp_path):
    """An output written before a config field existed resumes while the field holds its default;
    a changed value is refused, and the error names the field."""
    import json

    from pipeline.config import CurateConfig, load_config
    from pipeline.journal import ConfigMismatch

    defaults = CurateConfig().model_dump(mode="json")
    now = load_config(None).model_dump(mode="json")
    older = json.loads(json.dumps(now))
    del older["probe"]["max_frame_pixels"]  # written by a version without the bomb caps
    journal = Journal(tmp_path / "out")
    journal.check_config(config_fingerprint(older), older)
    journal.check_config(config_fingerprint(now), now, defaults=defaults)  # resumes

    journal.check_config(config_fingerprint(older), older, force=True)
    capped = load_config(None, **{"probe.max_frame_pixels": 10_000_000}).model_dump(mode="json")
    with pytest.raises(ConfigMismatch, match=r"differs in: probe\.max_frame_pixels"):
        journal.check_config(config_fingerprint(capped), capped, defaults=defaults)
    stricter = load_config(None, **{"segment.min_clip_s": 3.0}).model_dump(mode="json")
    with pytest.raises(ConfigMismatch, match=r"segment\.min_clip_s"):
        journal.check_config(config_fingerprint(stricter), stricter, defaults=defaults)


def test_a_resume_removes_every_temp_file_a_killed_run_left(tmp_path):
    """Killed while writing a shard, a table, run.json or a journal entry: the temp files go, the
    published files stay (tests/test_faults.py kills a job in its final tables)."""
    from pipeline.shards import remove_stale_temp_files

    out = tmp_path / "out"
    Journal(out)
    (out / "shards").mkdir()
    stale = [out / ".scores.parquet.tmp14224", out / ".run.json.tmp7", out / "shards" / ".shard-000003.tar.tmp",
             out / "_journal" / "videos" / ".part-1-ab.json.tmp99", out / "_journal" / "shards" / ".shard-000001.json.tmp5"]
    kept = [out / "scores.parquet", out / "shards" / "shard-000000.tar", out / "_journal" / "config.json",
            out / ".hidden-notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(out)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


# -- the journal over an output store: a local directory and an S3 API on loopback (moto)

def _video(uri: str, reason: str, retryable: bool = False) -> dict:
    return {"video": {"uri": uri, "status": "rejected", "reason": reason}, "rejects": [], "scores": [],
            "retryable": retryable}


def _shard(name: str, keys: list[str]) -> ShardInfo:
    return ShardInfo(url=f"shards/{name}", nsamples=len(keys), filesize=100 * len(keys), sha256="0" * 64, keys=keys)


def test_entries_are_ordered_by_their_sequence_numbers(store, monkeypatch):
    """Order comes from the numbers in the entries' names: shards in the order journaled (not by
    url), the latest outcome of an input wins, and compaction keeps both."""
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 3)
    journal = Journal(store)
    for writer, n in ((1, 0), (0, 0), (1, 1), (0, 1), (2, 0)):  # two writers' shards, interleaved
        name = f"shard-r0001-w{writer:03d}-{n:06d}.tar"
        journal.record_shard(_shard(name, [f"vid-{writer}{n}_0000"]), [{"key": f"vid-{writer}{n}_0000"}], [])
    journal.record_videos([_video("/in/a.mp4", "worker failed", retryable=True), _video("/in/b.mp4", "no face found")])
    for i in range(4):
        journal.record_videos([_video(f"/in/c{i}.mp4", "no speech")])
    journal.record_videos([_video("/in/a.mp4", "second try")])  # a retried input's newer outcome

    names = store.list("_journal")
    assert "_journal/shards/segment-000000000003.parquet" in names  # after the 3 entries it covers
    assert "_journal/shards/shard-000000000004.json" in names  # written after that merge: still loose
    assert [n for n in names if n.startswith("_journal/videos/")] == [
        "_journal/videos/segment-000000000003.parquet", "_journal/videos/segment-000000000007.parquet"]
    order = ["shard-r0001-w001-000000.tar", "shard-r0001-w000-000000.tar", "shard-r0001-w001-000001.tar",
             "shard-r0001-w000-000001.tar", "shard-r0001-w002-000000.tar"]
    for reader in (journal, Journal(store)):
        assert [e["shard"]["url"] for e in reader.iter_shards()] == [f"shards/{n}" for n in order]
        assert [e["url"] for e in reader.shard_entries()] == sorted(f"shards/{n}" for n in order)
        assert reader.finished() == {"/in/a.mp4": False, "/in/b.mp4": False, **{f"/in/c{i}.mp4": False for i in range(4)}}
        videos = reader.videos()
        assert [v["video"]["uri"] for v in videos] == ["/in/b.mp4"] + [f"/in/c{i}.mp4" for i in range(4)] + ["/in/a.mp4"]
        assert videos[-1]["video"]["reason"] == "second try"

    before = {"shards": journal.shards(), "videos": journal.videos(), "entries": journal.shard_entries()}
    covered = {n: store.read_bytes(n) for n in store.list("_journal") if n.endswith(".json") and "/runs/" not in n
               and not n.endswith("config.json")}
    merged = Journal(store)
    with merged.lock(lease_s=30):
        assert merged.shard_entries() == before["entries"] and len(merged.finished()) == 6
    assert not [n for n in store.list("_journal") if n.rsplit("/", 1)[-1].startswith(("part-", "shard-"))]
    assert Journal(store).shards() == before["shards"] and Journal(store).videos() == before["videos"]
    # killed after a compaction wrote its segments, before deleting what they cover: ignored, then deleted
    for name, data in covered.items():
        store.put_bytes(name, data)
    assert Journal(store).videos() == before["videos"] and Journal(store).shards() == before["shards"]
    again = Journal(store)
    with again.lock(lease_s=30):
        again.finished(), again.shard_entries()
        again.record_videos([_video("/in/b.mp4", "third try")])  # numbered after every segment
    assert not [n for n in store.list("_journal") if n in covered]
    assert Journal(store).videos()[-1]["video"]["reason"] == "third try"


def test_runs_are_numbered_once(store):
    first, second = Journal(store), Journal(store)
    assert [first.begin_run(), second.begin_run(), first.begin_run()] == [1, 2, 3]
    assert store.list("_journal/runs") == [f"_journal/runs/{n:06d}.json" for n in (1, 2, 3)]
    assert json.loads(store.read_bytes("_journal/runs/000002.json"))["run"] == 2


def test_orphan_shards_and_incomplete_uploads_are_removed(store, request):
    journal = Journal(store)
    kept, orphan = "shard-r0001-w000-000000.tar", "shard-r0001-w001-000000.tar"
    for name in (kept, orphan):
        store.put_bytes(f"shards/{name}", b"tar")
    store.put_bytes("shards/notes.txt", b"not a shard")
    journal.record_shard(_shard(kept, ["vid-a_0000"]), [{"key": "vid-a_0000"}], [])
    expected = [f"shards/{orphan}"]
    if not store.is_local:  # a writer killed mid-shard left a multipart upload: invisible, but stored
        from moto_s3 import s3_client

        client = s3_client(request.getfixturevalue("s3_endpoint"))
        prefix = store.url[len("s3://out/"):]
        for key in (f"{prefix}/shards/shard-r0002-w000-000000.tar", f"{prefix}-other/shards/x.tar"):
            client.create_multipart_upload(Bucket="out", Key=key)
        expected.append(f"{prefix}/shards/shard-r0002-w000-000000.tar")
    assert journal.remove_orphan_shards() == expected
    assert store.list("shards") == ["shards/notes.txt", f"shards/{kept}"]
    if not store.is_local:
        left = client.list_multipart_uploads(Bucket="out").get("Uploads", [])
        assert [u["Key"] for u in left] == [f"{prefix}-other/shards/x.tar"]  # another output's: left alone


def test_an_output_of_the_previous_version_resumes_and_is_adopted_once(tmp_path):
    """The previous layout: loose shard-NNNNNN.json named after the shard, part-PID-UUID.json whose
    order is their mtimes, segments numbered from 0 listing the files they cover."""
    out = tmp_path / "out"
    jdir = out / "_journal"
    (jdir / "shards").mkdir(parents=True)
    (jdir / "videos").mkdir()
    store = open_store(out)
    schema = journal_mod._SEGMENT_SCHEMA["videos"].with_metadata({"covers": json.dumps(["part-1-aaaaaaaaaaaa.json"])})
    with journal_mod.TableWriter(store, "_journal/videos/segment-000000.parquet", schema) as seg:
        seg.add([journal_mod._segment_row("videos", _video("/in/a.mp4", "first"))])
    (jdir / "videos" / "part-1-aaaaaaaaaaaa.json").write_text(json.dumps({"videos": [_video("/in/a.mp4", "first")]}))
    (jdir / "videos" / "part-9-zzzzzzzzzzzz.json").write_text(json.dumps({"videos": [_video("/in/b.mp4", "older")]}))
    (jdir / "videos" / "part-2-bbbbbbbbbbbb.json").write_text(json.dumps({"videos": [_video("/in/b.mp4", "newer")]}))
    os.utime(jdir / "videos" / "part-9-zzzzzzzzzzzz.json", ns=(1_000_000_000, 1_000_000_000))  # name order != mtime order
    for n in (1, 0):
        info = _shard(f"shard-{n:06d}.tar", [f"vid-{n}_0000"])
        (jdir / "shards" / f"shard-{n:06d}.json").write_text(
            json.dumps({"shard": info.as_index_entry(), "manifest": [{"key": f"vid-{n}_0000"}], "scores": []}))

    old = Journal(out)
    assert [(v["video"]["uri"], v["video"]["reason"]) for v in old.videos()] == [("/in/a.mp4", "first"), ("/in/b.mp4", "newer")]
    assert [e["shard"]["url"] for e in old.shards()] == ["shards/shard-000000.tar", "shards/shard-000001.tar"]
    assert old.next_shard_index() == 2
    old.record_videos([_video("/in/a.mp4", "retried by the new version")])  # numbered after the old files
    assert (jdir / "videos" / "part-000000000001.json").exists()
    expected = {"videos": old.videos(), "shards": old.shards(), "finished": old.finished()}
    assert expected["videos"][-1]["video"]["reason"] == "retried by the new version"

    adopting = Journal(out)
    with adopting.lock():
        assert adopting.finished() == expected["finished"] and len(adopting.shard_entries()) == 2
    # the old segment stays; the loose files went into numbered segments (the covered leftover deleted)
    assert sorted(p.name for p in (jdir / "videos").iterdir()) == ["segment-000000.parquet", "segment-000000000002.parquet"]
    assert sorted(p.name for p in (jdir / "shards").iterdir()) == ["segment-000000000000.parquet"]
    assert Journal(out).videos() == expected["videos"] and Journal(out).shards() == expected["shards"]
