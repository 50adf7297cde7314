"""Head-motion and expression variances per training window (Loopy, arXiv 2409.02634, section 3.5).

Paper: "The variance of the absolute position of the nose tip across these 12 frames was used as
the absolute head motion variance. The variance of the displacement of the upper half of the facial
keypoints (37 keypoints) relative to the nose tip across these 12 frames was used as the expression
variance." The keypoints are DWPose face points (``kps.npy``, iBUG-68 order, 512-crop pixels).

Definitions used here (the paper gives no formula; these are the natural reading, stated once):
  * window: frames [t, t + W) for every start t = 0 .. T - W (W = 12 by default); output row t.
  * variance of a 2-D point over the window: population variance (ddof 0) of x plus that of y,
    i.e. the trace of the 2x2 covariance = mean squared distance from the window's mean position.
    It is rotation invariant and in pixels^2 of the 512 crop.
  * head-motion variance: that variance of the nose tip (point 30).
  * expression variance: that variance of (point_k - nose tip) for each of the 37 upper-face
    points, averaged over the 37 points (a mean, so the value does not scale with the point count).
  * clips shorter than W frames have no complete window: the result is an empty [0, C] array
    (the trainer cannot draw a 12-frame window from them either).

Keypoint-score gating (``score_threshold``; definitions audit item 6): a keypoint whose DWPose
score is below the threshold does not exist in that frame. 0.3 is DWPose's own visibility
threshold (IDEA-Research/DWPose, ControlNet-v1-1-nightly/annotator/dwpose/__init__.py:
``un_visible = subset < 0.3; candidate[un_visible] = -1``). Then, per window:
  * a point's variance is taken over the frames where it is valid (for a displacement: where the
    point and the nose tip are both valid) and exists only when it is valid in at least
    ``min_valid_frac`` of the W frames;
  * head-motion variance is NaN when the nose tip's variance does not exist;
  * expression variance is the mean over the upper-face points whose variance exists, NaN when
    fewer than ``min_valid_frac`` of the 37 do.
NaN marks "not measurable" in motion.npy; readers treat such a window as having no motion
conditions (loopy_model/data/windows.py).

Normalisation by face size (``motion_table``): the variances are also divided by the clip's face
size squared, so a face twice as large in the crop gives the same normalised values. Face size =
the median over the clip's frames of max(width, height) of the box around the frame's valid face
keypoints (all 68; frames with fewer than ``min_valid_frac`` of 68 valid points are left out). It is
taken from the same keypoints, in the same pixels, as the variances; one number per clip, so mouth
opening (which stretches the box height from frame to frame) does not modulate the normalised
values within a clip. The crop's detector face size (meta crop.face_size_px) is not used: it comes
from another model's box convention and from source pixels.
"""
from __future__ import annotations

import numpy as np

from schemas import MOTION_COLUMNS  # noqa: F401 - motion.npy's columns, in motion_table's order

WINDOW = 12  # Loopy 3.5: the 12 frames of a training clip
NOSE_TIP = 30  # iBUG-68: nose bridge 27-30 ends at the tip, 30
SCORE_THRESHOLD = 0.3  # DWPose's visibility threshold (see module doc)
MIN_VALID_FRAC = 0.5  # share of frames (per point) and of points (per window) needed for a value

# The upper half of the face in iBUG-68 order: every point above the mouth line.
#   jaw contour 0-2 and 14-16 (the temples and cheeks at eye/nose height; 3 and 13 are at the mouth)
#   eyebrows 17-26 (10), nose 27-35 (9), eyes 36-47 (12)
# 6 + 10 + 9 + 12 = 37, the paper's count; the mouth (48-67) and lower jaw (3-13) are excluded,
# matching the paper's "excluding the mouth area" for its Exp metric. The nose tip is one of the 37;
# its displacement from itself is always 0, and it is kept so the set is exactly the paper's 37.
UPPER_FACE = np.array([0, 1, 2, 14, 15, 16, *range(17, 27), *range(27, 36), *range(36, 48)])
assert len(UPPER_FACE) == 37 and len(set(UPPER_FACE.tolist())) == 37


def _masked_window_variance(points: np.ndarray, valid: np.ndarray, window: int, min_frames: int) -> np.ndarray:
    """points [T, ..., 2], valid [T, ...] -> [T-W+1, ...]: var(x) + var(y) (ddof 0) over each window's
    valid frames; NaN where fewer than ``min_frames`` frames are valid."""
    win = np.lib.stride_tricks.sliding_window_view(points, window, axis=0)  # [N, ..., 2, W]
    m = np.lib.stride_tricks.sliding_window_view(valid, window, axis=0)[..., None, :]  # [N, ..., 1, W]
    n = m.sum(axis=-1)  # [N, ..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(m, win, 0.0).sum(axis=-1, keepdims=True) / n[..., None]
        var = (np.where(m, win - mean, 0.0) ** 2).sum(axis=-1) / n  # [N, ..., 2]
    out = var.sum(axis=-1)
    out[n[..., 0] < min_frames] = np.nan
    return out


def _check(kps: np.ndarray, window: int) -> np.ndarray:
    kps = np.asarray(kps)
    if kps.ndim != 3 or kps.shape[1] != 68 or kps.shape[2] < 2:
        raise ValueError(f"kps must be [T, 68, 2|3], got {kps.shape}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return kps


def valid_points(kps: np.ndarray, score_threshold: float | None) -> np.ndarray:
    """[T, 68] bool: score >= threshold (all True without a threshold or without a score channel)."""
    if score_threshold is None or kps.shape[2] < 3:
        return np.ones(kps.shape[:2], dtype=bool)
    return kps[..., 2] >= score_threshold


def motion_variances(kps: np.ndarray, window: int = WINDOW, *, score_threshold: float | None = None,
                     min_valid_frac: float = MIN_VALID_FRAC) -> np.ndarray:
    """Face keypoints [T, 68, 2 or 3] -> float32 [T-W+1, 2]: (head-motion var, expression var) in px^2.

    ``score_threshold=None`` uses every point (no gating); otherwise see the module doc (NaN where a
    window has too few valid points).
    """
    kps = _check(kps, window)
    T = kps.shape[0]
    if T < window:
        return np.zeros((0, 2), dtype=np.float32)
    valid = valid_points(kps, score_threshold)
    min_frames = max(1, int(np.ceil(min_valid_frac * window)))
    xy = kps[..., :2].astype(np.float64)
    nose, nose_ok = xy[:, NOSE_TIP], valid[:, NOSE_TIP]  # [T, 2], [T]
    rel = xy[:, UPPER_FACE] - nose[:, None]  # [T, 37, 2]
    rel_ok = valid[:, UPPER_FACE] & nose_ok[:, None]
    head = _masked_window_variance(nose, nose_ok, window, min_frames)  # [T-W+1]
    per_point = _masked_window_variance(rel, rel_ok, window, min_frames)  # [T-W+1, 37]
    enough = np.isfinite(per_point).sum(axis=1) >= max(1, int(np.ceil(min_valid_frac * len(UPPER_FACE))))
    expr = np.full(len(per_point), np.nan)
    expr[enough] = np.nanmean(per_point[enough], axis=1)
    return np.stack([head, expr], axis=1).astype(np.float32)


def face_size(kps: np.ndarray, *, score_threshold: float | None = SCORE_THRESHOLD,
              min_valid_frac: float = MIN_VALID_FRAC) -> float:
    """The clip's face size in px: median over frames of max(w, h) of the valid keypoints' box; NaN
    when no frame has at least ``min_valid_frac`` of the 68 points valid."""
    kps = _check(kps, 1)
    valid = valid_points(kps, score_threshold)
    frames = valid.sum(axis=1) >= max(2, int(np.ceil(min_valid_frac * 68)))
    if not frames.any():
        return float("nan")
    xy = kps[frames, :, :2].astype(np.float64)
    v = valid[frames][..., None]
    hi = np.where(v, xy, -np.inf).max(axis=1)
    lo = np.where(v, xy, np.inf).min(axis=1)
    return float(np.median((hi - lo).max(axis=1)))


def motion_table(kps: np.ndarray, window: int = WINDOW, *, score_threshold: float | None = SCORE_THRESHOLD,
                 min_valid_frac: float = MIN_VALID_FRAC) -> tuple[np.ndarray, float]:
    """-> (float32 [T-W+1, 4] with columns ``MOTION_COLUMNS``, the clip's face size in px).

    Columns 0-1 are the gated variances in px^2, 2-3 the same divided by face size^2 (NaN where the
    raw value is NaN or the face size could not be measured).
    """
    raw = motion_variances(kps, window, score_threshold=score_threshold, min_valid_frac=min_valid_frac)
    size = face_size(kps, score_threshold=score_threshold, min_valid_frac=min_valid_frac)
    norm = raw.astype(np.float64) / size ** 2 if size > 0 else np.full(raw.shape, np.nan)
    return np.concatenate([raw, norm.astype(np.float32)], axis=1), size
