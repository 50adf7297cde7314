"""schemas/records.py: every row the pipeline writes in several places has one constructor whose fields
are its table's columns; rejects say whether the next run retries the input; the stages use them."""
from __future__ import annotations

import json

import numpy as np
import pytest

import schemas
from pipeline.media import MediaError
from pipeline.stages import SAMPLE_MEMBERS, _crash_reject, new_row, reject_row
from schemas import records

ROW = new_row("vid", "/in/vid.mp4", "/in", "video", {})
META = {"key": "vid_0003", "video_id": "vid", "clip_index": 3, "profile": "smoke",
        "source": {"uri": "/in/vid.mp4", "source": "/in"},
        "clip": {"start_s": 6.0, "end_s": 8.0, "n_frames": 60, "fps": 30, "track_id": 1},
        "crop": {"x0": 1.0, "y0": 2.0, "size": 300.0, "face_size_px": 180.0},
        "scores": {"sync_conf": 5.5, "face_size_px": 180.0, "max_faces": 1}}


def test_rows_have_exactly_their_tables_columns():
    reject = records.clip_reject(uri="/in/vid.mp4", video_id="vid", source="/in", clip_index=3, key="vid_0003",
                                 stage="score", reason="no speech", retryable=False, value=np.float32(0.5))
    assert set(reject) == set(schemas.REJECTS_SCHEMA.names) | {"retryable"}
    assert reject["value"] == 0.5 and type(reject["value"]) is float
    assert set(records.manifest_row_from_meta(META, shard="shards/s.tar", sample_bytes=9)) == set(
        schemas.MANIFEST_SCHEMA.names)
    scores = records.kept_scores_row(META, source="/in", features_computed=True)
    assert set(scores) <= set(schemas.SCORES_SCHEMA.names) and "max_faces" not in scores  # meta-only key left out
    assert scores["sync_conf"] == 5.5 and scores["status"] == "kept"


def test_durations_use_the_clips_own_frame_rate():
    assert records.manifest_row_from_meta(META, shard="shards/s.tar", sample_bytes=9)["duration_s"] == 2.0
    assert records.kept_scores_row(META, source="/in", features_computed=False)["duration_s"] == 2.0  # 60 / 30, not / 25


@pytest.mark.parametrize("bad, error", [
    (dict(clip_index=-1), "clip_index -1 < 0"),
    (dict(retryable=None), "retryable must be True or False"),
    (dict(value="high"), "value must be a number"),
    (dict(reason=""), "reason must be a non-empty string"),
])
def test_bad_rejects_are_refused_where_they_are_made(bad, error):
    fields = dict(uri="/in/vid.mp4", video_id="vid", source="/in", clip_index=0, key="vid_0000", stage="score",
                  reason="no speech", retryable=False)
    with pytest.raises((ValueError, TypeError), match=error):
        records.clip_reject(**dict(fields, **bad))


def test_a_rejected_scores_row_needs_its_reason():
    with pytest.raises(ValueError, match="needs its reject_reason"):
        records.scores_row(scores={}, key="k", video_id="v", clip_index=0, uri="u", source=None, track_id=0,
                           start_s=0.0, n_frames=25, fps=25, status="rejected", features_computed=False)


def test_retryable_is_decided_where_the_reject_is_made():
    def payload(reject):
        return json.loads(reject["payload"])

    assert payload(_crash_reject(ROW, "detect", RuntimeError("boom")))["retryable"] is True  # internal error
    assert payload(_crash_reject(ROW, "probe", MediaError("HTTP 503", "server busy")))["retryable"] is True
    assert payload(_crash_reject(ROW, "probe", MediaError("HTTP 404", "gone")))["retryable"] is False
    assert payload(_crash_reject(ROW, "probe", MediaError("timed out", "hangs")))["retryable"] is False
    rule = payload(reject_row(ROW, stage="probe", reason="too short", rule="probe.min_duration_s", value=1, threshold=2))
    assert rule["retryable"] is False and rule["value"] == 1.0 and rule["clip_index"] == -1
    assert records.is_retryable(rule) is False


def test_rejects_journaled_before_the_field_keep_their_old_judgement():
    old = {"uri": "u", "video_id": "v", "clip_index": -1, "stage": "ray", "reason": "worker failed"}
    assert records.is_retryable(old)
    assert records.is_retryable(dict(old, stage="features", reason="out of memory"))
    assert records.is_retryable(dict(old, stage="probe", reason="HTTP 502"))
    assert not records.is_retryable(dict(old, stage="probe", reason="HTTP 404"))
    assert not records.is_retryable(dict(old, reason="worker failed", retryable=False))  # the field wins


def test_one_member_list():
    assert records.sample_members(False) == ["video.mp4", "meta.json"]
    assert records.sample_members(True) == list(schemas.MEMBERS)
    assert set(SAMPLE_MEMBERS.values()) | {"meta.json"} == set(schemas.MEMBERS)


def test_a_feature_failure_is_a_retryable_clip_reject_with_its_scores():
    """FeatureStage on a clip whose video cannot be decoded (the extractor is never reached)."""
    from pipeline.stages import FeatureStage

    stage = FeatureStage.__new__(FeatureStage)  # no models: decoding fails before they would run
    clip = new_row("vid", "/in/vid.mp4", "/in", "clip", dict(META, models={}), clip_index=3, mp4=b"not an mp4")
    out = stage._one(clip)
    payload = json.loads(out["payload"])
    assert (out["kind"], out["clip_index"], payload["stage"], payload["key"]) == ("reject", 3, "features", "vid_0003")
    assert payload["retryable"] is True and records.is_retryable(payload)
    assert payload["duration_s"] == payload["scores"]["duration_s"] == 2.0  # 60 frames at the clip's 30 fps
    assert payload["scores"]["status"] == "rejected" and payload["scores"]["reject_stage"] == "features"
