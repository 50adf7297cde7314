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
  * clips shorter than W frames have no complete window: the result is an empty [0, 2] array
    (the trainer cannot draw a 12-frame window from them either).
  * scores are not used: the tracker upstream guarantees one visible face in every kept frame.
"""
from __future__ import annotations

import numpy as np

WINDOW = 12  # Loopy 3.5: the 12 frames of a training clip
NOSE_TIP = 30  # iBUG-68: nose bridge 27-30 ends at the tip, 30

# The upper half of the face in iBUG-68 order: every point above the mouth line.
#   jaw contour 0-2 and 14-16 (the temples and cheeks at eye/nose height; 3 and 13 are at the mouth)
#   eyebrows 17-26 (10), nose 27-35 (9), eyes 36-47 (12)
# 6 + 10 + 9 + 12 = 37, the paper's count; the mouth (48-67) and lower jaw (3-13) are excluded,
# matching the paper's "excluding the mouth area" for its Exp metric. The nose tip is one of the 37;
# its displacement from itself is always 0, and it is kept so the set is exactly the paper's 37.
UPPER_FACE = np.array([0, 1, 2, 14, 15, 16, *range(17, 27), *range(27, 36), *range(36, 48)])
assert len(UPPER_FACE) == 37 and len(set(UPPER_FACE.tolist())) == 37


def _window_variance(points: np.ndarray, window: int) -> np.ndarray:
    """[T, ..., 2] -> [T-W+1, ...]: per-window var(x) + var(y) (ddof 0)."""
    win = np.lib.stride_tricks.sliding_window_view(points, window, axis=0)  # [T-W+1, ..., 2, W]
    return win.var(axis=-1).sum(axis=-1)


def motion_variances(kps: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Face keypoints [T, 68, 2 or 3] -> float32 [T-W+1, 2]: (head-motion var, expression var)."""
    kps = np.asarray(kps)
    if kps.ndim != 3 or kps.shape[1] != 68 or kps.shape[2] < 2:
        raise ValueError(f"kps must be [T, 68, 2|3], got {kps.shape}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    T = kps.shape[0]
    if T < window:
        return np.zeros((0, 2), dtype=np.float32)
    xy = kps[..., :2].astype(np.float64)
    nose = xy[:, NOSE_TIP]  # [T, 2]
    rel = xy[:, UPPER_FACE] - nose[:, None]  # [T, 37, 2]
    head = _window_variance(nose, window)  # [T-W+1]
    expr = _window_variance(rel, window).mean(axis=1)  # [T-W+1]
    return np.stack([head, expr], axis=1).astype(np.float32)
