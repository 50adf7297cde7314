"""Typed constructors of the rows the pipeline writes in several places.

A rejects row (of an input or of one candidate clip), a scores row, a manifest row and the list of
a sample's members are each built here and nowhere else, with keyword-only arguments and a check
that every field is a column of its table (``TABLE_SCHEMAS``): a renamed column fails where the
row is made, not as a silent null in a parquet file.

Rejects carry ``retryable``: whether the outcome says more about the machine than about the video
(a crashed worker, an internal error, a feature-stage failure, an HTTP 5xx from the input's
server), so the next run processes the input again instead of counting it as final. The stage that
makes a reject decides it, where the cause is known. It is a field of the journal's rejects, not
a column of rejects.parquet (the table's columns are unchanged, schema version 2.1).
"""
from __future__ import annotations

import numbers

from . import MEMBERS, TABLE_SCHEMAS

# ---- sample members -------------------------------------------------------------------------

# video.mp4 and meta.json: every sample has them.
REQUIRED_MEMBERS: tuple[str, ...] = tuple(name for name, m in MEMBERS.items() if m.required)
# latent.npy, audio.npy, kps.npy, motion.npy: the features stage's members.
FEATURE_MEMBERS: tuple[str, ...] = tuple(name for name, m in MEMBERS.items() if not m.required)


def sample_members(features: bool) -> list[str]:
    """The members each sample of a run carries (``features.enabled``: the feature members too),
    in the order of ``schemas.MEMBERS``."""
    return list(REQUIRED_MEMBERS + (FEATURE_MEMBERS if features else ()))


# ---- validation -----------------------------------------------------------------------------

_COLUMNS = {name.removesuffix(".parquet"): frozenset(schema.names) for name, schema in TABLE_SCHEMAS.items()}
# Fields a journal row carries beside its table's columns.
_EXTRA_FIELDS = {"rejects": frozenset({"retryable"})}


def _checked(table: str, row: dict) -> dict:
    unknown = row.keys() - _COLUMNS[table] - _EXTRA_FIELDS.get(table, frozenset())
    if unknown:
        raise ValueError(f"{table} row has fields that are not {table}.parquet columns: {sorted(unknown)}")
    return row


def _number(name: str, value) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real):  # numpy scalars and bools (a flag rule's value: 1.0) are Real too
        raise TypeError(f"{name} must be a number or None, not {type(value).__name__} ({value!r})")
    return float(value)


def _text(name: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value


# ---- rejects --------------------------------------------------------------------------------

DETAIL_MAX_CHARS = 2000  # a traceback or a long rule list is cut here


def _reject(*, uri: str, video_id: str, source: str | None, clip_index: int, key: str | None, stage: str,
            reason: str, retryable: bool, rule: str | None, value, threshold, detail: str,
            duration_s: float | None) -> dict:
    if not isinstance(retryable, bool):
        raise TypeError(f"retryable must be True or False, not {retryable!r}")
    return _checked("rejects", {
        "uri": _text("uri", uri), "video_id": _text("video_id", video_id), "clip_index": int(clip_index), "key": key,
        "stage": _text("stage", stage), "reason": _text("reason", reason), "rule": rule,
        "value": _number("value", value), "threshold": _number("threshold", threshold),
        "detail": (detail or "")[:DETAIL_MAX_CHARS], "duration_s": _number("duration_s", duration_s),
        "source": source, "retryable": retryable})


def input_reject(*, uri: str, video_id: str, source: str | None, stage: str, reason: str, retryable: bool,
                 rule: str | None = None, value: float | None = None, threshold: float | None = None,
                 detail: str = "", duration_s: float | None = None) -> dict:
    """The rejects row of a whole input (clip_index -1): unreadable, no face, its worker failed, ..."""
    return _reject(uri=uri, video_id=video_id, source=source, clip_index=-1, key=None, stage=stage, reason=reason,
                   retryable=retryable, rule=rule, value=value, threshold=threshold, detail=detail,
                   duration_s=duration_s)


def clip_reject(*, uri: str, video_id: str, source: str | None, clip_index: int, key: str | None, stage: str,
                reason: str, retryable: bool, rule: str | None = None, value: float | None = None,
                threshold: float | None = None, detail: str = "", duration_s: float | None = None) -> dict:
    """The rejects row of one candidate clip (clip_index >= 0; ``key`` None for a segment too short
    to become a clip)."""
    if int(clip_index) < 0:
        raise ValueError(f"clip_reject of {uri}: clip_index {clip_index} < 0 (an input's reject is input_reject)")
    return _reject(uri=uri, video_id=video_id, source=source, clip_index=clip_index, key=key, stage=stage,
                   reason=reason, retryable=retryable, rule=rule, value=value, threshold=threshold, detail=detail,
                   duration_s=duration_s)


# How journal entries written before rejects carried ``retryable`` were judged (the reason labels).
_LEGACY_RETRYABLE_REASONS = ("internal error", "worker failed")


def is_retryable(reject: dict) -> bool:
    """Whether a rejects row asks for the input to be processed again: its ``retryable`` field, or
    for a row journaled before that field existed, the rule those runs applied to its reason."""
    if "retryable" in reject:
        return bool(reject["retryable"])
    reason = reject.get("reason") or ""
    return reason in _LEGACY_RETRYABLE_REASONS or reason.startswith("HTTP 5") or reject.get("stage") == "features"


# ---- scores ---------------------------------------------------------------------------------

_SCORE_COLUMNS = _COLUMNS["scores"]


def scores_row(*, scores: dict, key: str, video_id: str, clip_index: int, uri: str, source: str | None,
               track_id: int, start_s: float, n_frames: int, fps: float, status: str,
               reject_stage: str | None = None, reject_reason: str | None = None,
               features_computed: bool) -> dict:
    """One scored candidate clip's scores.parquet row: ``scores`` (what the scoring measured; keys
    that are not scores columns are left out) and the clip's identity. ``duration_s`` is
    ``n_frames / fps`` at the clip's own frame rate."""
    if status not in ("kept", "rejected"):
        raise ValueError(f"scores row of {key}: status {status!r} is neither 'kept' nor 'rejected'")
    if status == "rejected" and not reject_reason:
        raise ValueError(f"scores row of {key}: a rejected clip needs its reject_reason")
    if not fps or fps <= 0:
        raise ValueError(f"scores row of {key}: fps {fps!r} must be positive")
    row = {k: v for k, v in scores.items() if k in _SCORE_COLUMNS}
    row.update(key=_text("key", key), video_id=video_id, clip_index=int(clip_index), uri=uri, source=source,
               track_id=int(track_id), start_s=float(start_s), duration_s=n_frames / fps, status=status,
               reject_stage=reject_stage, reject_reason=reject_reason, features_computed=bool(features_computed))
    return _checked("scores", row)


def kept_scores_row(meta: dict, *, source: str | None, features_computed: bool) -> dict:
    """The scores row of a kept clip, from its meta.json."""
    clip = meta["clip"]
    return scores_row(scores=meta.get("scores", {}), key=meta["key"], video_id=meta["video_id"],
                      clip_index=meta["clip_index"], uri=meta["source"]["uri"], source=source,
                      track_id=clip["track_id"], start_s=clip["start_s"], n_frames=clip["n_frames"], fps=clip["fps"],
                      status="kept", features_computed=features_computed)


# ---- manifest -------------------------------------------------------------------------------

def manifest_row(*, key: str, video_id: str, clip_index: int, uri: str, source: str | None, shard: str | None,
                 start_s: float, end_s: float, n_frames: int, fps: float, track_id: int, crop_x0: float,
                 crop_y0: float, crop_size: float, face_size_px: float, sample_bytes: int, profile: str) -> dict:
    """One kept clip's manifest.parquet row; ``shard`` is the shard's url relative to the output root
    (None while the sample is on its way to a shard writer, which sets it: pipeline/writer.py)."""
    if not fps or fps <= 0:
        raise ValueError(f"manifest row of {key}: fps {fps!r} must be positive")
    return _checked("manifest", {
        "key": _text("key", key), "video_id": video_id, "clip_index": int(clip_index), "uri": uri, "source": source,
        "shard": None if shard is None else _text("shard", shard), "start_s": float(start_s), "end_s": float(end_s),
        "duration_s": n_frames / fps, "n_frames": int(n_frames), "track_id": int(track_id),
        "crop_x0": float(crop_x0), "crop_y0": float(crop_y0), "crop_size": float(crop_size),
        "face_size_px": float(face_size_px), "sample_bytes": int(sample_bytes), "profile": profile})


def manifest_row_from_meta(meta: dict, *, shard: str | None, sample_bytes: int) -> dict:
    """The manifest row of a kept clip, from its meta.json."""
    clip, crop = meta["clip"], meta["crop"]
    return manifest_row(key=meta["key"], video_id=meta["video_id"], clip_index=meta["clip_index"],
                        uri=meta["source"]["uri"], source=meta["source"].get("source"), shard=shard,
                        start_s=clip["start_s"], end_s=clip["end_s"], n_frames=clip["n_frames"], fps=clip["fps"],
                        track_id=clip["track_id"], crop_x0=crop["x0"], crop_y0=crop["y0"], crop_size=crop["size"],
                        face_size_px=crop["face_size_px"], sample_bytes=sample_bytes, profile=meta["profile"])
