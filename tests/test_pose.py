"""Head pose (pipeline/scoring/pose.py): insightface's 68-point fit, its sign conventions, the clip
statistics, and FaceMesh landmarks through the FaceMesh -> iBUG-68 mapping on real faces."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import real_path
from pipeline.scoring import pose

# Faces fill about half of the 512 crop (crop side = 2 x face box): the mean shape spans 1.25 units
# from jaw to jaw, so 180 px per unit is a 225 px wide face.
FACE_SCALE = 180.0
# insightface's mean shape is not mirror-symmetric: its mirror image reads yaw +2.1, roll -1.6 degrees
MIRROR_TOL = 2.5
GRID = list(itertools.product([-60, -45, -30, -15, 0, 15, 30, 45, 60], [-30, -15, 0, 15, 30], [-30, 0, 30]))


def _posed(yaw, pitch, roll, noise_px=0.0, rng=None):
    lm = pose.meanshape_posed(yaw, pitch, roll, scale=FACE_SCALE, offset=(256.0, 250.0))
    if noise_px:
        lm[:, :2] += rng.normal(0, noise_px, (68, 2))
    return lm


def _ibug_mirror() -> list[int]:
    """iBUG-68 index of each point's mirror image (left and right swap)."""
    pairs = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
             + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
             + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])
    out = list(range(68))
    for a, b in pairs:
        out[a], out[b] = b, a
    return out


def _angles(lm):
    p = pose.pose_from_landmarks(lm)
    return [p["yaw"], p["pitch"], p["roll"]]


def test_meanshape_is_a_plain_float32_array():
    m = pose.meanshape_68()
    assert m.shape == (68, 3) and m.dtype == np.float32 and not m.flags.writeable
    # insightface's axes: x image right (jaw 0 left of jaw 16), y down (chin below the brows), z towards the
    # camera (nose tip in front of the jaw corners)
    assert m[0, 0] < 0 < m[16, 0] and m[8, 1] > m[19, 1] and m[30, 2] > m[0, 2]


def test_rotated_meanshape_comes_back_within_1_degree_without_noise():
    worst = max(np.abs(np.subtract(_angles(_posed(*a)), a)).max() for a in GRID)
    assert worst < 1.0, worst  # the fit is exact for a weak-perspective view of the mean shape (~1e-12)


def test_rotated_meanshape_with_2px_noise_within_2_degrees():
    rng = np.random.default_rng(0)
    errors = np.array([np.subtract(_angles(_posed(*a, noise_px=2.0, rng=rng)), a) for a in GRID for _ in range(3)])
    assert np.abs(errors).max() < 2.0, np.abs(errors).max(0)
    assert np.abs(errors).std(0).max() < 0.5  # scatter well under the filters' resolution


def test_insightface_mapping_and_signs():
    m = pose.meanshape_68().astype(np.float64)
    for yaw, pitch, roll in [(30, 0, 0), (0, 20, 0), (0, 0, 25), (45, -20, 30), (-60, 15, -10)]:
        p = pose.pose_from_landmarks(_posed(yaw, pitch, roll))
        assert p["insightface"] == pytest.approx((pitch, yaw, -roll), abs=1e-6)  # documented mapping
        assert p["scale"] == pytest.approx(FACE_SCALE)
    # yaw > 0: the face turns towards image right, so the nose tip moves right of the eyes' midpoint
    turned = pose.meanshape_posed(30, 0, 0)
    assert turned[30, 0] > (turned[39, 0] + turned[42, 0]) / 2
    # pitch > 0: chin up, so the nose tip rises towards the eye corners (image y points down)
    up = pose.meanshape_posed(0, 20, 0)
    assert up[30, 1] - up[[36, 45], 1].mean() < m[30, 1] - m[[36, 45], 1].mean()
    # roll > 0: counter-clockwise on screen, as cv2.getRotationMatrix2D rotates an image by a positive angle
    import cv2

    frontal = _posed(0, 0, 0)[:, :2]
    A = cv2.getRotationMatrix2D((256.0, 250.0), 25.0, 1.0)
    assert _angles(frontal @ A[:, :2].T + A[:, 2]) == pytest.approx([0, 0, 25], abs=1e-6)
    # mirroring flips yaw and roll, not pitch (iBUG points swap sides under a mirror), up to the mean
    # shape's own asymmetry
    lm = _posed(20, 10, 15)
    mirrored = lm[_ibug_mirror()] * [-1, 1, 1] + [512, 0, 0]
    assert _angles(mirrored) == pytest.approx([-20, 10, -15], abs=MIRROR_TOL)


def test_euler_round_trip():
    for angles in [(0, 0, 0), (30, -20, 45), (-80, 35, -60), (10, 5, 170)]:
        R = pose.rotation_from_euler(*angles)
        assert np.allclose(R @ R.T, np.eye(3)) and np.linalg.det(R) == pytest.approx(1)
        assert pose.euler_from_rotation(R) == pytest.approx(angles, abs=1e-9)


def test_facemesh_mapping_table():
    table = pose.FACEMESH_TO_IBUG68
    assert len(table) == 68 and all(0 <= i < 468 for row in table for i in row)
    lm = np.arange(478 * 2, dtype=np.float64).reshape(478, 2)
    out = pose.to_ibug68(lm)
    assert out.shape == (68, 2)
    assert np.array_equal(out[8], lm[152]) and np.array_equal(out[3], (lm[132] + lm[58]) / 2)
    assert np.array_equal(out[62], lm[13]) and np.array_equal(out[66], lm[14])  # inner-lip midpoints
    with pytest.raises(ValueError, match="landmark count 10"):
        pose.to_ibug68(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="68 landmarks"):
        pose.insightface_angles(np.zeros((68,)))


def test_pose_stats():
    a = np.array([[10, 0, -5], [20, 2, -5], [np.nan, np.nan, np.nan], [-10, 4, 5]], float)
    s = pose.pose_stats(a, fps=25)
    assert s["pose_valid_fraction"] == 0.75
    assert s["yaw_mean"] == pytest.approx(20 / 3) and s["yaw_max_abs"] == 20 and s["yaw_range"] == 30
    assert s["roll_range"] == 10 and s["pitch_max_abs"] == 4
    assert s["yaw_abs_p95"] == pytest.approx(np.percentile([10, 20, 10], 95))
    assert s["rotation_speed_dps"] == pytest.approx(np.hypot(10, 2) * 25)  # only the valid adjacent pair
    assert s["orientation_score_25fps_min"] < s["orientation_score_25fps_mean"] < 100
    assert s["rotation_score_25fps"] == pytest.approx(100 - np.hypot(10, 2))
    assert np.isnan(pose.pose_sequence(np.full((2, 478, 2), np.nan))).all()


def test_p95_ignores_a_few_outlier_frames_the_max_keeps():
    yaw = np.full(100, 10.0)
    yaw[[20, 60, 61]] = 75.0  # three mis-fitted frames of a 4 s clip
    s = pose.pose_stats(np.stack([yaw, np.zeros(100), np.zeros(100)], 1))
    assert s["yaw_max_abs"] == 75 and s["yaw_abs_p95"] == pytest.approx(10.0)


# ---------------------------------------------------------------- real faces through FaceMesh


@pytest.fixture(scope="module")
def face_mesh():
    mp = pytest.importorskip("mediapipe")

    def run(image):
        with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as fm:
            h, w = image.shape[:2]
            r = fm.process(np.ascontiguousarray(image))
            assert r.multi_face_landmarks, "FaceMesh found no face"
            return np.array([(p.x * w, p.y * h) for p in r.multi_face_landmarks[0].landmark])

    return run


@pytest.mark.realdata  # a real face (skimage's astronaut), real landmark model
def test_astronaut_rotation_and_mirror(face_mesh):
    import cv2
    import skimage.data

    img = skimage.data.astronaut()
    lm = face_mesh(img)
    base = pose.pose_from_landmarks(lm)
    assert abs(base["yaw"]) < 8 and abs(base["pitch"]) < 12 and abs(base["roll"]) < 8  # she faces the camera
    centre = tuple(float(v) for v in lm.mean(0))
    M = cv2.getRotationMatrix2D(centre, 60, 1.0)  # +60 = counter-clockwise on screen
    rot = pose.pose_from_landmarks(face_mesh(cv2.warpAffine(img, M, (512, 512), borderMode=cv2.BORDER_REFLECT)))
    assert rot["roll"] - base["roll"] == pytest.approx(60, abs=4)
    assert rot["yaw"] == pytest.approx(base["yaw"], abs=4) and rot["pitch"] == pytest.approx(base["pitch"], abs=4)
    mirrored = pose.pose_from_landmarks(face_mesh(img[:, ::-1]))
    assert mirrored["yaw"] == pytest.approx(-base["yaw"], abs=3)
    assert mirrored["roll"] == pytest.approx(-base["roll"], abs=3)
    assert mirrored["pitch"] == pytest.approx(base["pitch"], abs=3)


@pytest.mark.realdata
def test_facemesh_through_the_mapping_fits_the_mean_shape(face_mesh):
    """The FaceMesh -> iBUG-68 table is sound: on real faces the mapped points sit on insightface's mean shape
    (residual a few % of the face width), far closer than the same points in a wrong order."""
    import av
    import skimage.data

    images = [skimage.data.astronaut()]
    for name in ("wda_aoc_000.mp4", "edtalk_obama.mp4", "retalking_face2.mp4", "liveportrait_s18_music_static.mp4"):
        with av.open(str(real_path(name))) as c:
            images.append(next(c.decode(video=0)).to_ndarray(format="rgb24"))
    rng = np.random.default_rng(0)
    for img in images:
        lm = face_mesh(img)
        fit = pose.pose_from_landmarks(lm)
        assert fit["residual"] < 0.06, fit["residual"]
        scrambled = pose.to_ibug68(lm)[rng.permutation(68)]
        assert pose.pose_from_landmarks(scrambled)["residual"] > 3 * fit["residual"]
    assert pose.pose_from_landmarks(_posed(30, 10, 5))["residual"] < 1e-9


@pytest.mark.realdata
def test_real_turned_face_mirror_flips_yaw(face_mesh):
    import av

    with av.open(str(real_path("liveportrait_s18_music_static.mp4"))) as c:  # woman turned to image right
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    yaw = pose.pose_from_landmarks(face_mesh(frame))["yaw"]
    yaw_m = pose.pose_from_landmarks(face_mesh(np.ascontiguousarray(frame[:, ::-1])))["yaw"]
    assert yaw > 12 and yaw_m < -12
    assert yaw_m == pytest.approx(-yaw, abs=4)


def test_facemesh_mapping_is_the_mean_of_each_group():
    """to_ibug68 averages each iBUG point's FaceMesh points without a Python loop (issue 13): the
    same float64 values as np.mean over each group."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        lm = (rng.random((478, 3)) * 512).astype(np.float32)
        ref = np.stack([np.asarray(lm, np.float64)[list(idx)].mean(0) for idx in pose.FACEMESH_TO_IBUG68])
        np.testing.assert_array_equal(pose.to_ibug68(lm), ref)
