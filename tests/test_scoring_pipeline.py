"""Issue 3 through the pipeline: clips derived from a real clip by one known change are caught
by exactly the matching rule, every score is kept, and refilter moves exactly the clips whose
stored score crosses a changed threshold."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import real_path
from derived_clips import MeshTurner, load_real, paste_second_face, rotate, write
from pipeline.config import load_config
from pipeline.inputs import expand_inputs
from pipeline.runner import run_curation

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 3.3
pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def derived_run(tmp_path_factory, ray_local):
    from skimage import data

    frames, audio = load_real(real_path("wda_aoc_000.mp4"), SECONDS)
    d = tmp_path_factory.mktemp("derived")
    write(d / "control.mp4", frames, audio)
    write(d / "roll60.mp4", [rotate(f, 60) for f in frames], audio)
    turner = MeshTurner()
    write(d / "mirrored_yaw65.mp4", [turner(np.ascontiguousarray(f[:, ::-1]), 65) for f in frames], audio)
    # Cut the frame just above the chin: the head no longer fits in the frame.
    write(d / "chin_cut.mp4", [f[:400] for f in frames], audio)
    write(d / "second_face.mp4", [paste_second_face(f, data.astronaut()) for f in frames], audio)
    out = tmp_path_factory.mktemp("derived_out")
    run_curation(expand_inputs([str(d)]), out, load_config(None, **{"features.enabled": False}), progress_every_s=60)
    return out


def _by_name(rows):
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(Path(r["uri"]).stem, []).append(r)
    return out


def test_each_change_is_caught_by_its_rule(derived_run):
    scores = _by_name(pq.read_table(derived_run / "scores.parquet").to_pylist())
    rejects = _by_name(r for r in pq.read_table(derived_run / "rejects.parquet").to_pylist() if r["clip_index"] >= 0)
    assert [r["status"] for r in scores["control"]] == ["kept"]
    roll = [r for r in rejects["roll60"] if r["stage"] == "score"][0]
    assert roll["rule"] == "filters.roll_abs_max" and 50 <= roll["value"] <= 70, roll
    yaw = [r for r in rejects["mirrored_yaw65"] if r["stage"] == "score"]
    assert len(yaw) == 1 and "filters.yaw_abs_max" in yaw[0]["detail"], yaw  # every failed rule is named
    assert [s["yaw_abs_max"] > 40 for s in scores["mirrored_yaw65"]] == [True]
    chin = [r for r in rejects["chin_cut"] if r["stage"] == "score"][0]
    assert chin["rule"] == "filters.complete_frac_min" and chin["value"] < 0.95, chin
    # the control clip of the same person passes all of these
    c = scores["control"][0]
    assert c["roll_abs_max"] < 30 and c["yaw_abs_max"] < 40 and c["complete_frac"] >= 0.95


def test_second_face_is_flagged_and_the_speaker_kept(derived_run):
    scores = _by_name(pq.read_table(derived_run / "scores.parquet").to_pylist())["second_face"]
    kept = [s for s in scores if s["status"] == "kept"]
    assert len(kept) == 1, scores
    assert kept[0]["other_faces"] is True and kept[0]["n_faces_max"] >= 2
    manifest = pq.read_table(derived_run / "manifest.parquet").to_pylist()
    crop = [m for m in manifest if m["key"] == kept[0]["key"]][0]
    assert crop["crop_x0"] + crop["crop_size"] / 2 < 512, "the speaker (left half) was kept, not the still face"
    others = [s for s in scores if s["status"] == "rejected"]
    assert others and all(s["reject_reason"] == "not the speaking face" for s in others)


def _refilter(out: Path, tmp_path: Path, yaml_text: str) -> str:
    cfg = tmp_path / "filters.yaml"
    cfg.write_text(yaml_text)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "refilter.py"), str(out), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_refilter_moves_exactly_the_clips_crossing_a_threshold(derived_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(derived_run, out)
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    kept = sorted((s for s in scores if s["status"] == "kept"), key=lambda s: s["head_translation"])
    assert len(kept) >= 2
    # a threshold between the two kept clips' stored head movement: exactly the larger leaves
    threshold = (kept[0]["head_translation"] + kept[1]["head_translation"]) / 2
    expected_left = {s["key"] for s in kept if s["head_translation"] > threshold}
    stdout = _refilter(out, tmp_path, f"filters:\n  head_translation_max: {threshold}\n")
    manifest = set(pq.read_table(out / "manifest.parquet").column("key").to_pylist())
    assert manifest == {s["key"] for s in kept} - expected_left
    assert {line[4:] for line in stdout.splitlines() if line.startswith("  - ")} == expected_left
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {r["key"] for r in rejects if r["stage"] == "refilter"} == expected_left
    index = json.loads((out / "index.json").read_text())
    assert index["selection"]["nsamples"] == len(manifest)
    # Loosening the roll rule admits the rotated clip, which was rejected before its features:
    # it is listed as needing a rerun, not silently missing, and not put into the manifest.
    stdout = _refilter(out, tmp_path, "filters:\n  roll_abs_max: 90\n")
    rerun = pq.read_table(out / "needs_rerun.parquet").to_pylist()
    assert [Path(r["uri"]).stem for r in rerun] == ["roll60"]
    assert "need a rerun" in stdout
    manifest = set(pq.read_table(out / "manifest.parquet").column("key").to_pylist())
    assert manifest == {s["key"] for s in kept}  # defaults again for head movement: the clip re-entered
    run = json.loads((out / "run.json").read_text())
    assert len(run["refilters"]) == 2
    assert [r["value"] for r in run["filter_rules"] if r["rule"] == "filters.roll_abs_max"] == [90]
    # A later curation run into the same output (here: nothing new to do) keeps the refiltered
    # thresholds instead of silently rebuilding the tables with the original ones.
    _refilter(out, tmp_path, f"filters:\n  head_translation_max: {threshold}\n")
    src = Path(scores[0]["uri"]).parent
    run_curation(expand_inputs([str(src)]), out, load_config(None, **{"features.enabled": False}),
                 progress_every_s=60)
    manifest = set(pq.read_table(out / "manifest.parquet").column("key").to_pylist())
    assert manifest == {s["key"] for s in kept} - expected_left
