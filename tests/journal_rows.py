"""Synthetic curation bookkeeping at scale, without video (tests/test_bookkeeping.py,
benchmarks/bookkeeping.py).

``outcome_rows`` yields the rows the curation stages emit for one input (``summary``, ``clip``
with a small mp4 blob, ``reject`` with its scores row), shaped like the real ones (a real
smoke-profile output's meta.json, scores with the 512-value identity embedding and the audio
fingerprint). ``build_journal`` journals N finished inputs through the Journal API the way the
driver does: clips grouped into shards, an input journaled once its clips are in a shard,
finished inputs flushed in parts. Outcomes cycle over ten inputs: 1 video reject, 1 input whose
only clip is rejected, 6 inputs with one kept clip, 1 with two kept and one rejected clip, 1
with two kept: 1.0 kept clip per input, 0.2 rejected clips with scores.
"""
from __future__ import annotations

import base64
import json
import random

from pipeline.inputs import InputItem, video_id_for
from pipeline.bookkeeper import _InFlight, _kept_scores_row, _retryable, _video_row
from schemas.records import manifest_row_from_meta
from pipeline.shards import ShardInfo
from pipeline.stages import new_row

CLIP_S = 6.0
MP4_BYTES = 2048  # the "small blob" standing in for the clip's video member


def synthetic_items(n: int, root: str = "/data/talking-heads") -> list[InputItem]:
    out = []
    for i in range(n):
        uri = f"{root}/{i // 1000:04d}/talk_{i:06d}.mp4"
        out.append(InputItem(uri=uri, source=root, video_id=video_id_for(uri)))
    return out


def plan(i: int) -> tuple[int, int, bool]:
    """(kept clips, rejected clips, video-level reject) of input ``i``."""
    return {0: (0, 0, True), 1: (0, 1, False), 8: (2, 1, False), 9: (2, 0, False)}.get(i % 10, (1, 0, False))


_EMBEDDINGS = [[random.Random(s).gauss(0, 0.044) for _ in range(512)] for s in range(16)]  # drawn once: fast rows


def _scores(rng: random.Random, key: str, item: InputItem, ci: int, status: str, reason: str | None) -> dict:
    emb = _EMBEDDINGS[rng.randrange(len(_EMBEDDINGS))]
    sc = {name: rng.uniform(-10, 10) for name in (
        "speech_ratio", "loudness_dbfs", "sync_conf", "sync_dist", "sync_conf_frame_mean", "sync_conf_frame_p10",
        "mouth_activity", "yaw_mean", "yaw_abs_max", "yaw_abs_p95", "yaw_range", "pitch_mean", "pitch_abs_max",
        "pitch_abs_p95", "pitch_range", "roll_mean", "roll_abs_max", "roll_abs_p95", "roll_range",
        "head_translation", "head_scale_change", "sharpness", "shadow_clip_frac", "highlight_clip_frac",
        "blockiness", "wsb_quality", "bpp")}
    sc.update(face_size_px=rng.uniform(120, 300), n_faces_max=1, sync_weights="smoke-random", other_faces=False,
              sync_offset=rng.randint(-15, 15), complete_frac=1.0, pad_frac=0.0, audio_shift_s=0.0,
              identity_model="smoke-random-arcface", identity_embedding=emb,
              phash=[rng.getrandbits(63) for _ in range(5)], phash_mirrored=[rng.getrandbits(63) for _ in range(5)],
              audio_fingerprint=base64.b64encode(rng.randbytes(int(CLIP_S / 0.0116) * 4)).decode())
    return dict(sc, key=key, video_id=item.video_id, clip_index=ci, uri=item.uri, source=item.source, track_id=0,
                start_s=ci * CLIP_S, duration_s=CLIP_S, status=status, reject_stage=None if status == "kept" else "score",
                reject_reason=reason, features_computed=False)


def _meta(item: InputItem, key: str, ci: int, scores: dict) -> dict:
    n = int(CLIP_S * 25)
    return {
        "schema_version": "2.1", "pipeline_version": "0.1.0", "profile": "smoke", "key": key,
        "video_id": item.video_id, "clip_index": ci,
        "source": {"uri": item.uri, "source": item.source, "size_bytes": 400885, "duration_s": 20.0, "fps": 25.0,
                   "vfr": False, "width": 640, "height": 640, "rotation": 0, "video_codec": "h264",
                   "audio_codec": "aac", "audio_rate": 44100, "audio_channels": 2, "sample_aspect_ratio": "1:1",
                   "coded_width": 640, "coded_height": 640, "audio_spans_s": [[0.0, 20.0]], "damaged": []},
        "clip": {"start_s": ci * CLIP_S, "end_s": (ci + 1) * CLIP_S, "n_frames": n, "fps": 25, "width": 512,
                 "height": 512, "audio_rate": 16000, "audio_samples": n * 640, "audio_shift_s": 0.0, "track_id": 0,
                 "shot_index": 0},
        "crop": {"x0": 144.1, "y0": 13.2, "size": 277.2, "scale": 2.0, "face_size_px": scores["face_size_px"],
                 "padded": False, "active_picture": [0.0, 0.0, 640.0, 640.0], "pad_frac": 0.0},
        "models": {"face_detector": "mediapipe-0.10.14:blazeface-full-short",
                   "landmarks": "mediapipe-0.10.14:blazeface-short+facemesh-478", "syncnet": "smoke-random"},
        "members": ["video.mp4", "meta.json"],
        "scores": scores,
    }


def _reject(item: InputItem, *, ci: int, key: str | None, stage: str, reason: str, duration_s: float | None) -> dict:
    return {"uri": item.uri, "video_id": item.video_id, "clip_index": ci, "key": key, "stage": stage,
            "reason": reason, "rule": None if ci < 0 else "filters.speech_ratio_min", "value": None if ci < 0 else 0.0,
            "threshold": None if ci < 0 else 0.2, "detail": f"{item.uri}: synthetic {reason}",
            "duration_s": duration_s, "source": item.source}


def outcome_rows(i: int, item: InputItem) -> list[dict]:
    """The rows the stages emit for input ``i``: a video reject, or a summary then one row per candidate."""
    rng = random.Random(i)
    kept, rejected, video_reject = plan(i)
    if video_reject:
        payload = _reject(item, ci=-1, key=None, stage="detect", reason="no face found", duration_s=20.0)
        return [new_row(item.video_id, item.uri, item.source, "reject", payload)]
    summary = {"n_candidates": kept + rejected,
               "probe": {"uri": item.uri, "duration_s": 20.0, "fps": 25.0, "width": 640, "height": 640},
               "timings": {"probe": 0.02, "detect": 2.3, "crop": 3.3, "score": 0.2}, "nodes": {"detect": "node-a"},
               "analysis": {"coverage": {"audio_spans_s": [[0.0, 20.0]], "damaged": [], "decode_errors": []}},
               "models": {}}
    rows = [new_row(item.video_id, item.uri, item.source, "summary", summary)]
    for ci in range(kept + rejected):
        key = f"{item.video_id}_{ci:04d}"
        if ci < kept:
            meta = _meta(item, key, ci, _scores(rng, key, item, ci, "kept", None))
            rows.append(new_row(item.video_id, item.uri, item.source, "clip", meta, clip_index=ci,
                                mp4=rng.randbytes(MP4_BYTES)))
        else:
            payload = _reject(item, ci=ci, key=key, stage="score", reason="no speech", duration_s=CLIP_S)
            payload["scores"] = _scores(rng, key, item, ci, "rejected", "no speech")
            rows.append(new_row(item.video_id, item.uri, item.source, "reject", payload, clip_index=ci))
    return rows


def build_journal(journal, items: list[InputItem], *, clips_per_shard: int = 100, inputs_per_part: int = 25,
                  first: int = 0) -> dict:
    """Journal ``items`` as finished (input ``first + j`` gets plan(first + j)), the way the driver
    does; returns counts of what it wrote."""
    ready: list[dict] = []
    waiting: list[_InFlight] = []  # finished, clips not yet in a closed shard
    manifest, scores, keys = [], [], []
    shard_index = journal.next_shard_index()
    counts = {"inputs": 0, "clips_kept": 0, "clips_rejected": 0, "shards": 0, "video_parts": 0}

    def flush_ready(force=False):
        nonlocal ready
        while len(ready) >= inputs_per_part or (force and ready):
            journal.record_videos(ready[:inputs_per_part])
            ready = ready[inputs_per_part:]
            counts["video_parts"] += 1

    def close_shard():
        nonlocal manifest, scores, keys, waiting, shard_index
        url = f"shards/shard-{shard_index:06d}.tar"
        for m in manifest:
            m["shard"] = url
        info = ShardInfo(url=url, nsamples=len(keys), filesize=len(keys) * 10240, sha256="0" * 64, keys=keys)
        journal.record_shard(info, manifest, scores)
        shard_index += 1
        counts["shards"] += 1
        ready.extend(_entry(st) for st in waiting)
        manifest, scores, keys, waiting = [], [], [], []
        flush_ready()

    for j, item in enumerate(items):
        st = _InFlight(item)
        for row in outcome_rows(first + j, item):
            payload = json.loads(row["payload"])
            if row["kind"] == "summary":
                st.summary, st.n_candidates = payload, payload["n_candidates"]
            elif row["kind"] == "reject" and row["clip_index"] < 0:
                st.video_reject = payload
            elif row["kind"] == "reject":
                st.scores.append(payload.pop("scores"))
                st.rejects.append(payload)
                counts["clips_rejected"] += 1
            else:
                st.kept_keys.append(payload["key"])
                keys.append(payload["key"])
                manifest.append(manifest_row_from_meta(payload, shard=None, sample_bytes=len(row["mp4"]) + 6000))
                scores.append(_kept_scores_row(payload, item.source, False))
                counts["clips_kept"] += 1
        counts["inputs"] += 1
        if st.kept_keys:
            waiting.append(st)
        else:
            ready.append(_entry(st))
            flush_ready()
        if len(keys) >= clips_per_shard:
            close_shard()
    if keys:
        close_shard()
    flush_ready(force=True)
    return counts


def _entry(st: _InFlight) -> dict:
    """The journal entry of a finished input, as the driver writes it."""
    return {"video": _video_row(st), "rejects": ([st.video_reject] if st.video_reject else []) + st.rejects,
            "scores": st.scores, "retryable": _retryable(st)}
