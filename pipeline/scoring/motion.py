"""Mouth activity, head movement and framing completeness of one face track.

Inputs are per-frame arrays of one track at the clip's frame rate: landmarks [T, N, 2|3] in
pixels (mediapipe 468/478 or iBUG-68; NaN rows = frame without a detection) and/or face boxes
[T, 4] (x0, y0, x1, y1). Every length is divided by a face size so scores do not depend on
resolution or on how large the face is in the frame.

Definitions (docs/scoring.md has the literature they come from):
- face size (landmarks) = sqrt(inter-ocular distance x distance from the eye midpoint to the
  mouth-corner midpoint): neither length moves when the mouth opens, and the geometric mean
  shrinks less than either under yaw or pitch alone. Box face size = sqrt(w h).
- mouth opening = inner-lip gap (upper and lower inner-lip midpoints: mediapipe 13/14,
  iBUG-68 62/66) / face size. Mouth activity = its std over the clip (how much the mouth
  moves at all) and its mean |frame-to-frame change| x fps (how fast; face sizes per second).
  A talking face has both well above a static or only-smiling one.
- head movement = face-centre translation and scale change over the clip, normalised by the
  median face size: max distance from the median centre, per-axis range, mean speed, and the
  max/min face size ratio. ``movement_score_25fps`` applies TalkVid's movement formula (100 - 100 x
  mean landmark displacement between adjacent frames / min(W, H)) to our landmarks at the clip's
  25 fps; TalkVid measures it on insightface's 5 keypoints 1 s apart, so its thresholds (mean >= 80,
  min >= 60) do not transfer.
- completeness = per frame, the head box (face box scaled by ``head_scale`` about its centre,
  to take in hair and chin) and every landmark lie inside the image; the clip score is the
  fraction of complete frames. ``talkvid_completeness`` is TalkVid's weighted eyes (0.3) /
  nose (0.4) / mouth (0.3) in-frame score, averaged over frames, in 0..100.
"""
from __future__ import annotations

import numpy as np

# scheme: (right eye outer, left eye outer, mouth right, mouth left, upper inner lip, lower inner lip, nose tip)
_POINTS = {
    "mediapipe": dict(eye_r=33, eye_l=263, mouth_r=61, mouth_l=291, lip_up=13, lip_lo=14, nose=1),
    "ibug68": dict(eye_r=36, eye_l=45, mouth_r=48, mouth_l=54, lip_up=62, lip_lo=66, nose=30),
}


def _scheme(landmarks: np.ndarray) -> dict:
    n = landmarks.shape[1]
    if n in (468, 478):
        return _POINTS["mediapipe"]
    if n == 68:
        return _POINTS["ibug68"]
    raise ValueError(f"unsupported landmark count {n} (expected 468, 478 or 68)")


def _as_seq(landmarks) -> np.ndarray:
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    return lm[..., :2]


def face_size(landmarks) -> np.ndarray:
    """[T] sqrt(inter-ocular distance x eye-to-mouth distance) in pixels."""
    lm = _as_seq(landmarks)
    p = _scheme(lm)
    eye_r, eye_l = lm[:, p["eye_r"]], lm[:, p["eye_l"]]
    mouth = (lm[:, p["mouth_r"]] + lm[:, p["mouth_l"]]) / 2
    iod = np.linalg.norm(eye_l - eye_r, axis=1)
    e2m = np.linalg.norm(mouth - (eye_r + eye_l) / 2, axis=1)
    return np.sqrt(iod * e2m)


def mouth_opening(landmarks) -> np.ndarray:
    """[T] inner-lip gap / face size (0 = closed; ~0.3-0.5 = wide open)."""
    lm = _as_seq(landmarks)
    p = _scheme(lm)
    gap = np.linalg.norm(lm[:, p["lip_up"]] - lm[:, p["lip_lo"]], axis=1)
    return gap / np.maximum(face_size(lm), 1e-6)


def mouth_activity(opening: np.ndarray, fps: float = 25.0) -> dict:
    """Clip statistics of a mouth-opening series (NaN frames ignored)."""
    o = np.asarray(opening, np.float64)
    v = o[np.isfinite(o)]
    d = np.diff(o)
    d = d[np.isfinite(d)]
    return {
        "mouth_open_mean": float(v.mean()) if v.size else np.nan,
        "mouth_open_std": float(v.std()) if v.size else np.nan,
        "mouth_open_p90": float(np.percentile(v, 90)) if v.size else np.nan,
        "mouth_speed": float(np.abs(d).mean() * fps) if d.size else 0.0,
    }


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN (points a model did not give); NaN where all are NaN."""
    ok = np.isfinite(a)
    n = ok.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, a, 0).sum(axis) / n, np.nan)


def _box_centres_sizes(boxes) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    centres = (b[:, :2] + b[:, 2:]) / 2
    sizes = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
    return centres, sizes


def head_movement(boxes=None, landmarks=None, image_size: tuple[int, int] | None = None,
                  fps: float = 25.0) -> dict:
    """Face-centre translation and scale change over the clip, in face sizes.

    Uses the boxes when given, otherwise the landmarks' centroid and ``face_size``.
    With landmarks and ``image_size`` = (W, H) it adds ``movement_score_25fps`` (TalkVid's formula between
    adjacent frames of our series, not TalkVid's 1 fps measurement).
    """
    if boxes is not None:
        centres, sizes = _box_centres_sizes(boxes)
    elif landmarks is not None:
        lm = _as_seq(landmarks)
        centres, sizes = _nanmean(lm, 1), face_size(lm)
    else:
        raise ValueError("head_movement needs boxes or landmarks")
    ok = np.all(np.isfinite(centres), 1) & np.isfinite(sizes) & (sizes > 0)
    out: dict = {}
    if ok.sum() == 0:
        out.update(head_translation_max=np.nan, head_translation_range=np.nan,
                   head_speed=np.nan, head_scale_ratio=np.nan)
    else:
        c, s = centres[ok], sizes[ok]
        ref = float(np.median(s))
        out["head_translation_max"] = float(np.linalg.norm(c - np.median(c, 0), axis=1).max() / ref)
        out["head_translation_range"] = float((c.max(0) - c.min(0)).max() / ref)
        d = np.diff(centres, axis=0)
        d = d[np.all(np.isfinite(d), 1)]
        out["head_speed"] = float(np.linalg.norm(d, axis=1).mean() / ref * fps) if len(d) else 0.0
        out["head_scale_ratio"] = float(s.max() / s.min())
    if landmarks is not None and image_size is not None:
        lm = _as_seq(landmarks)
        disp = _nanmean(np.linalg.norm(np.diff(lm, axis=0), axis=2), 1)  # mean over points, per frame pair
        disp = disp[np.isfinite(disp)]
        per = 100 - 100 * disp / min(image_size)
        out["movement_score_25fps"] = float(per.mean()) if per.size else np.nan
        out["movement_score_25fps_min"] = float(per.min()) if per.size else np.nan
    return out


def head_box(boxes, head_scale: float = 1.2) -> np.ndarray:
    """Face boxes [T, 4] scaled by ``head_scale`` about their centres."""
    centres, _ = _box_centres_sizes(boxes)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    half = (b[:, 2:] - b[:, :2]) / 2 * head_scale
    return np.concatenate([centres - half, centres + half], 1)


def _completeness(boxes, image_size, landmarks, head_scale) -> tuple[dict, np.ndarray]:
    w, h = image_size
    hb = head_box(boxes, head_scale)
    box_in = (hb[:, 0] >= 0) & (hb[:, 1] >= 0) & (hb[:, 2] <= w) & (hb[:, 3] <= h)
    # share of the head box area inside the image (1 = fully inside), a softer score
    iw = np.clip(np.minimum(hb[:, 2], w) - np.maximum(hb[:, 0], 0), 0, None)
    ih = np.clip(np.minimum(hb[:, 3], h) - np.maximum(hb[:, 1], 0), 0, None)
    area = np.maximum((hb[:, 2] - hb[:, 0]) * (hb[:, 3] - hb[:, 1]), 1e-9)
    share = np.where(np.isfinite(area), iw * ih / area, 0.0)
    complete = box_in.copy()
    out: dict = {}
    if landmarks is not None:
        lm = _as_seq(landmarks)
        given = np.all(np.isfinite(lm), axis=2)  # NaN = a point the model did not give
        inside = (lm[..., 0] >= 0) & (lm[..., 0] <= w) & (lm[..., 1] >= 0) & (lm[..., 1] <= h)
        pts_in = np.all(inside | ~given, axis=1) & given.any(axis=1)
        complete &= pts_in
        p = _scheme(lm)

        def _in(i):
            return (lm[:, i, 0] >= 0) & (lm[:, i, 0] <= w) & (lm[:, i, 1] >= 0) & (lm[:, i, 1] <= h)

        tv = 100 * (0.15 * _in(p["eye_r"]) + 0.15 * _in(p["eye_l"]) + 0.4 * _in(p["nose"])
                    + 0.15 * _in(p["mouth_r"]) + 0.15 * _in(p["mouth_l"]))
        out["talkvid_completeness"] = float(tv.mean())
        out["talkvid_completeness_min"] = float(tv.min())
    out["complete_fraction"] = float(complete.mean()) if len(complete) else 0.0
    out["head_inside_min"] = float(np.nanmin(share)) if len(share) else 0.0
    return out, complete


def complete_frames(boxes, image_size: tuple[int, int], landmarks=None, head_scale: float = 1.2) -> np.ndarray:
    """bool [T]: the head box and all landmarks of frame t lie inside the image."""
    return _completeness(boxes, image_size, landmarks, head_scale)[1]


def completeness(boxes, image_size: tuple[int, int], landmarks=None, head_scale: float = 1.2) -> dict:
    """Fraction of frames whose head box and landmarks lie wholly inside the W x H image
    (``complete_fraction``), the smallest share of the head box inside the image
    (``head_inside_min``) and, with landmarks, TalkVid's completeness score (mean and min).
    Frames without a detection (NaN box) count as incomplete.
    """
    return _completeness(boxes, image_size, landmarks, head_scale)[0]
