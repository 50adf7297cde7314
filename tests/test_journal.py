"""The progress journal's crash windows, without Ray: what a restart keeps and what it drops."""
from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.journal import Journal, config_fingerprint
from pipeline.runner import run_curation
from pipeline.shards import ShardWriter, verify_index


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
                                   "write.dataset_name": "other"}).model_dump(mode="json")
    changed = load_config(None, **{"segment.min_clip_s": 3.0}).model_dump(mode="json")
    assert config_fingerprint(base) == config_fingerprint(resized)
    assert config_fingerprint(base) != config_fingerprint(changed)
    assert resized["write"]["dataset_name"] == "other"  # the fingerprint does not mutate the config


def test_resume_across_an_upgrade_that_only_added_fields(tmp_path):
    """An output written before a config field existed resumes while the field holds its default;
    a changed value is refused, and the error names the field."""
    import json

    import pytest

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
