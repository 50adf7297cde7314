"""`smoke` profile face backend: MediaPipe's pretrained models shipped in the mediapipe wheel.

Detection: BlazeFace full-range (``model_selection=1``, faces up to ~5 m from the camera), so
small faces in full-body shots are found; when it finds nothing, the short-range model
(``model_selection=0``, faces within ~2 m) runs too: the full-range model misses some large,
turned close-up faces that the short-range one finds (``ranges="short"`` uses only the latter,
as the scoring stage does on the 512 crops where the face fills half the frame). Landmarks (``landmarks=True``,
the scoring stage; the detect stage asks for boxes only): FaceMesh (478 points with iris
refinement) run on a square crop around every detection, which keeps small faces at a
resolution FaceMesh handles and maps each landmark set to exactly one detection.
``landmarks_on_box=True`` (the scoring stage's ``score.landmarks_on_box``) skips the FaceMesh
solution's own second face detection on that crop: its landmark graph (``FaceLandmarkCpu``) is
given the region MediaPipe's face-mesh graph derives from a detection, here BlazeFace's detection of
the frame. About 1.2 ms less a 512 frame (4.40 -> 3.17 ms with BlazeFace); the landmarks move by ~0.7 px (docs/benchmarks.md, issue 13).
"""
from __future__ import annotations

import numpy as np

from ..crop import padded_crop  # noqa: F401 - the crop FaceMesh sees (tests import it from here)
from .base import Face

# MediaPipe's FaceLandmarkCpu subgraph (registered in the mediapipe wheel): the 478-point landmark
# model with attention on a given region, without face_landmark_front_cpu's face detector.
_LANDMARK_ON_ROI_GRAPH = """
input_stream: "IMAGE:image"
input_stream: "ROI:roi"
output_stream: "LANDMARKS:landmarks"
node {
  calculator: "FaceLandmarkCpu"
  input_stream: "IMAGE:image"
  input_stream: "ROI:roi"
  input_side_packet: "WITH_ATTENTION:with_attention"
  output_stream: "LANDMARKS:landmarks"
}
"""


def detection_roi(box: np.ndarray, right_eye: tuple[float, float], left_eye: tuple[float, float]) -> tuple:
    """(x_center, y_center, side, rotation) in pixels/radians: the region face_landmark_front_cpu derives
    from a BlazeFace detection (face_detection_front_detection_to_roi: rotation that levels the eye
    keypoints 0 -> 1, box scaled 1.5x, square on its long side)."""
    (x0, y0), (x1, y1) = right_eye, left_eye
    rotation = -np.arctan2(-(y1 - y0), x1 - x0)
    rotation = rotation - 2 * np.pi * np.floor((rotation + np.pi) / (2 * np.pi))
    side = max(float(box[2] - box[0]), float(box[3] - box[1])) * 1.5
    return float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2, side, float(rotation)

# FaceMesh indices (mediapipe/modules/face_geometry canonical model) for SCRFD-style 5 points,
# as seen in the image: left eye (iris centre 468 with refinement), right eye (473), nose tip (1),
# left mouth corner (61), right mouth corner (291).
_KPS5_FROM_MESH = (468, 473, 1, 61, 291)


# One NormalizedLandmark of a NormalizedLandmarkList on the wire when only x, y, z are set (FaceMesh's
# output): field 1 (length-delimited, 15 bytes) holding fields 1-3 as little-endian fixed32 floats.
_LANDMARK_WIRE = np.dtype([("tag", "u1"), ("size", "u1"), ("x_tag", "u1"), ("x", "<f4"), ("y_tag", "u1"),
                           ("y", "<f4"), ("z_tag", "u1"), ("z", "<f4")])
_LANDMARK_WIRE_TAGS = {"tag": 0x0A, "size": 15, "x_tag": 0x0D, "y_tag": 0x15, "z_tag": 0x1D}


def landmark_xyz(landmark_list) -> np.ndarray:
    """[N, 3] float64 (x, y, z) of a mediapipe NormalizedLandmarkList: the floats ``p.x, p.y, p.z`` give,
    read from the message's wire bytes in one pass (a Python loop of 478 x 3 attribute reads cost
    ~0.4 ms a frame; docs/benchmarks.md, issue 13); any other layout (visibility or presence set) is read
    point by point."""
    n = len(landmark_list.landmark)
    data = landmark_list.SerializeToString()
    if n and len(data) == n * _LANDMARK_WIRE.itemsize:
        wire = np.frombuffer(data, _LANDMARK_WIRE)
        if all((wire[field] == value).all() for field, value in _LANDMARK_WIRE_TAGS.items()):
            return np.stack([wire["x"], wire["y"], wire["z"]], axis=1).astype(np.float64)
    return np.array([[p.x, p.y, p.z] for p in landmark_list.landmark], np.float64).reshape(n, 3)


def landmark_pixels(landmark_list, width: int, height: int, x0: int | None = None,
                    y0: int | None = None) -> np.ndarray:
    """[N, 3] float32 ``(x * width [+ x0], y * height [+ y0], z * width)`` of normalised landmarks,
    computed in float64 as the per-point expressions were."""
    xyz = landmark_xyz(landmark_list)
    pts = np.empty(xyz.shape, np.float32)
    pts[:, 0] = xyz[:, 0] * width if x0 is None else xyz[:, 0] * width + x0
    pts[:, 1] = xyz[:, 1] * height if y0 is None else xyz[:, 1] * height + y0
    pts[:, 2] = xyz[:, 2] * width
    return pts


class MediaPipeFaceDetector:
    def __init__(self, min_confidence: float = 0.5, landmarks: bool = True, crop_expand: float = 1.7,
                 ranges: str = "full+short", landmarks_on_box: bool = False):
        import mediapipe as mp

        if ranges not in ("full+short", "short"):
            raise ValueError(f"ranges must be 'full+short' or 'short', got {ranges!r}")
        fd = mp.solutions.face_detection
        self.name = f"mediapipe-{mp.__version__}:blazeface-{ranges.replace('+', '-')}"
        self._detectors = [fd.FaceDetection(model_selection=0 if ranges == "short" else 1,
                                            min_detection_confidence=min_confidence)]
        if ranges == "full+short":
            self._detectors.append(fd.FaceDetection(model_selection=0, min_detection_confidence=min_confidence))
        self._mesh = self._landmark_graph = None
        if landmarks and landmarks_on_box:
            from mediapipe.python.solution_base import SolutionBase

            self._landmark_graph = SolutionBase(graph_config=_LANDMARK_ON_ROI_GRAPH,
                                                side_inputs={"with_attention": True}, outputs=["landmarks"])
            self.name += "+facemesh-478-on-box"
        elif landmarks:
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.3)
            self.name += "+facemesh-478"
        self.crop_expand = crop_expand

    def detect(self, image_rgb: np.ndarray, landmarks: bool = True) -> list[Face]:
        """Faces, highest score first; ``landmarks=False`` skips the landmark model on this image."""
        h, w = image_rgb.shape[:2]
        image_rgb = np.ascontiguousarray(image_rgb)
        detections = []
        for detector in self._detectors:
            detections = detector.process(image_rgb).detections or []
            if detections:
                break
        faces: list[Face] = []
        for det in detections:
            rb = det.location_data.relative_bounding_box
            x0, y0 = rb.xmin * w, rb.ymin * h
            box = np.array([x0, y0, x0 + rb.width * w, y0 + rb.height * h], dtype=np.float32)
            face = Face(box=box, score=float(det.score[0]))
            if landmarks and self._landmark_graph is not None:
                kp = det.location_data.relative_keypoints
                self._add_landmarks_on_box(image_rgb, face, (kp[0].x * w, kp[0].y * h), (kp[1].x * w, kp[1].y * h))
            elif landmarks and self._mesh is not None:
                self._add_landmarks(image_rgb, face)
            faces.append(face)
        faces.sort(key=lambda f: -f.score)
        return faces

    def _add_landmarks(self, image: np.ndarray, face: Face) -> None:
        h, w = image.shape[:2]
        cx, cy = face.center
        side = max(face.width, face.height) * self.crop_expand
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        x1, y1 = int(round(cx + side / 2)), int(round(cy + side / 2))
        # Pad instead of clipping so the face stays centred in the crop FaceMesh sees.
        crop = padded_crop(image, x0, y0, x1, y1)
        if crop.shape[0] < 16 or crop.shape[1] < 16:
            return
        res = self._mesh.process(crop)
        if not res.multi_face_landmarks:
            return
        ch, cw = crop.shape[:2]
        pts = landmark_pixels(res.multi_face_landmarks[0], cw, ch, x0, y0)
        face.landmarks = pts
        face.kps5 = pts[list(_KPS5_FROM_MESH), :2].copy()

    def _add_landmarks_on_box(self, image: np.ndarray, face: Face, right_eye, left_eye) -> None:
        from mediapipe.framework.formats import rect_pb2

        h, w = image.shape[:2]
        cx, cy, side, rotation = detection_roi(face.box, right_eye, left_eye)
        roi = rect_pb2.NormalizedRect(x_center=cx / w, y_center=cy / h, width=side / w, height=side / h,
                                      rotation=rotation)
        res = self._landmark_graph.process({"image": image, "roi": roi})
        if res.landmarks is None:  # the model's face presence score was below its threshold
            return
        pts = landmark_pixels(res.landmarks, w, h)
        face.landmarks = pts
        face.kps5 = pts[list(_KPS5_FROM_MESH), :2].copy()
