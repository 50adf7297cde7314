"""The inputs go to Ray in consecutive datasets of ``ray.inputs_per_dataset`` (runner.ray_rows).

The driver's memory then holds Ray Data's state of one dataset at a time (figures:
benchmarks/bookkeeping.py --part ray, docs/benchmarks.md); here: a real embedded-Ray run over more
inputs than one dataset takes, each input still in a block of its own, comes back exactly once.
"""
from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq

import pipeline.runner as runner_mod
from pipeline.config import load_config
from pipeline.inputs import expand_inputs
from pipeline.runner import run_curation


def test_inputs_split_into_datasets_each_come_back_once(tmp_path, monkeypatch, ray_local):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"empty_{i}.mp4").touch()  # zero bytes: each input becomes one "unreadable" reject
    items = expand_inputs([str(src)])
    built = []
    real_build = runner_mod.build_dataset

    def recording_build(part, config):
        built.append([it.uri for it in part])
        return real_build(part, config)

    monkeypatch.setattr(runner_mod, "build_dataset", recording_build)
    config = load_config(None, **{"features.enabled": False, "ray.inputs_per_dataset": 2})
    out = tmp_path / "out"
    summary = run_curation(items, out, config, progress_every_s=3600)

    uris = sorted(it.uri for it in items)
    # Two datasets, of 2 and 1 inputs, together every input once.
    assert [len(part) for part in built] == [2, 1]
    assert sorted(u for part in built for u in part) == uris
    videos = pq.read_table(out / "videos.parquet").to_pylist()
    assert Counter(v["uri"] for v in videos) == Counter(uris)
    assert all(v["status"] == "rejected" for v in videos)
    rejects = [r for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["clip_index"] < 0]
    assert Counter(r["uri"] for r in rejects) == Counter(uris)
    assert summary["inputs"] == 3 and summary["inputs_rejected"] == 3


def test_inputs_per_dataset_is_a_resource_field():
    """A run may resume with another dataset size: what is computed does not depend on it."""
    from pipeline.journal import config_fingerprint

    a = load_config(None).model_dump(mode="json")
    b = load_config(None, **{"ray.inputs_per_dataset": 7}).model_dump(mode="json")
    assert a["ray"]["inputs_per_dataset"] != b["ray"]["inputs_per_dataset"]
    assert config_fingerprint(a) == config_fingerprint(b)
