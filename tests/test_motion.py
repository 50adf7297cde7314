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
