"""Head pose (yaw, pitch, roll in degrees) from face landmarks, and per-clip pose statistics.

Two estimators, one convention:
- ``pose_from_2d_landmarks``: perspective PnP (``cv2.solvePnP``, SQPnP + LM refinement) of a
  generic 3-D face against 2-D landmarks, camera focal length = image width, principal point
  at the image centre, no distortion (the usual uncalibrated-camera assumption, e.g. the
  learnopencv head-pose tutorial). Works with mediapipe FaceMesh (468/478 points) and iBUG-68.
- ``pose_from_3d_landmarks``: insightface's way for its 1k3d68 model
  (python-package/insightface/model_zoo/landmark.py + utils/transform.py): a least-squares affine
  (weak perspective) map from a 3-D mean shape to the landmarks' image x, y, rows normalised,
  third row = cross product. We use the canonical points below as the mean shape and project
  the result onto the nearest rotation. z is not needed, so the z convention of the landmark
  model does not matter; 3-D landmark models predict occluded points, so it holds to full profile.

The generic 3-D face is the mediapipe canonical face model
(mediapipe/modules/face_geometry/data/canonical_face_model.obj; cm, x to the subject's left,
y up, z out of the face) at ten stable points: nose tip, nose bridge, forehead, chin, the four
eye corners and the two mouth corners. iBUG-68 points are mapped to the same vertices.

Conventions (image as displayed, camera looking at the subject):
- yaw   > 0: the face turns towards image right (the subject's left in unmirrored video);
- pitch > 0: the face tilts up (chin up);
- roll  > 0: the face rotates counter-clockwise in the image (as cv2.getRotationMatrix2D and
  skimage.transform.rotate rotate an image for a positive angle).
Mirroring the image flips the signs of yaw and roll, not pitch. A frontal face is (0, 0, 0).
Internally the rotation R maps the model (OpenCV axes: x right, y down, z away from the camera)
into the camera and is decomposed as R = Rz(-roll) @ Ry(-yaw) @ Rx(-pitch) (the order of
insightface's ``matrix2angle``).
"""
from __future__ import annotations

import numpy as np

# name: (mediapipe index, iBUG-68 index, canonical x, y, z in cm)
CANONICAL_POINTS = {
    "nose_tip": (1, 30, 0.0, -1.126865, 7.475604),
    "nose_bridge": (168, 27, 0.0, 3.271027, 5.236015),
    "forehead": (10, None, 0.0, 8.261778, 4.481535),
    "chin": (152, 8, 0.0, -9.403378, 4.264492),
    "right_eye_outer": (33, 36, -4.445859, 2.663991, 3.173422),
    "right_eye_inner": (133, 39, -1.856432, 2.585245, 3.757904),
    "left_eye_inner": (362, 42, 1.856432, 2.585245, 3.757904),
    "left_eye_outer": (263, 45, 4.445859, 2.663991, 3.173422),
    "mouth_right": (61, 48, -2.456206, -4.342621, 4.283884),
    "mouth_left": (291, 54, 2.456206, -4.342621, 4.283884),
}


def scheme_of(landmarks: np.ndarray) -> str:
    """'mediapipe' for 468/478 points, 'ibug68' for 68."""
    n = len(landmarks)
    if n in (468, 478):
        return "mediapipe"
    if n == 68:
        return "ibug68"
    raise ValueError(f"unsupported landmark count {n} (expected 468, 478 or 68)")


def model_points(scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(landmark indices [K], 3-D model points [K, 3] in OpenCV axes: x right, y down, z away)."""
    col = {"mediapipe": 0, "ibug68": 1}[scheme]
    rows = [(v[col], v[2:]) for v in CANONICAL_POINTS.values() if v[col] is not None]
    idx = np.array([r[0] for r in rows])
    pts = np.array([r[1] for r in rows], np.float64) * np.array([1.0, -1.0, -1.0])
    return idx, pts


def rotation_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Model-to-camera rotation (OpenCV axes) for angles in degrees in this module's convention."""
    y, p, r = np.deg2rad([-yaw, -pitch, -roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_from_rotation(R: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees; inverse of ``rotation_from_euler`` (as insightface matrix2angle)."""
    sy = np.hypot(R[0, 0], R[1, 0])
    if sy > 1e-6:
        x, y, z = np.arctan2(R[2, 1], R[2, 2]), np.arctan2(-R[2, 0], sy), np.arctan2(R[1, 0], R[0, 0])
    else:  # gimbal lock at |yaw| = 90
        x, y, z = np.arctan2(-R[1, 2], R[1, 1]), np.arctan2(-R[2, 0], sy), 0.0
    return float(-np.rad2deg(y)), float(-np.rad2deg(x)), float(-np.rad2deg(z))


def _ray_rotation(t: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the optical axis (0, 0, 1) onto the direction of ``t``."""
    import cv2

    d = t / np.linalg.norm(t)
    axis = np.cross([0.0, 0.0, 1.0], d)
    s = np.linalg.norm(axis)
    if s < 1e-12:
        return np.eye(3)
    angle = np.arctan2(s, d[2])
    return cv2.Rodrigues(axis / s * angle)[0]


def pose_from_2d_landmarks(landmarks: np.ndarray, image_size: tuple[int, int],
                           scheme: str | None = None, relative_to_ray: bool = True) -> dict:
    """Head pose of one face from pixel landmarks [N, 2 or 3] (only x, y are used).

    ``image_size`` = (width, height). With ``relative_to_ray`` (default) the rotation is taken
    relative to the line of sight through the head rather than the optical axis, so a face that
    looks into the lens reads (0, 0, 0) wherever it sits in the frame (an off-centre face seen
    with f = image width is otherwise tilted by up to ~27 degrees), matching the
    weak-perspective estimate of ``pose_from_3d_landmarks``. Returns yaw/pitch/roll (degrees), the rotation and
    translation (cm, model units), and the RMS reprojection error relative to the diagonal of
    the fitted points' box (``reproj_err``, a fit-quality number: large values mean the landmarks are not a face
    in this pose).
    """
    import cv2

    lm = np.asarray(landmarks, np.float64)
    scheme = scheme or scheme_of(lm)
    idx, obj = model_points(scheme)
    img = lm[idx, :2]
    w, h = image_size
    K = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float64)
    ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return {"yaw": np.nan, "pitch": np.nan, "roll": np.nan, "reproj_err": np.nan}
    rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, None, rvec, tvec)
    R, _ = cv2.Rodrigues(rvec)
    if relative_to_ray:
        R = _ray_rotation(tvec.reshape(3)).T @ R
    proj, _ = cv2.projectPoints(obj, rvec, tvec, K, None)
    size = max(float(np.linalg.norm(img.max(0) - img.min(0))), 1e-6)  # diagonal of the points' box
    err = float(np.sqrt(np.mean(np.sum((proj[:, 0] - img) ** 2, 1))) / size)
    yaw, pitch, roll = euler_from_rotation(R)
    return {"yaw": yaw, "pitch": pitch, "roll": roll, "reproj_err": err,
            "rotation": R, "translation": tvec.reshape(3)}


def pose_from_3d_landmarks(landmarks: np.ndarray) -> dict:
    """Head pose from 68 iBUG-order landmarks [68, 2 or 3] (insightface 1k3d68 ``landmark_3d_68``).

    Weak-perspective fit as insightface (estimate_affine_matrix_3d23d + P2sRt), then the
    nearest rotation (SVD). Valid up to full profile.
    """
    lm = np.asarray(landmarks, np.float64)
    if len(lm) != 68:
        raise ValueError(f"expected 68 landmarks, got {len(lm)}")
    idx, obj = model_points("ibug68")
    X = np.hstack([obj, np.ones((len(obj), 1))])
    P = np.linalg.lstsq(X, lm[idx, :2], rcond=None)[0].T  # [2, 4]: image x, y = P @ [X, 1]
    r1, r2 = P[0, :3], P[1, :3]
    s = (np.linalg.norm(r1) + np.linalg.norm(r2)) / 2
    r1, r2 = r1 / np.linalg.norm(r1), r2 / np.linalg.norm(r2)
    u, _, vt = np.linalg.svd(np.stack([r1, r2, np.cross(r1, r2)]))
    R = u @ vt
    yaw, pitch, roll = euler_from_rotation(R)
    return {"yaw": yaw, "pitch": pitch, "roll": roll, "scale": float(s), "rotation": R}


def pose_sequence(landmarks: np.ndarray, image_size: tuple[int, int] | None = None,
                  method: str = "2d") -> np.ndarray:
    """[T, 3] (yaw, pitch, roll) for landmarks [T, N, 2|3]; frames whose landmarks are NaN give NaN.

    ``method`` '2d' = PnP (needs ``image_size``), '3d' = insightface-style weak perspective.
    """
    out = np.full((len(landmarks), 3), np.nan)
    for t, lm in enumerate(landmarks):
        if lm is None or not np.all(np.isfinite(np.asarray(lm)[..., :2])):
            continue
        p = pose_from_2d_landmarks(lm, image_size) if method == "2d" else pose_from_3d_landmarks(lm)
        out[t] = p["yaw"], p["pitch"], p["roll"]
    return out


def pose_stats(angles: np.ndarray, fps: float = 25.0) -> dict:
    """Clip statistics of [T, 3] (yaw, pitch, roll): mean, max |angle|, range (max - min) per
    axis, the mean frame-to-frame rotation speed sqrt(dy^2 + dp^2 + dr^2) in degrees/s, and
    TalkVid's orientation and rotation scores (0..100). NaN frames are ignored.
    """
    a = np.asarray(angles, np.float64).reshape(-1, 3)
    ok = np.all(np.isfinite(a), 1)
    out: dict = {"pose_valid_fraction": float(ok.mean()) if len(a) else 0.0}
    for j, name in enumerate(("yaw", "pitch", "roll")):
        v = a[ok, j]
        out[f"{name}_mean"] = float(v.mean()) if v.size else np.nan
        out[f"{name}_max_abs"] = float(np.abs(v).max()) if v.size else np.nan
        out[f"{name}_range"] = float(v.max() - v.min()) if v.size else np.nan
    d = np.diff(a, axis=0)
    d = d[np.all(np.isfinite(d), 1)]
    step = np.linalg.norm(d, axis=1)  # degrees between adjacent frames
    out["rotation_speed_dps"] = float(step.mean() * fps) if len(d) else 0.0
    # TalkVid head filter (data_pipeline head_detail_filtering README): orientation score per
    # frame = 100 - ||(|pitch|, |yaw|, |roll|) / 180 * 100||, keep mean >= 70 and min >= 30;
    # rotation score = 100 - mean per-frame change, keep >= 70 (their min rule needs windows).
    orient = 100 - np.linalg.norm(np.abs(a[ok]) / 180 * 100, axis=1)
    out["orientation_score_mean"] = float(orient.mean()) if orient.size else np.nan
    out["orientation_score_min"] = float(orient.min()) if orient.size else np.nan
    out["rotation_score"] = float(100 - step.mean()) if len(d) else 100.0
    return out
