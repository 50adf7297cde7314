"""End-to-end curation of the real clips (smoke profile): outcomes, clip format, shards."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from conftest import KEEP_CLIPS, VFR_MARKERS_S, read_samples
from pipeline.media import read_clip
from pipeline.shards import verify_index

pytestmark = pytest.mark.realdata


def _tables(out: Path):
    return (pq.read_table(out / "manifest.parquet"), pq.read_table(out / "rejects.parquet"),
            pq.read_table(out / "videos.parquet"))


def _samples(out: Path):
    """All samples from the shards: key -> {member: bytes}."""
    return read_samples(out)[1]


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def test_every_input_accounted_exactly_once(real_run):
    out, items = real_run["out"], real_run["items"]
    manifest, rejects, videos = _tables(out)
    assert sorted(videos.column("uri").to_pylist()) == sorted(it.uri for it in items)
    assert Counter(videos.column("uri").to_pylist()).most_common(1)[0][1] == 1
    kept_uris = set(manifest.column("uri").to_pylist())
    video_rejects = [r for r in rejects.to_pylist() if r["clip_index"] == -1]
    rejected_uris = [r["uri"] for r in video_rejects]
    assert len(rejected_uris) == len(set(rejected_uris)), "an input was rejected twice"
    assert kept_uris.isdisjoint(rejected_uris)
    # every input is kept (>= 1 clip in the manifest) or rejected with a reason
    status = {r["uri"]: r for r in videos.to_pylist()}
    for it in items:
        v = status[it.uri]
        if v["status"] == "kept":
            assert it.uri in kept_uris
        else:
            assert v["reason"], v
            assert it.uri in rejected_uris or v["n_rejected_clips"] > 0


def test_expected_rejections(real_run):
    _, rejects, _ = _tables(real_run["out"])
    by_name = {_name(r["uri"]): r for r in rejects.to_pylist() if r["clip_index"] == -1}
    assert by_name["edtalk_mouth_source_noaudio.mp4"]["reason"] == "no audio stream"
    assert by_name["edtalk_mouth_source_noaudio.mp4"]["stage"] == "probe"
    assert by_name["notes.txt"]["stage"] == "probe"
    assert by_name["edtalk_mouth_source.wav"]["reason"] == "no video stream"
    assert by_name["truncated_moov_missing.mp4"]["stage"] == "probe"
    assert by_name["truncated_faststart.mp4"]["reason"] == "truncated stream"
    for r in by_name.values():  # a reject names the file in its detail
        assert r["detail"] and (_name(r["uri"]) in r["detail"]), r


def test_speech_and_mouth_rules_on_real_clips(real_run):
    """Issue 3 on the real clips: silence and music-over-a-static-face are rejected with the
    rule and the measured value; every keep clip is kept (smoke: sync rules not applied)."""
    out = real_run["out"]
    manifest, rejects, videos = _tables(out)
    clip_rejects = {_name(r["uri"]): r for r in rejects.to_pylist() if r["clip_index"] >= 0}
    silent = clip_rejects["liveportrait_d18_silent.mp4"]
    assert silent["stage"] == "score" and "no speech" in silent["reason"]
    assert silent["value"] is not None and silent["rule"].startswith("filters.")
    music = clip_rejects["liveportrait_s18_music_static.mp4"]
    assert music["reason"] in ("no speech", "no mouth activity")
    assert "filters.mouth_activity_min" in music["detail"]  # both failures are named
    status = {_name(v["uri"]): v["status"] for v in videos.to_pylist()}
    for name in KEEP_CLIPS:
        assert status[name] == "kept", name
    run = json.loads((out / "run.json").read_text())
    assert run["sync_rules_applied"] is False
    sync_rules = [r for r in run["filter_rules"] if r["column"] in ("sync_conf", "sync_offset")]
    assert sync_rules and not any(r["applied"] for r in sync_rules)


def test_scores_table_holds_every_scored_clip(real_run):
    out = real_run["out"]
    manifest, rejects, _ = _tables(out)
    scores = pq.read_table(out / "scores.parquet")
    schemas.check_table(scores, schemas.SCORES_SCHEMA)
    rows = scores.to_pylist()
    assert len({r["key"] for r in rows}) == len(rows)
    kept = {r["key"] for r in rows if r["status"] == "kept"}
    assert kept == set(manifest.column("key").to_pylist())
    score_rejects = {r["key"] for r in rejects.to_pylist() if r["stage"] == "score"}
    assert score_rejects == {r["key"] for r in rows if r["status"] == "rejected"}
    for r in rows:  # all scores are there for every scored clip, kept or not
        for col in ("sync_conf", "sync_offset", "speech_ratio", "loudness_dbfs", "mouth_activity", "yaw_abs_max",
                    "pitch_abs_max", "roll_abs_max", "head_translation", "complete_frac", "face_size_px", "n_faces_max"):
            assert r[col] is not None, (r["key"], col)
        assert r["sync_weights"] == "smoke-random"
    hard = [r for r in rows if r["uri"].endswith("latentsync_demo1_portrait_hevc.mp4")]
    assert hard and 150 < hard[0]["face_size_px"] < 300  # the small-face case: measured size recorded


def test_keep_clips_yield_face_centred_crops(real_run):
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector

    out = real_run["out"]
    manifest, _, _ = _tables(out)
    samples = _samples(out)
    detector = MediaPipeFaceDetector(landmarks=False)
    kept = {}
    for row in manifest.to_pylist():
        kept.setdefault(_name(row["uri"]), []).append(row["key"])
    for name in KEEP_CLIPS:
        assert name in kept, f"{name} produced no clip"
        ok = False
        for key in kept[name]:
            frames, _, _ = read_clip(samples[key]["video.mp4"])
            ratios = []
            for frame in frames[:: max(1, len(frames) // 4)]:
                faces = detector.detect(frame)
                assert faces, f"no face in a frame of {key}"
                ratios.append(faces[0].width / frame.shape[1])
            ok = ok or all(0.25 <= r <= 0.75 for r in ratios)
        assert ok, f"{name}: face covers {ratios} of the frame width"


def test_every_clip_is_512_25fps_16k_mono_and_aligned(real_run):
    out = real_run["out"]
    samples = _samples(out)
    assert samples
    for key, members in samples.items():
        assert schemas.SAMPLE_KEY_PATTERN.match(key)
        assert set(members) == {"video.mp4", "meta.json"}
        meta = json.loads(members["meta.json"])
        schemas.validate_meta(meta)
        frames, audio, info = read_clip(members["video.mp4"])
        assert frames.shape[1:] == (512, 512, 3)
        assert info["fps"] == 25 and info["audio_rate"] == 16000 and info["audio_channels"] == 1
        assert len(frames) == meta["clip"]["n_frames"] and len(frames) % 8 == 0
        source_span = meta["clip"]["end_s"] - meta["clip"]["start_s"]  # of the source timeline
        assert abs(len(frames) - 25 * source_span) <= 1
        # exactly 640 samples per frame: the AAC track decodes to the video's length
        assert len(audio) == len(frames) * 640 == meta["clip"]["audio_samples"], key


def test_vfr_real_clip_comes_out_at_25fps(real_run):
    out = real_run["out"]
    manifest, _, _ = _tables(out)
    rows = [r for r in manifest.to_pylist() if _name(r["uri"]) == "retalking_face1_vfr30.mp4"]
    assert rows
    meta = json.loads(_samples(out)[rows[0]["key"]]["meta.json"])
    assert meta["source"]["vfr"] is True
    assert meta["clip"]["start_s"] >= 0.033 - 1e-3  # the source's video starts at 0.033 s
    frames, audio, info = read_clip(_samples(out)[rows[0]["key"]]["video.mp4"])
    assert info["fps"] == 25 and len(audio) == len(frames) * 640


def test_vfr_timing_markers_stay_in_sync(real_run):
    """Flash + click at the same instants in a VFR source: the same instants in the output."""
    from pipeline.demo import MARKER_BOX

    out = real_run["out"]
    manifest, _, _ = _tables(out)
    rows = [r for r in manifest.to_pylist() if _name(r["uri"]) == "synthetic_vfr_markers.mp4"]
    assert rows, "the marker clip produced no clip"
    members = _samples(out)[rows[0]["key"]]
    meta = json.loads(members["meta.json"])
    assert meta["source"]["vfr"] is True
    frames, audio, _ = read_clip(members["video.mp4"])
    start, crop = meta["clip"]["start_s"], meta["crop"]
    # Where the marker patch lands in the output crop.
    s = 640 / 512
    mx, my, mw = (v * s for v in MARKER_BOX)
    scale = 512 / crop["size"]
    cx = int((mx + mw / 2 - crop["x0"]) * scale)
    cy = int((my + mw / 2 - crop["y0"]) * scale)
    assert 0 <= cx < 512 and 0 <= cy < 512
    brightness = frames[:, cy - 3:cy + 3, cx - 3:cx + 3].mean(axis=(1, 2, 3))
    flash_frames = np.flatnonzero(brightness > 200)
    # clicks: onsets of loud samples, one per marker
    loud = np.flatnonzero(np.abs(audio) > 0.75)
    onsets = loud[np.insert(np.diff(loud) > 1600, 0, True)] / 16000
    expected = [m - start for m in VFR_MARKERS_S if 0 <= m - start < len(frames) / 25]
    assert len(expected) >= 2
    flash_times = []
    for f in flash_frames:  # first frame of each flash run
        if not flash_times or f / 25 - flash_times[-1] > 0.2:
            flash_times.append(f / 25)
    assert len(flash_times) == len(expected), (flash_times, expected)
    assert len(onsets) == len(expected), (onsets, expected)
    for ft, ct in zip(flash_times, onsets):
        # A marker shown for one source frame appears in the output frame(s) whose time falls in
        # that frame's display interval: video and audio agree within one output frame.
        assert abs(ft - ct) <= 1 / 25 + 1e-3, (flash_times, list(onsets))


def test_index_matches_shards_and_tables(real_run):
    out = real_run["out"]
    assert verify_index(out) == []
    index = json.loads((out / "index.json").read_text())
    schemas.validate_index(index)
    assert len(index["shardlist"]) >= 2, "3 MiB cap should give several shards"
    manifest, rejects, _ = _tables(out)
    schemas.check_table(manifest, schemas.MANIFEST_SCHEMA)
    schemas.check_table(rejects, schemas.REJECTS_SCHEMA)
    assert index["nsamples"] == manifest.num_rows
    keys = [k for e in index["shardlist"] for k in e["keys"]]
    assert sorted(keys) == sorted(manifest.column("key").to_pylist())
    for e in index["shardlist"]:
        assert (out / e["url"]).stat().st_size <= 3 * 1024 * 1024 or e["nsamples"] == 1


def test_shards_read_back_with_webdataset(real_run):
    import webdataset as wds

    out = real_run["out"]
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / e["url"]) for e in index["shardlist"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["meta.json"])
        assert meta["key"] == sample["__key__"]
        assert sample["video.mp4"][4:8] == b"ftyp"
        seen.append(sample["__key__"])
    assert sorted(seen) == sorted(k for e in index["shardlist"] for k in e["keys"])


def test_shards_read_back_with_ray_read_webdataset(real_run, ray_local):
    import ray

    out = real_run["out"]
    index = json.loads((out / "index.json").read_text())
    ds = ray.data.read_webdataset([str(out / e["url"]) for e in index["shardlist"]], decoder=False)
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(k for e in index["shardlist"] for k in e["keys"])
    assert all(len(r["video.mp4"]) > 1000 for r in rows)


def test_rerun_into_same_output_duplicates_nothing(real_run):
    from pipeline.runner import run_curation

    out = real_run["out"]
    before = (out / "index.json").read_text()
    manifest_before = pq.read_table(out / "manifest.parquet").to_pylist()
    summary = run_curation(real_run["items"], out, real_run["config"], progress_every_s=30)
    assert summary["inputs_this_run"] == 0
    after = json.loads((out / "index.json").read_text())
    assert after["shardlist"] == json.loads(before)["shardlist"]
    assert pq.read_table(out / "manifest.parquet").to_pylist() == manifest_before
    assert len(list((out / "shards").glob("*.tar"))) == len(after["shardlist"])
