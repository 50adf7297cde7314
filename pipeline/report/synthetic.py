"""Synthetic curation outputs for the report's tests and benchmark (numpy/pyarrow, fast at 1M rows).

``make_output`` writes a whole output whose tables obey the data contract and are consistent
with each other (every input once in videos.parquet, kept + rejected clips = candidates, the
scores separate kept from rejected by the filter rules in run.json). Only a few samples are
real shard members (tiny encoded clips): the report samples only a few, and shards named in
the manifest but absent are a case it must handle anyway.

``add_scores`` gives an existing (real) output a scores.parquet and filter_rules, for as long
as the curation job does not write them itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from .stats import rule_passes

# The layout of run.json["filter_rules"] the curation job writes (pipeline/filters.py rule_table).
FILTER_RULES = [
    {"rule": "filters.sync_conf_min", "column": "sync_conf", "op": ">=", "value": 3.0,
     "reason": "low lip-sync confidence", "applied": True},
    {"rule": "filters.sync_offset_abs_max", "column": "sync_offset", "op": "abs<=", "value": 6,
     "reason": "large audio-video offset", "applied": True},
    {"rule": "filters.speech_ratio_min", "column": "speech_ratio", "op": ">=", "value": 0.3,
     "reason": "no speech", "applied": True},
    {"rule": "filters.yaw_abs_max", "column": "yaw_abs_p95", "op": "<=", "value": 60.0,
     "reason": "extreme rotation (yaw)", "applied": True},
    {"rule": "filters.face_size_px_min", "column": "face_size_px", "op": ">=", "value": 128.0,
     "reason": "face too small", "applied": False},
    {"rule": "filters.sharpness_min", "column": "sharpness", "op": ">=", "value": 20.0,
     "reason": "blurred face", "applied": True},
]
# (stage, reason) of a clip failing each applied rule, checked in this order.
RULE_REASONS = {r["column"]: ("score", r["reason"]) for r in FILTER_RULES if r["applied"]}
VIDEO_REJECTS = [("probe", "unreadable container", 0.04), ("probe", "no audio stream", 0.03),
                 ("detect", "no face detected", 0.05), ("detect", "truncated stream", 0.01),
                 ("segment", "no face track long enough", 0.03)]
MODELS = {"face_detector": "insightface-scrfd_10g", "syncnet": "syncnet_v2", "vae": "sd-vae-ft-mse",
          "audio_encoder": "facebook/wav2vec2-base-960h", "keypoints": "dwpose-l-wholebody"}


def _str_ids(prefix: str, idx: np.ndarray, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(idx), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def _clip_scores(rng, n: int, duration: np.ndarray) -> dict[str, np.ndarray]:
    """Plausible score distributions (degrees, SyncNet units, ratios); a tail fails each rule."""
    bad_sync = rng.random(n) < 0.08
    return {
        "sync_conf": np.where(bad_sync, rng.gamma(2.0, 0.8, n), rng.normal(7.0, 1.6, n)).clip(0, 14),
        "sync_dist": rng.normal(7.5, 0.9, n).clip(4, 12),
        "sync_offset": np.where(rng.random(n) < 0.03, rng.integers(-15, 16, n), rng.integers(-2, 3, n)),
        "sync_conf_frame_mean": rng.normal(6.5, 1.5, n), "sync_conf_frame_p10": rng.normal(3.0, 1.5, n),
        "audio_shift_s": np.zeros(n),
        "speech_ratio": rng.beta(6, 2, n), "loudness_dbfs": rng.normal(-26, 4, n),
        "mouth_activity": rng.gamma(3.0, 0.02, n),
        "yaw_mean": rng.normal(0, 12, n), "pitch_mean": rng.normal(-3, 8, n), "roll_mean": rng.normal(0, 4, n),
        "yaw_abs_max": np.abs(rng.normal(0, 25, n)) + 5, "pitch_abs_max": np.abs(rng.normal(0, 15, n)) + 3,
        "roll_abs_max": np.abs(rng.normal(0, 8, n)) + 1,
        "yaw_abs_p95": np.abs(rng.normal(0, 20, n)) + 3, "pitch_abs_p95": np.abs(rng.normal(0, 12, n)) + 2,
        "roll_abs_p95": np.abs(rng.normal(0, 6, n)) + 1,
        "yaw_range": rng.gamma(3, 6, n), "pitch_range": rng.gamma(3, 4, n), "roll_range": rng.gamma(2, 3, n),
        "head_translation": rng.gamma(2, 0.02, n), "head_scale_change": rng.gamma(2, 0.03, n),
        "complete_frac": 1 - rng.beta(1, 60, n), "face_size_px": rng.lognormal(5.6, 0.35, n),
        "pad_frac": np.where(rng.random(n) < 0.7, 0.0, rng.beta(2, 8, n)),  # most crops fit their picture
        "n_faces_max": np.where(rng.random(n) < 0.05, 2, 1),
        "head_motion_var_mean": rng.gamma(2, 2.0, n), "expression_var_mean": rng.gamma(2, 0.5, n),
        # technical quality (pipeline/scoring/quality.py; ranges as on the real clips, docs/scoring.md)
        "sharpness": rng.lognormal(5.0, 0.9, n), "blockiness": 1.0 + rng.gamma(2.0, 0.05, n),
        "wsb_quality": rng.normal(9.5, 0.7, n), "bpp": rng.lognormal(-3.2, 0.7, n),
        "shadow_clip_frac": rng.beta(0.3, 40, n), "highlight_clip_frac": rng.beta(0.3, 60, n),
        "learned_iqa": rng.normal(0.6, 0.1, n),  # as if score.learned_iqa were on (pyiqa CNNIQA: ~0..~1)
        "duration_s": duration,
    }


def _fail_reasons(scores: dict[str, np.ndarray], short: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index into the reasons per clip, -1 = kept; stage names; reasons). Short clips fail at
    segment, before any score is computed; the others at the first applied rule they fail."""
    reasons = [("segment", "clip too short")] + list(RULE_REASONS.values())
    which = np.full(len(short), -1, dtype=np.int16)
    which[short] = 0
    for i, rule in enumerate(r for r in FILTER_RULES if r["column"] in RULE_REASONS):
        fail = ~rule_passes(scores[rule["column"]], rule["op"], rule["value"]) & (which < 0)
        which[fail] = i + 1
    return which, np.array([s for s, _ in reasons], dtype=object), np.array([r for _, r in reasons], dtype=object)


def make_output(root: str | Path, *, n_clips: int = 1_000_000, clips_per_video: float = 4.0, n_sources: int = 12,
                real_samples: int = 8, seed: int = 0) -> dict:
    """Write a synthetic output with ``n_clips`` candidate clips (scores rows); returns its counts."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # videos: those with candidates, then the video-level rejects
    n_with = max(1, int(n_clips / clips_per_video))
    frac_vrej = sum(p for *_, p in VIDEO_REJECTS)
    n_vrej = int(n_with * frac_vrej / (1 - frac_vrej))
    n_videos = n_with + n_vrej
    video_ids = _str_ids("vid", np.arange(n_videos), 8)
    src_idx = rng.integers(0, n_sources, n_videos)
    sources = pc.take(pa.array([f"s3://raw-bucket/source-{i:02d}" for i in range(n_sources)]), pa.array(src_idx))
    uris = pc.binary_join_element_wise(sources, pa.scalar("/"), video_ids, pa.scalar(".mp4"), "")
    vdur = rng.lognormal(4.0, 0.8, n_videos).clip(3, 3600)

    # candidate clips: every video with candidates gets one, the rest spread at random
    vid_of = np.sort(np.concatenate([np.arange(n_with), rng.integers(0, n_with, max(0, n_clips - n_with))]))[:n_clips]
    first = np.searchsorted(vid_of, vid_of, side="left")
    clip_index = (np.arange(n_clips) - first).astype(np.int32)
    n_cand = np.bincount(vid_of, minlength=n_videos).astype(np.int32)
    duration = rng.lognormal(2.0, 0.6, n_clips).clip(0.5, 30.0).round(2)
    scores = _clip_scores(rng, n_clips, duration)
    which, stage_names, reason_names = _fail_reasons(scores, duration < 2.0)
    kept = which < 0
    keys = pc.binary_join_element_wise(pc.take(video_ids, pa.array(vid_of)), pa.scalar("_"),
                                       pc.utf8_lpad(pc.cast(pa.array(clip_index), pa.string()), 4, "0"), "")
    clip_src, clip_uri, clip_vid = (pc.take(a, pa.array(vid_of)) for a in (sources, uris, video_ids))
    start = (rng.random(n_clips) * 30).round(2)

    # scores.parquet: scoring stages did not run for clips rejected at segment (nulls)
    scored = which != 0
    cols = {"key": keys, "video_id": clip_vid, "clip_index": pa.array(clip_index), "uri": clip_uri,
            "source": clip_src, "track_id": pa.array(np.zeros(n_clips, np.int32)), "start_s": pa.array(start),
            "duration_s": pa.array(duration),
            "status": pa.array(np.where(kept, "kept", "rejected")),
            "reject_stage": pa.array(np.where(kept, None, stage_names[np.maximum(which, 0)])),
            "reject_reason": pa.array(np.where(kept, None, reason_names[np.maximum(which, 0)])),
            "features_computed": pa.array(kept), "sync_weights": pa.array(np.where(scored, "syncnet_v2", None))}
    for f in schemas.SCORES_SCHEMA:
        if f.name in scores and f.name != "duration_s":
            x = scores[f.name]
            mask = ~kept if f.name in ("head_motion_var_mean", "expression_var_mean") else ~scored
            cols[f.name] = pa.array(x.astype(f.type.to_pandas_dtype()), mask=mask)
    cols["other_faces"] = pa.array(scores["n_faces_max"] > 1, mask=~scored)
    # columns the generator does not model (e.g. dedup signatures) are nulls
    _write(root / "scores.parquet", pa.table({f.name: cols.get(f.name, pa.nulls(n_clips, f.type))
                                              for f in schemas.SCORES_SCHEMA}, schema=schemas.SCORES_SCHEMA))

    # manifest.parquet: kept clips. The first ``real_samples`` go to shard 0, which is written for
    # real; the rest 1000 per shard, named in the manifest and index but never written.
    kidx = np.flatnonzero(kept)
    n_kept = len(kidx)
    real_samples = min(real_samples, n_kept)
    shard_no = np.where(np.arange(n_kept) < real_samples, 0,
                        1 + (np.arange(n_kept) - real_samples) // 1000) if real_samples else np.arange(n_kept) // 1000
    shard_urls = pc.binary_join_element_wise(pa.scalar("shards/shard-"), pc.utf8_lpad(
        pc.cast(pa.array(shard_no), pa.string()), 6, "0"), pa.scalar(".tar"), "")
    face = scores["face_size_px"][kidx]
    n_frames = np.round(duration[kidx] * 25).astype(np.int32)
    manifest = pa.table({
        "key": pc.take(keys, pa.array(kidx)), "video_id": pc.take(clip_vid, pa.array(kidx)),
        "clip_index": pa.array(clip_index[kidx]), "uri": pc.take(clip_uri, pa.array(kidx)),
        "source": pc.take(clip_src, pa.array(kidx)), "shard": shard_urls, "start_s": pa.array(start[kidx]),
        "end_s": pa.array(start[kidx] + duration[kidx]), "duration_s": pa.array(n_frames / 25.0),
        "n_frames": pa.array(n_frames), "track_id": pa.array(np.zeros(n_kept, np.int32)),
        "crop_x0": pa.array(rng.random(n_kept) * 100), "crop_y0": pa.array(rng.random(n_kept) * 100),
        "crop_size": pa.array(face * 2), "face_size_px": pa.array(face),
        "sample_bytes": pa.array((n_frames * 40_000).astype(np.int64)),
        "profile": pa.array(np.full(n_kept, "full"))}, schema=schemas.MANIFEST_SCHEMA)
    _write(root / "manifest.parquet", manifest)

    # rejects.parquet: rejected clips + video-level rejects
    ridx = np.flatnonzero(~kept)
    vrej_ids = np.arange(n_with, n_videos)
    probs = np.array([p for *_, p in VIDEO_REJECTS]) / frac_vrej
    vrej_kind = rng.choice(len(VIDEO_REJECTS), size=n_vrej, p=probs)
    vstage = np.array([s for s, _, _ in VIDEO_REJECTS], dtype=object)[vrej_kind]
    vreason = np.array([r for _, r, _ in VIDEO_REJECTS], dtype=object)[vrej_kind]
    unreadable = vreason == "unreadable container"  # no duration for files that do not open
    n_rej = len(ridx) + n_vrej
    rejects = pa.table({
        "uri": pa.concat_arrays([pc.take(clip_uri, pa.array(ridx)), pc.take(uris, pa.array(vrej_ids))]),
        "video_id": pa.concat_arrays([pc.take(clip_vid, pa.array(ridx)), pc.take(video_ids, pa.array(vrej_ids))]),
        "clip_index": pa.array(np.concatenate([clip_index[ridx], np.full(n_vrej, -1, np.int32)])),
        "key": pa.concat_arrays([pc.take(keys, pa.array(ridx)), pa.nulls(n_vrej, pa.string())]),
        "stage": pa.array(np.concatenate([stage_names[which[ridx]], vstage]).tolist(), pa.string()),
        "reason": pa.array(np.concatenate([reason_names[which[ridx]], vreason]).tolist(), pa.string()),
        "rule": pa.nulls(n_rej, pa.string()), "value": pa.nulls(n_rej, pa.float64()),
        "threshold": pa.nulls(n_rej, pa.float64()), "detail": pa.array([""] * n_rej, pa.string()),
        "duration_s": pa.array(np.concatenate([duration[ridx], np.where(unreadable, np.nan, vdur[vrej_ids])]),
                               mask=np.concatenate([np.zeros(len(ridx), bool), unreadable])),
        "source": pa.concat_arrays([pc.take(clip_src, pa.array(ridx)), pc.take(sources, pa.array(vrej_ids))]),
    }, schema=schemas.REJECTS_SCHEMA)
    _write(root / "rejects.parquet", rejects)

    # videos.parquet: one outcome per input
    n_kept_v = np.bincount(vid_of[kept], minlength=n_videos).astype(np.int32)
    has_kept = n_kept_v > 0
    status = np.where(has_kept, "kept", "rejected")
    vstage_all = np.full(n_videos, None, dtype=object)
    vreason_all = np.full(n_videos, None, dtype=object)
    vstage_all[:n_with][~has_kept[:n_with]] = "clips"
    vreason_all[:n_with][~has_kept[:n_with]] = "all clips rejected"
    vstage_all[n_with:], vreason_all[n_with:] = vstage, vreason
    vd_mask = np.zeros(n_videos, bool)
    vd_mask[n_with:] = unreadable
    videos = pa.table({
        "uri": uris, "video_id": video_ids, "source": sources, "status": pa.array(status),
        "stage": pa.array(vstage_all.tolist(), pa.string()), "reason": pa.array(vreason_all.tolist(), pa.string()),
        "n_candidates": pa.array(n_cand), "n_kept": pa.array(n_kept_v),
        "n_rejected_clips": pa.array(n_cand - n_kept_v), "duration_s": pa.array(vdur, mask=vd_mask),
        "timings": pa.array(["{}"] * n_videos), "coverage": pa.nulls(n_videos, pa.string())}, schema=schemas.VIDEOS_SCHEMA)
    _write(root / "videos.parquet", videos)

    real = _write_real_samples(root, manifest.slice(0, real_samples))
    n_shards = int(shard_no[-1]) + 1 if n_kept else 0
    counts = np.bincount(shard_no, minlength=n_shards)
    sizes = np.bincount(shard_no, weights=manifest["sample_bytes"].to_numpy(), minlength=n_shards)
    shardlist = [{"url": f"shards/shard-{i:06d}.tar", "nsamples": int(counts[i]), "filesize": int(sizes[i]),
                  "sha256": "0" * 64} for i in range(n_shards)]
    if real is not None and shardlist:
        shardlist[0].update(filesize=real["filesize"], sha256=real["sha256"])
    index = {"__kind__": schemas.INDEX_KIND, "wids_version": 1, "name": "synthetic",
             "schema_version": schemas.SCHEMA_VERSION, "pipeline_version": "synthetic", "profile": "full", "members": ["meta.json", "video.mp4"],
             "created": "2026-01-01T00:00:00Z", "nsamples": n_kept, "shardlist": shardlist}
    input_hours = float(np.nansum(np.where(vd_mask, 0, vdur))) / 3600
    wall = 3600.0 * input_hours / 40  # a cluster running 40x real time
    run = {"pipeline_version": "synthetic", "schema_version": schemas.SCHEMA_VERSION,
           "argv": ["jobs/curate.py", "--input", "s3://raw-bucket", "--output", str(root)],
           "config": {"profile": "full", "synthetic": True}, "config_fingerprint": "synthetic",
           "summary": {"inputs": n_videos, "inputs_this_run": n_videos, "clips_kept": n_kept},
           "timings": {"wall_s": wall, "inputs_per_s": n_videos / wall,
                       "stage_cpu_s": {"probe": 0.02 * n_videos, "detect": 1.5 * n_with, "crop": 2.0 * n_with,
                                       "sync": 0.3 * n_clips, "features": 1.2 * n_kept}},
           "nodes_used": [f"node-{i}" for i in range(8)], "versions": {"python": "3.11", "ray": "2.x"},
           "finished": "2026-01-01T00:00:00Z", "filter_rules": FILTER_RULES}
    (root / "run.json").write_text(json.dumps(run, indent=1))
    (root / "index.json").write_text(json.dumps(index, indent=1))
    return {"videos": n_videos, "clips": n_clips, "kept": n_kept, "rejects": n_rej}


def _write(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def _write_real_samples(root: Path, rows: pa.Table) -> dict | None:
    """Tiny real clips (a moving disc, 1 s, with a tone) for the first few kept keys."""
    from pipeline.media import encode_clip
    from pipeline.shards import ShardWriter

    if rows.num_rows == 0:
        return None
    writer = ShardWriter(root, max_bytes=1 << 40)
    yy, xx = np.mgrid[0:128, 0:128]
    for i, key in enumerate(rows["key"].to_pylist()):
        frames = []
        for t in range(25):
            cx, cy = 64 + 30 * np.cos(t / 4 + i), 64 + 30 * np.sin(t / 4 + i)
            img = np.zeros((128, 128, 3), np.uint8)
            img[..., 0] = 40 + 25 * i
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 300] = (250, 200, 60)
            frames.append(img)
        audio = (0.1 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
        meta = {"key": key, "profile": "full", "models": MODELS}
        writer.write(key, {"video.mp4": encode_clip(frames, audio), "meta.json": json.dumps(meta).encode()})
    writer.close()
    info = writer.closed_shards[0]
    return {"filesize": info.filesize, "sha256": info.sha256}


def add_scores(root: str | Path, seed: int = 0, rules: list[dict] | None = None) -> pa.Table:
    """A SCORES_SCHEMA table for an existing output's candidate clips (kept + clip rejects) and
    filter_rules in its run.json; values are synthetic, the keys and statuses are the output's."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    m = pq.read_table(root / "manifest.parquet")
    r = pq.read_table(root / "rejects.parquet")
    r = r.filter(pc.fill_null(pc.greater_equal(r["clip_index"], 0), False))
    n = m.num_rows + r.num_rows
    dur = np.concatenate([m["duration_s"].to_numpy(zero_copy_only=False),
                          np.nan_to_num(r["duration_s"].to_numpy(zero_copy_only=False))])
    s = _clip_scores(rng, n, dur)
    kept = np.arange(n) < m.num_rows

    def both(col, cast=None):
        out = pa.concat_arrays([m[col].combine_chunks(), r[col].combine_chunks()])
        return pc.cast(out, cast) if cast else out

    cols = {"key": both("key"), "video_id": both("video_id"), "clip_index": both("clip_index"), "uri": both("uri"),
            "source": both("source"), "track_id": pa.array(np.zeros(n, np.int32)),
            "start_s": pa.array(np.concatenate([m["start_s"].to_numpy(zero_copy_only=False), np.zeros(r.num_rows)])),
            "duration_s": pa.array(dur), "status": pa.array(np.where(kept, "kept", "rejected")),
            "reject_stage": pa.concat_arrays([pa.nulls(m.num_rows, pa.string()), r["stage"].combine_chunks()]),
            "reject_reason": pa.concat_arrays([pa.nulls(m.num_rows, pa.string()), r["reason"].combine_chunks()]),
            "features_computed": pa.array(kept), "sync_weights": pa.array(["smoke-random"] * n),
            "other_faces": pa.array(s["n_faces_max"] > 1)}
    for f in schemas.SCORES_SCHEMA:
        if f.name not in cols:
            cols[f.name] = (pa.array(s[f.name].astype(f.type.to_pandas_dtype())) if f.name in s
                            else pa.nulls(n, f.type))  # not simulated (e.g. identity_embedding): null
    table = pa.table({f.name: cols[f.name] for f in schemas.SCORES_SCHEMA}, schema=schemas.SCORES_SCHEMA)
    _write(root / "scores.parquet", table)
    run_path = root / "run.json"
    run = json.loads(run_path.read_text()) if run_path.exists() else {}
    run["filter_rules"] = FILTER_RULES if rules is None else rules
    run_path.write_text(json.dumps(run, indent=1))
    return table
