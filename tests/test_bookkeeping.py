"""The driver's bookkeeping at scale, without Ray or video (timings: benchmarks/bookkeeping.py).

The driver is fed the rows its stages would emit (run_curation's row_source; tests/journal_rows.py),
so shards, journal and tables are the real ones.
"""
from __future__ import annotations

import gc
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline.finalize as finalize_mod
import pipeline.journal as journal_mod
import schemas
from journal_rows import build_journal, outcome_rows, plan, synthetic_items
from pipeline.config import load_config
from pipeline.journal import Journal, config_fingerprint
from pipeline.bookkeeper import _InFlight
from pipeline.runner import run_curation
from pipeline.shards import verify_index


def _config(**kw):
    return load_config(None, **{"features.enabled": False, "write.shard_max_bytes": 64 * 1024, **kw})


def _journal(out: Path, n: int, **kw) -> Journal:
    journal = Journal(out)
    cfg = _config().model_dump(mode="json")
    journal.check_config(config_fingerprint(cfg), cfg)
    build_journal(journal, synthetic_items(n), **kw)
    return journal


def _rows_of(todo, first=0, seen=None):
    for i, item in enumerate(todo):
        if seen is not None:
            seen(i)
        yield from outcome_rows(first + i, item)


class _FirstRow(Exception):
    pass


def _stop_at_first_row(todo):
    raise _FirstRow(len(todo))
    yield


def _old_tables(journal_dir: Path) -> dict[str, list[dict]]:
    """The tables as the driver computed them before compaction: every loose file read in full."""
    shards = sorted((json.loads(p.read_text()) for p in (journal_dir / "shards").glob("shard-*.json")),
                    key=lambda e: e["shard"]["url"])
    parts = sorted((journal_dir / "videos").glob("part-*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    latest: dict[str, dict] = {}
    for p in parts:
        for v in json.loads(p.read_text())["videos"]:
            latest[v["video"]["uri"]] = v
    videos = list(latest.values())
    return {"manifest": [r for e in shards for r in e["manifest"]],
            "rejects": [r for v in videos for r in v["rejects"]],
            "videos": [v["video"] for v in videos],
            "scores": [r for e in shards for r in e["scores"]] + [r for v in videos for r in v["scores"]]}


def test_final_tables_equal_the_full_read_of_an_uncompacted_journal(tmp_path, monkeypatch):
    """An output journaled before compaction existed (every file loose) resumes into the same tables
    the old all-in-memory code wrote, through compaction and the streamed writers."""
    out = tmp_path / "out"
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 10**9)  # the old layout: nothing merged
    journal = _journal(out, 120, clips_per_shard=7, inputs_per_part=5)
    assert not list(journal.dir.rglob("segment-*"))
    expected = _old_tables(journal.dir)
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 4)
    real_writer = finalize_mod.TableWriter  # row groups of 16 rows: the streamed writes, many times over
    monkeypatch.setattr(finalize_mod, "TableWriter", lambda store, name, schema: real_writer(store, name, schema, 16))
    summary = run_curation(synthetic_items(120), out, _config(), progress_every_s=3600)
    for name, rows in expected.items():
        table = pq.read_table(out / f"{name}.parquet")
        assert table.schema == schemas.TABLE_SCHEMAS[f"{name}.parquet"]
        assert table.to_pylist() == schemas.conform_table(rows, table.schema).to_pylist(), name
    assert summary["inputs_this_run"] == 0 and summary["inputs"] == 120
    assert summary["clips_kept"] == len(expected["manifest"]) == 120
    assert summary["inputs_kept"] == sum(v["status"] == "kept" for v in expected["videos"]) == 96
    assert summary["clips_rejected"] == sum(r["clip_index"] >= 0 for r in expected["rejects"]) == 24
    assert summary["kept_hours"] == sum(r["duration_s"] for r in expected["manifest"]) / 3600
    # every loose file is now in a segment of at most 4 files, and none is left behind
    assert not list(journal.dir.glob("*/part-*.json")) and not list(journal.dir.glob("shards/shard-*.json"))
    assert len(list(journal.dir.glob("videos/segment-*.parquet"))) == -(-24 // 4)
    assert [e["url"] for e in json.loads((out / "index.json").read_text())["shardlist"]] == \
        [r["url"] for r in sorted((e["shard"] for e in Journal(out).shards()), key=lambda e: e["url"])]


def test_compaction_keeps_the_latest_outcome_and_survives_a_kill_before_its_deletes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 10**9)
    journal = _journal(out, 40, clips_per_shard=5, inputs_per_part=3)
    retried = journal.videos()[3]
    assert not retried["retryable"]
    # a later run retried input 3 after a worker failure and journaled a new outcome
    journal.record_videos([dict(retried, retryable=True, video=dict(retried["video"], reason="worker failed"))])
    journal.record_videos([dict(retried, video=dict(retried["video"], reason="second try"))])
    before = {"finished": journal.finished(), "videos": journal.videos(), "shards": journal.shards(),
              "entries": journal.shard_entries()}
    assert before["finished"][retried["video"]["uri"]] is False
    assert [v["video"]["reason"] for v in before["videos"]].count("second try") == 1
    loose = {p.name: p.read_bytes() for p in journal.dir.rglob("*.json") if p.parent.name in ("videos", "shards")}

    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 3)
    compacted = Journal(out)
    with compacted.lock():  # the run holding the output merges the loose files as it reads them
        assert compacted.finished() == before["finished"]
        assert compacted.shard_entries() == before["entries"]
    assert not [p for p in journal.dir.rglob("*.json") if p.parent.name in ("videos", "shards")]
    after = Journal(out)
    assert after.videos() == before["videos"] and after.shards() == before["shards"]
    assert after.finished() == before["finished"]

    # killed after writing the segments, before deleting what they cover: the covered files are ignored
    for name, data in loose.items():
        (journal.dir / ("videos" if name.startswith("part-") else "shards") / name).write_bytes(data)
    again = Journal(out)
    assert again.videos() == before["videos"] and again.finished() == before["finished"]
    assert again.shards() == before["shards"]
    with again.lock():
        again.finished(), again.shard_entries()  # the locked run deletes them
    assert not [p for p in journal.dir.rglob("*.json") if p.parent.name in ("videos", "shards")]


def test_resume_setup_reads_each_journal_file_at_most_once(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 6)
    journal = _journal(out, 150, clips_per_shard=6, inputs_per_part=4)
    loose = [p for p in journal.dir.rglob("*.json") if p.parent.name in ("videos", "shards")]
    segments = list(journal.dir.rglob("segment-*.parquet"))
    assert loose and len(segments) >= 4  # both: merged segments and files written since

    opened: Counter = Counter()
    counting = [True]

    def audit(event, args):
        if counting[0] and event == "open" and isinstance(args[0], (str, Path)) and "_journal" in str(args[0]):
            mode = args[1] or "r"
            if "r" in mode and "+" not in mode:
                opened[str(args[0])] += 1

    sys.addaudithook(audit)
    items = synthetic_items(150) + synthetic_items(2, root="/data/new")
    try:
        with pytest.raises(_FirstRow) as stop:
            run_curation(items, out, _config(), progress_every_s=3600, row_source=_stop_at_first_row)
    finally:
        counting[0] = False
    assert stop.value.args == (2,)  # the two new inputs are all there is to do
    assert opened, "the audit hook saw no journal read"
    assert max(opened.values()) == 1, [p for p, n in opened.items() if n > 1]
    assert {str(p) for p in loose + segments} <= set(opened)  # what it read: each once


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """A run that dies inside an input whose first clip is already in a published shard resumes,
    over compacted segments, to the tables of an uninterrupted run (that clip is not written again)."""
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 3)
    items = synthetic_items(80)
    whole = tmp_path / "whole"
    run_curation(items, whole, _config(), progress_every_s=3600, row_source=_rows_of)

    out = tmp_path / "out"
    victim = []

    def dies_inside_an_input(todo):
        for i, item in enumerate(todo):
            for row in outcome_rows(i, item):
                yield row
                first_clip = f"{item.video_id}_0000"
                if row["clip_index"] == 1 and row["kind"] == "clip" and \
                        first_clip in {k for e in Journal(out).shard_entries() for k in e["keys"]}:
                    victim.append(item)  # clip 1 closed the shard holding clip 0; the rest never comes
                    raise RuntimeError("killed")

    # 11 samples of 6 KiB per 70,000-byte shard: the shard of input 78's first clip closes on its second
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(items, out, _config(**{"write.shard_max_bytes": 70_000}), progress_every_s=3600,
                     row_source=dies_inside_an_input)
    assert victim and victim[0].uri not in Journal(out).finished()
    number = {it.uri: i for i, it in enumerate(items)}
    summary = run_curation(items, out, _config(**{"write.shard_max_bytes": 70_000}), progress_every_s=3600,
                           row_source=lambda todo: (r for it in todo for r in outcome_rows(number[it.uri], it)))
    assert 0 < summary["inputs_this_run"] < 80
    for name, key in (("manifest", "key"), ("scores", "key"), ("videos", "uri"), ("rejects", "uri")):
        a, b = (sorted(pq.read_table(o / f"{name}.parquet").drop_columns(["shard"] if name == "manifest" else [])
                       .to_pylist(), key=lambda r: (r[key] or "", r.get("clip_index", 0))) for o in (whole, out))
        assert a == b, name
    assert verify_index(out) == []


def test_driver_holds_only_inputs_in_flight_and_resumes_exactly_once(tmp_path, monkeypatch):
    """300 inputs through the real driver with shards of ~7 samples and compaction every 4 files:
    the per-input states live from an input's first row until its clips are in a closed shard."""
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 4)
    out = tmp_path / "out"
    items = synthetic_items(300)
    live = []

    def seen(i):
        if i % 20 == 0:
            gc.collect()
            live.append(sum(isinstance(o, _InFlight) for o in gc.get_objects()))

    summary = run_curation(items[:250], out, _config(), progress_every_s=3600,
                           row_source=lambda todo: _rows_of(todo, 0, seen))
    assert summary["inputs_this_run"] == 250
    # at most the inputs whose clips wait in the open shard (~7 samples), not the 250 to do
    assert max(live) <= 12 and len(live) == 13, live
    gc.collect()
    assert sum(isinstance(o, _InFlight) for o in gc.get_objects()) == 0

    summary = run_curation(items, out, _config(), progress_every_s=3600,
                           row_source=lambda todo: _rows_of(todo, 250))
    assert summary["inputs_this_run"] == 50 and summary["inputs"] == 300
    videos = pq.read_table(out / "videos.parquet").to_pylist()
    assert Counter(v["uri"] for v in videos) == Counter(it.uri for it in items)
    kept = [plan(i)[0] for i in range(300)]
    assert summary["clips_kept"] == sum(kept) and summary["inputs_kept"] == sum(k > 0 for k in kept)
    manifest = pq.read_table(out / "manifest.parquet", columns=["key"]).column("key").to_pylist()
    index = json.loads((out / "index.json").read_text())
    assert sorted(manifest) == sorted(k for e in index["shardlist"] for k in e["keys"])
    assert len(set(manifest)) == len(manifest) == sum(kept)
    assert verify_index(out) == []
    journal = Journal(out)
    assert list(journal.dir.glob("videos/segment-*.parquet")) and list(journal.dir.glob("shards/segment-*.parquet"))
    assert len(journal.finished()) == 300

    # a copy resumed with nothing to do writes the same tables
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run_curation(items, copy, _config(), progress_every_s=3600)
    for name in ("manifest", "rejects", "videos", "scores"):
        assert pq.read_table(copy / f"{name}.parquet").equals(pq.read_table(out / f"{name}.parquet")), name


def test_a_merge_that_finds_no_space_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    """Compaction during a run is an optimisation: a segment that cannot be written (ENOSPC) is
    dropped, its files stay loose, and the record that triggered it still counts."""
    import errno

    class FullDisk(journal_mod.TableWriter):
        def add(self, rows):
            raise OSError(errno.ENOSPC, "No space left on device", self.name)

    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 3)
    monkeypatch.setattr(journal_mod, "TableWriter", FullDisk)
    out = tmp_path / "out"
    journal = _journal(out, 40, clips_per_shard=4, inputs_per_part=2)  # 10 shard files, 20 parts: merges tried
    assert not list(journal.dir.rglob("segment-*")) and not list(journal.dir.rglob(".*tmp*"))
    assert len(list(journal.dir.glob("shards/shard-*.json"))) == 10
    expected = {"finished": journal.finished(), "shards": journal.shards(), "videos": journal.videos()}
    assert len(expected["finished"]) == 40
    monkeypatch.setattr(journal_mod, "TableWriter", FullDisk.__mro__[1])  # space again
    with journal.lock():
        assert journal.finished() == expected["finished"]
    assert Journal(out).shards() == expected["shards"] and Journal(out).videos() == expected["videos"]
    assert list(journal.dir.glob("videos/segment-*.parquet")) and not list(journal.dir.glob("videos/part-*"))
