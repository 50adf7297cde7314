"""Loopy 3.5 motion variances against direct numpy computations on planted trajectories."""
import numpy as np
import pytest

from pipeline.features.motion import NOSE_TIP, UPPER_FACE, WINDOW, motion_variances


def direct(kps: np.ndarray, W: int) -> np.ndarray:
    """The definition written out with loops: var over the window of x plus of y (ddof 0)."""
    rows = []
    for t in range(len(kps) - W + 1):
        win = kps[t:t + W, :, :2].astype(np.float64)
        nose = win[:, NOSE_TIP]
        head = np.var(nose[:, 0]) + np.var(nose[:, 1])
        per_point = []
        for k in UPPER_FACE:
            d = win[:, k] - nose
            per_point.append(np.var(d[:, 0]) + np.var(d[:, 1]))
        rows.append([head, np.mean(per_point)])
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def face(T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(150, 350, size=(68, 2))
    kps = np.empty((T, 68, 3), dtype=np.float32)
    kps[..., :2] = base
    kps[..., 2] = rng.uniform(0.2, 1.0, size=(T, 68))
    return kps


def test_upper_face_set():
    pts = set(UPPER_FACE.tolist())
    assert len(UPPER_FACE) == 37 and len(pts) == 37
    assert NOSE_TIP in pts
    assert not pts & set(range(48, 68)), "mouth must be excluded"
    assert not pts & set(range(3, 14)), "lower jaw must be excluded"
    assert set(range(17, 48)) <= pts  # brows, nose, eyes


def test_random_trajectories_match_direct():
    rng = np.random.default_rng(1)
    kps = face(40)
    kps[..., :2] += rng.normal(0, 2.0, size=(40, 68, 2))
    got = motion_variances(kps)
    assert got.dtype == np.float32 and got.shape == (40 - WINDOW + 1, 2)
    np.testing.assert_allclose(got, direct(kps, WINDOW), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("W", [1, 5, 12, 20])
def test_window_parameter(W):
    rng = np.random.default_rng(W)
    kps = face(25) + np.concatenate([rng.normal(0, 1, (25, 68, 2)), np.zeros((25, 68, 1))], -1).astype(np.float32)
    got = motion_variances(kps, window=W)
    assert got.shape == (25 - W + 1, 2)
    np.testing.assert_allclose(got, direct(kps, W), rtol=1e-5, atol=1e-5)


def test_rigid_translation_is_head_motion_only():
    T = 12
    kps = face(T)
    shift = np.stack([np.arange(T, dtype=np.float32), np.zeros(T, np.float32)], 1)  # nose x: 0..11 px
    kps[..., :2] += shift[:, None, :]
    (head, expr), = motion_variances(kps)
    assert head == pytest.approx((T * T - 1) / 12, rel=1e-6)  # variance of 0..T-1
    assert expr == pytest.approx(0.0, abs=1e-6)


def test_expression_only_moves_relative_points():
    T = 12
    kps = face(T)
    amp = np.sin(np.arange(T))  # brows go up and down, nose still
    kps[:, 17:27, 1] += 3 * amp[:, None].astype(np.float32)
    (head, expr), = motion_variances(kps)
    assert head == pytest.approx(0.0, abs=1e-9)
    assert expr == pytest.approx(10 / 37 * 9 * np.var(amp), rel=1e-5)


def test_mouth_motion_is_ignored():
    kps = face(12)
    kps[:, 48:68, :2] += np.random.default_rng(0).normal(0, 5, (12, 20, 2)).astype(np.float32)
    np.testing.assert_allclose(motion_variances(kps), 0, atol=1e-6)


def test_short_clip_gives_empty_array():
    out = motion_variances(face(WINDOW - 1))
    assert out.shape == (0, 2) and out.dtype == np.float32
    assert motion_variances(face(WINDOW)).shape == (1, 2)


def test_accepts_xy_only_and_rejects_bad_shapes():
    kps = face(13)
    np.testing.assert_array_equal(motion_variances(kps[..., :2]), motion_variances(kps))
    with pytest.raises(ValueError):
        motion_variances(np.zeros((13, 133, 3)))
    with pytest.raises(ValueError):
        motion_variances(kps, window=0)


# ---- schema 2.0: score gating and face-size normalisation (definitions audit item 6) ----------

def _jittered(T=24, seed=3, scale=1.0):
    """A face with head drift and brow motion (every point score 0.9)."""
    rng = np.random.default_rng(seed)
    kps = face(T, seed)
    kps[..., 2] = 0.9
    kps[..., :2] += np.cumsum(rng.normal(0, 0.8, (T, 1, 2)), axis=0).astype(np.float32)  # head drift
    kps[:, 17:27, 1] += 2 * np.sin(np.arange(T))[:, None].astype(np.float32)  # brows
    kps[..., :2] *= scale
    return kps


def test_gating_drops_low_score_keypoints():
    kps = _jittered()
    clean = motion_variances(kps, score_threshold=0.3)
    np.testing.assert_allclose(clean, direct(kps, WINDOW), rtol=1e-5)  # all points valid: the plain definition
    noisy = kps.copy()
    bad = [0, 18, 40]  # three upper-face points jump around with low DWPose scores
    noisy[:, bad, :2] += np.random.default_rng(0).normal(0, 30, (len(kps), len(bad), 2)).astype(np.float32)
    noisy[:, bad, 2] = 0.1
    ungated = motion_variances(noisy)
    gated = motion_variances(noisy, score_threshold=0.3)
    assert (ungated[:, 1] > 10 * clean[:, 1]).all()  # the outliers dominate without gating
    keep = [k for k in UPPER_FACE if k not in bad]
    want = []
    for t in range(len(kps) - WINDOW + 1):
        d = kps[t:t + WINDOW, keep, :2].astype(np.float64) - kps[t:t + WINDOW, None, NOSE_TIP, :2]
        want.append(d.var(axis=0).sum(-1).mean())  # mean over the 34 valid points only
    np.testing.assert_allclose(gated[:, 1], want, rtol=1e-5)
    np.testing.assert_allclose(gated[:, 0], clean[:, 0], rtol=1e-6)  # the nose tip was valid throughout


def test_gated_nose_uses_its_valid_frames_and_needs_half_the_window():
    kps = _jittered()
    kps[5, NOSE_TIP, 2] = 0.0  # one dropped frame: the variance is over the other 11
    kps[5, NOSE_TIP, :2] = -1  # where DWPose puts invisible points
    got = motion_variances(kps, score_threshold=0.3)
    frames = [f for f in range(WINDOW) if f != 5]
    assert got[0, 0] == pytest.approx(kps[frames, NOSE_TIP, :2].astype(np.float64).var(0).sum(), rel=1e-6)
    kps[0:7, NOSE_TIP, 2] = 0.1  # 7 of window 0's 12 frames invalid: fewer than half remain valid
    got = motion_variances(kps, score_threshold=0.3)
    assert np.isnan(got[0]).all()  # no head motion, and no displacement from the nose either
    assert np.isfinite(got[7]).all()  # window 7 (frames 7..18) has every point


def test_window_with_too_few_valid_points_is_nan():
    kps = _jittered()
    kps[:, UPPER_FACE[:19], 2] = 0.05  # 19 of 37 upper-face points invalid: 18 < half remain
    got = motion_variances(kps, score_threshold=0.3)
    assert np.isnan(got[:, 1]).all() and np.isfinite(got[:, 0]).all()
    kps[:, UPPER_FACE[18], 2] = 0.9  # 19 valid: enough
    assert np.isfinite(motion_variances(kps, score_threshold=0.3)[:, 1]).all()


def test_normalised_variances_are_invariant_to_face_scale():
    from pipeline.features.motion import MOTION_COLUMNS, face_size, motion_table

    small = _jittered(scale=1.0)
    big = small.copy()
    big[..., :2] = (small[..., :2] - 256) * 2 + 256  # the same motion with the face twice as large
    t1, s1 = motion_table(small)
    t2, s2 = motion_table(big)
    assert t1.shape == (len(small) - WINDOW + 1, len(MOTION_COLUMNS)) and t1.dtype == np.float32
    assert s2 == pytest.approx(2 * s1, rel=1e-6)
    np.testing.assert_allclose(t2[:, :2], 4 * t1[:, :2], rtol=1e-5)  # raw px^2 scales with size^2
    np.testing.assert_allclose(t2[:, 2:], t1[:, 2:], rtol=1e-5)  # normalised: unchanged
    np.testing.assert_allclose(t1[:, 2:], t1[:, :2] / s1 ** 2, rtol=1e-5)
    # face size = the median side of the valid keypoints' box; a low-score stray point is not in it
    stray = small.copy()
    stray[:, 60, :2], stray[:, 60, 2] = 500, 0.05
    assert face_size(stray) == pytest.approx(_box_side(small, exclude=60), rel=1e-6)


def _box_side(kps, exclude):
    keep = [k for k in range(68) if k != exclude]
    xy = kps[:, keep, :2].astype(np.float64)
    return float(np.median((xy.max(1) - xy.min(1)).max(1)))


def test_face_size_unmeasurable_gives_nan_normalised_values():
    from pipeline.features.motion import motion_table

    kps = _jittered()
    kps[..., 2] = 0.1  # nothing valid
    table, size = motion_table(kps)
    assert np.isnan(size) and np.isnan(table).all()
