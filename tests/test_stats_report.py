"""jobs/stats.py: the numbers equal the tables, the page renders in Chromium, --compare works.

One real curation output is built per module, in a subprocess (so its Ray never meets the
session's): the first 3.5 s of three real clips from one source directory, and from a second
source a real clip without audio, a text file, a truncated MP4 and a clip with no face. Score distributions and thresholds are
also tested on a synthetic output (SCORES_SCHEMA, filter_rules), where kept and rejected clips
are many and the expected numbers are known.
"""
from __future__ import annotations

import collections
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REAL_DIR, ROOT, make_truncated_faststart

KEEP = ["retalking_face2.mp4", "liveportrait_d18_silent.mp4", "wda_aoc_000.mp4"]

CURATE = """
import sys
from pipeline.config import load_config
from pipeline.inputs import expand_inputs
from jobs._ray import start_ray
from pipeline.runner import run_curation
config = load_config(None, **{"write.shard_max_bytes": 1_500_000, "ray.num_cpus": 2, "output.preset": "ultrafast"})
start_ray(config)
run_curation(expand_inputs(sys.argv[2:]), sys.argv[1], config, progress_every_s=60)
"""


def _no_face_clip(path: Path) -> None:
    """3 s of drifting colour gradients with a tone: decodes fine, has no face."""
    from pipeline.media import encode_clip

    yy, xx = np.mgrid[0:96, 0:96]
    frames = [np.stack([(xx * 2 + t * 3) % 256, (yy * 2) % 256, np.full_like(xx, 90)], -1).astype(np.uint8)
              for t in range(75)]
    audio = (0.1 * np.sin(2 * np.pi * 200 * np.arange(48000) / 16000)).astype(np.float32)
    path.write_bytes(encode_clip(frames, audio))


def _head(src: Path, dst: Path, seconds: float = 3.5) -> None:
    """The first seconds of a real clip, packets copied (the same frames; the curation that
    builds the fixture then has less than half the video to decode and encode)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        streams = [st for st in inp.streams if st.type in ("video", "audio")]
        mapping = {st.index: out.add_stream_from_template(st) for st in streams}
        for packet in inp.demux(streams):
            if packet.dts is None or (packet.pts is not None and packet.pts * packet.time_base > seconds):
                continue
            packet.stream = mapping[packet.stream.index]
            out.mux(packet)


@pytest.fixture(scope="module")
def real_out(tmp_path_factory) -> Path:
    if not REAL_DIR.exists():
        pytest.skip(f"{REAL_DIR} is absent")
    d = tmp_path_factory.mktemp("stats_inputs")
    good, bad = d / "studio", d / "crawl"
    good.mkdir()
    bad.mkdir()
    for name in KEEP:
        _head(REAL_DIR / name, good / name)
    (bad / "edtalk_mouth_source_noaudio.mp4").symlink_to(REAL_DIR / "edtalk_mouth_source_noaudio.mp4")
    (bad / "notes.txt").write_text("this is not a video\n")
    make_truncated_faststart(bad / "truncated_faststart.mp4")
    _no_face_clip(bad / "no_face.mp4")
    out = tmp_path_factory.mktemp("stats_out") / "run"
    res = subprocess.run([sys.executable, "-c", CURATE, str(out), str(good), str(bad)], cwd=ROOT, timeout=300,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert res.returncode == 0, res.stdout.decode(errors="replace")[-3000:]
    return out


@pytest.fixture(scope="module")
def real_report(real_out) -> dict:
    from pipeline.report import build_report

    return build_report(real_out)


@pytest.fixture(scope="module")
def syn_out(tmp_path_factory) -> tuple[Path, dict]:
    """A synthetic output with scores.parquet and filter_rules (12 sources, all reject kinds)."""
    from pipeline.report import build_report
    from pipeline.report.synthetic import make_output

    out = tmp_path_factory.mktemp("stats_syn") / "syn"
    make_output(out, n_clips=3000, real_samples=3)
    return out, build_report(out)


def _stats(out_dir: Path) -> dict:
    return json.loads((out_dir / "stats.json").read_text())


def test_score_distributions_and_thresholds(syn_out):
    """Synthetic output: kept and rejected clips, nulls, thresholds from run.json."""
    from pipeline.report import validate_stats
    from pipeline.report.synthetic import FILTER_RULES
    from schemas import SCORES_SCHEMA

    out, s = syn_out
    validate_stats(_stats(out / "report"))
    scores = pq.read_table(out / "scores.parquet")
    assert scores.schema.equals(SCORES_SCHEMA)
    kept = np.asarray(pc.equal(scores["status"], "kept"))
    numeric = [f.name for f in SCORES_SCHEMA if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
               and f.name not in ("clip_index", "track_id", "start_s")]
    assert set(s["scores"]["columns"]) == set(numeric)
    for name, col in s["scores"]["columns"].items():
        x = scores[name].to_numpy(zero_copy_only=False).astype(float)
        for group, mask in (("kept", kept), ("rejected", ~kept)):
            g = col[group]
            assert g["n"] == int(np.isfinite(x[mask]).sum()) and g["null"] == int(np.isnan(x[mask]).sum())
            assert sum(g["hist"]["counts"]) == g["n"], name
    # thresholds go to their columns; abs<= and not-applied rules included
    assert {r["column"] for r in FILTER_RULES} == {c for c, v in s["scores"]["columns"].items() if v["thresholds"]}
    sc = s["scores"]["columns"]["sync_conf"]
    assert sc["kept"]["min"] >= 3.0 and sc["rejected"]["min"] < 3.0  # the applied rule separates them
    edges = s["scores"]["columns"]["sync_offset"]["edges"]
    assert edges[0] <= -6 and edges[-1] >= 6
    effects = {r["column"]: r for r in s["thresholds"]}
    x = scores["yaw_abs_p95"].to_numpy(zero_copy_only=False).astype(float)
    assert effects["yaw_abs_p95"]["fail"] == int((x > 60).sum())
    assert not effects["face_size_px"]["applied"]
    # features exist for kept clips only; the table's nulls are reported, not plotted
    assert s["scores"]["columns"]["head_motion_var_mean"]["rejected"]["n"] == 0
    assert all(c["ok"] for c in s["checks"]), s["checks"]
    page = (out / "report" / "index.html").read_text()
    assert "|sync_offset| &lt;= 6" in page and "face_size_px &gt;= 128" in page
    # per source, against the tables
    videos, manifest = pq.read_table(out / "videos.parquet"), pq.read_table(out / "manifest.parquet")
    assert s["sources"]["n_sources"] == len(set(videos["source"].to_pylist())) == 12
    for row in s["sources"]["sources"]:
        assert row["inputs"] == videos["source"].to_pylist().count(row["source"])
        assert row["clips_kept"] == manifest["source"].to_pylist().count(row["source"])


def test_cli_errors(tmp_path):
    rc = subprocess.run([sys.executable, "jobs/stats.py", str(tmp_path / "missing")], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert rc.returncode == 2 and "not a directory" in rc.stderr
    rc = subprocess.run([sys.executable, "jobs/stats.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
    assert rc.returncode == 2 and "videos.parquet" in rc.stderr


def test_numbers_equal_the_tables(real_out, real_report):
    from pipeline.report import validate_stats

    s = _stats(real_out / "report")  # what was written, not only what was returned
    validate_stats(s)
    videos = pq.read_table(real_out / "videos.parquet").to_pylist()
    manifest = pq.read_table(real_out / "manifest.parquet").to_pylist()
    rejects = pq.read_table(real_out / "rejects.parquet").to_pylist()
    lv = {x["level"]: x for x in s["funnel"]["levels"]}

    assert lv["inputs"]["inputs"] == len(videos) == 7
    assert lv["inputs"]["input_hours"] == pytest.approx(sum(v["duration_s"] or 0 for v in videos) / 3600)
    assert s["kept"]["clips"] == lv["kept"]["clips"] == len(manifest) >= 2
    assert s["kept"]["hours"] == pytest.approx(sum(m["duration_s"] for m in manifest) / 3600)
    assert lv["kept"]["inputs"] == s["kept"]["inputs"] == sum(v["status"] == "kept" for v in videos)
    video_rej = [r for r in rejects if r["clip_index"] < 0]
    for level, stages in (("probed_ok", {"probe"}), ("face_tracks", {"probe", "detect"})):
        assert lv[level]["inputs"] == len(videos) - sum(r["stage"] in stages for r in video_rej)
    assert lv["candidate_clips"]["clips"] == len(manifest) + sum(r["clip_index"] >= 0 for r in rejects)

    # every (stage, reason) of rejects.parquet is in the funnel, with its count and hours
    want = collections.Counter((r["stage"], r["reason"]) for r in rejects)
    hours = collections.defaultdict(float)
    for r in rejects:
        hours[(r["stage"], r["reason"])] += (r["duration_s"] or 0) / 3600
    got = {(x["stage"], x["reason"]): x for x in s["funnel"]["rejections"]}
    assert set(got) == set(want)
    for k, n in want.items():
        assert got[k]["count"] == n and got[k]["hours"] == pytest.approx(hours[k])
    assert {("probe", "no audio stream"), ("detect", "no face detected"), ("detect", "truncated stream")} <= set(got)
    page = (real_out / "report" / "index.html").read_text()
    for stage, reason in want:
        assert f"<td>{stage}</td><td>{reason}</td>" in page
    assert all(c["ok"] for c in s["checks"]), s["checks"]

    # per source: the two input directories
    src = {x["source"].rstrip("/").rsplit("/", 1)[-1]: x for x in s["sources"]["sources"]}
    assert src["studio"]["inputs"] == 3 and src["studio"]["clips_kept"] == len(manifest)
    assert src["studio"]["kept_hours"] == pytest.approx(s["kept"]["hours"])
    assert src["crawl"]["inputs"] == 4 and src["crawl"]["clips_kept"] == 0
    assert src["crawl"]["rejects"] == 4 and len(src["crawl"]["top_reject_reasons"]) == 3

    # kept vs rejected distributions of every numeric score column that has values
    if s["dataset"]["scores_table"]:
        scores = pq.read_table(real_out / "scores.parquet")
        assert s["scores"]["table"] == "scores.parquet"
        assert s["scores"]["columns"]["duration_s"]["kept"]["n"] == len(manifest)
        assert s["scores"]["columns"]["duration_s"]["rejected"]["n"] == scores.num_rows - len(manifest)
    else:  # outputs from before the scoring stage: a note, and what the manifest allows
        assert any("scores.parquet is absent" in n for n in s["notes"])
        assert s["scores"]["table"] == "manifest.parquet + rejects.parquet"
        assert s["scores"]["columns"]["duration_s"]["kept"]["n"] == len(manifest)
    # thresholds: exactly run.json's filter_rules (those switched on), drawn on the columns they test
    rules = [r for r in json.loads((real_out / "run.json").read_text()).get("filter_rules") or []
             if r["value"] is not None]
    assert [(r["column"], r["op"], r["value"]) for r in s["thresholds"]] == [
        (r["column"], r["op"], r["value"]) for r in rules]
    for r in rules:
        if r["column"] in s["scores"]["columns"]:
            assert r["rule"] in {t["rule"] for t in s["scores"]["columns"][r["column"]]["thresholds"]}
    md = (real_out / "report" / "report.md").read_text()
    assert f"Kept {len(manifest)} clips" in md and "| probe | no audio stream |" in md


def test_contact_sheet_and_run_facts(real_out, real_report):
    cs = real_report["contact_sheet"]
    n_kept = real_report["kept"]["clips"]
    assert len(cs["kept"]) == n_kept and all(k["frames"] == 2 and k["note"] is None for k in cs["kept"])
    shards = {k["shard"] for k in cs["kept"]}
    assert len(shards) >= 2  # the 1.5 MB cap spread the clips over several shards
    page = (real_out / "report" / "index.html").read_text()
    n_frames = sum(e["frame"] for g in cs["rejected"] for e in g["examples"])
    assert page.count("data:image/jpeg;base64,") == n_kept * 2 + n_frames
    # every reason, not only the page's top 4: a frame where the source decodes, a note where not
    from pipeline.report import load_run
    from pipeline.report.samples import sample_rejected

    reasons = real_report["funnel"]["rejections"]
    by_reason = {(g["stage"], g["reason"]): g["examples"] for g in sample_rejected(load_run(real_out), reasons)}
    assert by_reason[("probe", "no audio stream")][0]["thumb"]  # a real video, just without audio
    assert by_reason[("detect", "no face detected")][0]["thumb"]
    unreadable = by_reason[("probe", "unreadable container")][0]
    assert unreadable["uri"].endswith("notes.txt") and unreadable["thumb"] is None and unreadable["note"]

    run = real_report["run"]
    assert run["wall_s"] > 0 and {"probe", "detect", "crop"} <= {x["stage"] for x in run["stages"]}
    assert run["config"]["profile"] == "smoke" and run["versions"]["pyarrow"]
    assert real_report["models"]["face_detector"]  # read from the sampled meta.json


def test_page_is_self_contained(real_out, real_report):
    page = (real_out / "report" / "index.html").read_text()
    assert "<script" not in page and "<link" not in page and "@import" not in page
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page) + re.findall(r"url\(([^)]+)\)", page)
    assert urls and all(u.startswith("data:image/") for u in urls)


@pytest.fixture
def scored_out(real_out, tmp_path) -> Path:
    """A copy of the real output, with synthetic scores if the job wrote none (older pipeline)."""
    from pipeline.report.synthetic import add_scores

    out = tmp_path / "scored"
    shutil.copytree(real_out, out, ignore=shutil.ignore_patterns("report", "_journal"))
    if not (out / "scores.parquet").exists():
        add_scores(out)
    return out


def test_real_output_with_scores_and_no_rules(scored_out):
    from pipeline.report import build_report, validate_stats

    run = json.loads((scored_out / "run.json").read_text())
    run.pop("filter_rules", None)
    (scored_out / "run.json").write_text(json.dumps(run))
    table = pq.read_table(scored_out / "scores.parquet")
    col = table.schema.get_field_index("loudness_dbfs")
    table = table.set_column(col, "loudness_dbfs", pa.nulls(table.num_rows, pa.float64()))
    pq.write_table(table, scored_out / "scores.parquet")
    s = build_report(scored_out)
    validate_stats(s)
    assert s["scores"]["table"] == "scores.parquet" and s["thresholds"] == []
    assert "loudness_dbfs" in s["scores"]["skipped_all_null"] and "loudness_dbfs" not in s["scores"]["columns"]
    assert all(not c["thresholds"] for c in s["scores"]["columns"].values())
    assert s["scores"]["columns"]["sync_conf"]["kept"]["n"] == s["kept"]["clips"]


@pytest.fixture(scope="module")
def fewer_out(real_out, tmp_path_factory) -> tuple[Path, list[str]]:
    """A copy of the real output whose manifest lost its first row, reported by the CLI with
    --compare against the original."""
    fewer = tmp_path_factory.mktemp("stats_fewer") / "run"
    shutil.copytree(real_out, fewer, ignore=shutil.ignore_patterns("report", "_journal"))
    m = pq.read_table(fewer / "manifest.parquet")
    pq.write_table(m.slice(1), fewer / "manifest.parquet")
    rc = subprocess.run([sys.executable, "jobs/stats.py", str(fewer), "--compare", str(real_out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    assert "report: " in rc.stdout and "check failed: index.json selection" in rc.stderr
    return fewer, m["key"].to_pylist()[:1]


def test_compare(real_out, fewer_out):
    from pipeline.report import compute_stats, load_run, validate_stats
    from pipeline.report.compare import compare

    data = load_run(real_out)  # the numbers only (the page is checked on the CLI's output below)
    c = compare(data, compute_stats(data), load_run(real_out))
    assert all(x[f"{k}_delta"] in (0, 0.0, None) for x in c["funnel"] for k in ("inputs", "clips", "clip_hours"))
    n_kept = pq.read_metadata(real_out / "manifest.parquet").num_rows
    assert c["kept"]["entered"] == c["kept"]["left"] == 0 and c["kept"]["both"] == n_kept
    assert all(r["count_delta"] == 0 for r in c["rejections"])

    fewer, dropped = fewer_out
    s = _stats(fewer / "report")  # the CLI's default place: DIR/report
    validate_stats(s)
    c = s["compare"]
    kept = {x["level"]: x for x in c["funnel"]}["kept"]
    assert kept["clips_delta"] == -1 and kept["clips_this"] == n_kept - 1 and kept["clips_other"] == n_kept
    assert kept["clip_hours_delta"] < 0
    assert c["kept"]["left"] == 1 and c["kept"]["left_examples"] == dropped and c["kept"]["entered"] == 0
    assert sum(x["count"] for x in c["kept"]["left_reasons"]) == 1
    assert set(c["scores"]) == set(s["scores"]["columns"])  # one overlay per plotted score
    # the edited manifest no longer matches index.json: the report says so
    assert not all(x["ok"] for x in s["checks"])
    page = (fewer / "report" / "index.html").read_text()
    assert "Compared with" in page and dropped[0] in page
    assert "Compared with" in (fewer / "report" / "report.md").read_text()


def test_page_in_headless_chromium(real_out, real_report, syn_out, fewer_out, tmp_path):
    from pipeline.report.browser import check_pages, find_chromium

    if find_chromium() is None:
        pytest.skip("chromium is not installed")
    pytest.importorskip("websocket")
    syn = syn_out[0]
    # a control page proves the check sees errors, so a clean result means something
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><title>x</title><img src="data:image/png;base64,AAAA">'
                   '<script>console.error("boom"); null.f()</script>')
    control, *pages = check_pages([bad, real_out / "report" / "index.html", syn / "report" / "index.html",
                                   fewer_out[0] / "report" / "index.html"])
    assert any("boom" in e for e in control.errors) and any("TypeError" in e for e in control.errors)
    assert control.broken_images == 1
    for res in pages:
        assert res.errors == [], res.errors
        assert res.requests == [res.url]  # nothing but the page itself: no network, no other files
        assert res.n_images > 10 and res.broken_images == 0
        assert res.title.startswith("Dataset report")
        img = np.asarray(Image.open(io.BytesIO(res.png)).convert("L"), dtype=float)
        assert img.shape[1] == 1280 and img.std() > 20  # not blank: text, tables and plots


def test_compare_after_refilter(real_out, tmp_path):
    """The use the comparison is for: a stricter threshold applied with jobs/refilter.py."""
    refilter = pytest.importorskip("pipeline.finalize").refilter
    from pipeline.config import load_config
    from pipeline.report import compute_stats, load_run
    from pipeline.report.compare import compare

    if not (real_out / "scores.parquet").exists():
        pytest.skip("this pipeline does not write scores.parquet")
    out = tmp_path / "refiltered"
    shutil.copytree(real_out, out, ignore=shutil.ignore_patterns("report"))
    kept = pq.read_table(out / "scores.parquet").filter(pc.equal(pq.read_table(out / "scores.parquet")["status"],
                                                                 "kept")).to_pylist()
    faces = sorted(r["face_size_px"] for r in kept)
    threshold = (faces[0] + faces[-1]) / 2  # between the smallest and the largest kept face
    left = {r["key"] for r in kept if r["face_size_px"] < threshold}
    refilter(out, load_config(None).filters.model_copy(update={"face_size_px_min": threshold}))

    data = load_run(out)
    s = compute_stats(data)
    c = compare(data, s, load_run(real_out))
    assert c["kept"]["left"] == len(left) >= 1 and set(c["kept"]["left_examples"]) == left
    assert c["kept"]["entered"] == 0
    assert [x["stage"] for x in c["kept"]["left_reasons"]] == ["refilter"]
    kept_level = {x["level"]: x for x in c["funnel"]}["kept"]
    assert kept_level["clips_delta"] == -len(left)
    moved = [x for x in c["rejections"] if x["count_delta"]]
    assert [(x["stage"], x["count_delta"]) for x in moved] == [("refilter", len(left))]
    assert all(x["ok"] for x in s["checks"]), s["checks"]


def test_output_where_everything_was_rejected(tmp_path):
    """No kept clip, no candidates, durations unknown, no run.json/index.json: still a report."""
    import schemas
    from pipeline.report import build_report, validate_stats

    uri = str(tmp_path / "gone.mp4")  # absent: its thumbnail becomes a note
    row = {"uri": uri, "video_id": "gone-0", "source": "crawl", "stage": "probe", "reason": "unreadable container",
           "clip_index": -1, "duration_s": None}
    pq.write_table(schemas.conform_table([{**row, "status": "rejected", "n_candidates": 0, "n_kept": 0,
                                           "n_rejected_clips": 0}], schemas.VIDEOS_SCHEMA), tmp_path / "videos.parquet")
    pq.write_table(schemas.conform_table([row], schemas.REJECTS_SCHEMA), tmp_path / "rejects.parquet")
    pq.write_table(schemas.conform_table([], schemas.MANIFEST_SCHEMA), tmp_path / "manifest.parquet")
    s = build_report(tmp_path)
    validate_stats(_stats(tmp_path / "report"))
    assert [x["inputs"] for x in s["funnel"]["levels"]] == [1, 0, 0, 0, 0]
    assert s["funnel"]["levels"][0]["inputs_unknown_duration"] == 1 and s["kept"]["clips"] == 0
    assert s["funnel"]["rejections"][0]["unknown_duration"] == 1
    assert s["contact_sheet"]["rejected"][0]["examples"][0]["note"] == "source file is missing"
    assert any("run.json is absent" in n for n in s["notes"]) and any("index.json" in n for n in s["notes"])
    assert "unreadable container" in (tmp_path / "report" / "index.html").read_text()
