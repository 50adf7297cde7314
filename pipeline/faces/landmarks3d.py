"""insightface 3-D 68-point landmarks + head pose (``full`` profile): ``1k3d68.onnx`` from ``buffalo_l``,
run with onnxruntime.

Follows ``python-package/insightface/model_zoo/landmark.py`` (class ``Landmark``) of deepinsight/insightface
with ``utils/face_align.py`` (``transform``, ``trans_points3d``) and ``utils/transform.py``
(``estimate_affine_matrix_3d23d``, ``P2sRt``, ``matrix2angle``), so that the points equal
``face.landmark_3d_68`` of ``insightface.app.FaceAnalysis`` for the same box:

* ``__init__``: the model normalises its input itself when one of its first 8 graph nodes is *named*
  ``Sub*``/``_minus*`` and one ``Mul*``/``_mul*`` (or a ``bn_data`` node is among the first 3); then
  mean 0, std 1 (raw 0..255 pixels; what insightface logs for 1k3d68: ``['None', 3, 192, 192] 0.0 1.0``),
  else mean 127.5, std 128. The input size is the input's (W, H); an output 3309 wide means 68 points
  of dimension 3 (the last 68*3 values; the rest is the model's other regression targets).
* ``get``: centre = box centre, ``scale = input_size / (max(w, h) * 1.5)``, a similarity warp (rotation 0)
  of the image into an ``input_size`` square (``cv2.warpAffine``, bilinear, black border),
  ``cv2.dnn.blobFromImage(crop, 1/std, size, (mean,)*3, swapRB=True)`` on insightface's BGR image, i.e. the
  network sees RGB: our input is already RGB, so no channel swap here. Output decode:
  ``pred[:, :2] += 1; pred[:, :2] *= input_size // 2; pred[:, 2] *= input_size // 2`` (crop pixels, z in the
  same pixel units), then ``trans_points3d`` with the inverse warp: x, y by the inverse affine, z times its
  scale (= 1 / scale), giving image pixels.

Head pose: insightface fits a least-squares affine map from its mean shape (``meanshape_68.pkl``) to the 68
points, takes rows 1-2 as the rotation (``P2sRt``) and decomposes it with ``matrix2angle``.
``pose_from_landmarks3d`` does exactly that through ``pipeline.scoring.pose.pose_from_landmarks`` (one
implementation in the project) with the same mean shape, stored as ``pipeline/scoring/meanshape_68.npy``
(the pickle is never loaded). tests/test_insightface_judge.py runs insightface's own ``Landmark`` class on the
same ONNX file, image and box and finds the same 68 x 3 points and pose.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .base import FETCH_HINT, insightface_model_path, open_onnx

log = logging.getLogger(__name__)

MODEL_FILE = "1k3d68.onnx"

# insightface model_zoo/landmark.py Landmark.__init__: output width of the 3-D 68-point model
OUTPUT_WIDTH_3D68 = 3309
NUM_POINTS = 68
# Landmark.__init__ defaults when the graph does not normalise its input itself
DEFAULT_MEAN = 127.5
DEFAULT_STD = 128.0
# Landmark.get: the crop spans 1.5 x the longer side of the box
BOX_EXPANSION = 1.5


def graph_normalises_input(model_path: str | Path) -> bool:
    """insightface ``Landmark.__init__``: True when the ONNX graph subtracts/multiplies its input itself,
    judged (as insightface does) by the *names* of its first 8 nodes: one starting with ``Sub`` or ``_minus``
    and one with ``Mul`` or ``_mul``, or a node named ``bn_data`` among the first 3."""
    import onnx

    from pipeline.models.registry import verified_file

    path = verified_file(model_path, "ONNX model")
    return graph_normalises(onnx.load(str(path), load_external_data=False).graph)


def graph_normalises(graph) -> bool:
    """``graph_normalises_input`` on a loaded ONNX graph."""
    find_sub = find_mul = False
    for nid, node in enumerate(graph.node[:8]):
        if node.name.startswith(("Sub", "_minus")):
            find_sub = True
        if node.name.startswith(("Mul", "_mul")):
            find_mul = True
        if nid < 3 and node.name == "bn_data":
            find_sub = find_mul = True
    return find_sub and find_mul


def crop_transform(center: Sequence[float], output_size: int, scale: float, rotation: float = 0.0) -> np.ndarray:
    """insightface ``face_align.transform``'s matrix: scale about the origin, move ``center`` to the origin,
    rotate by ``rotation`` degrees, move the origin to the crop centre ``(output_size/2, output_size/2)``.
    Returns the [2, 3] float64 affine from image to crop pixels (cv2.warpAffine convention)."""
    rot = np.deg2rad(float(rotation))
    c, s = np.cos(rot), np.sin(rot)
    A = scale * np.array([[c, -s], [s, c]])
    t = -A @ np.asarray(center, np.float64) + output_size / 2.0
    return np.hstack([A, t[:, None]])


def trans_points3d(pts: np.ndarray, M: np.ndarray) -> np.ndarray:
    """insightface ``face_align.trans_points3d``: x, y through the affine ``M``, z times M's scale."""
    pts = np.asarray(pts, np.float64)
    out = np.empty(pts.shape, np.float32)
    out[:, :2] = pts[:, :2] @ M[:, :2].T + M[:, 2]
    out[:, 2] = pts[:, 2] * np.hypot(M[0, 0], M[0, 1])
    return out



class Landmarks3D:
    """``Landmarks3D(...)(image_rgb, box) -> float32 [68, 3]`` (x, y, z) in image pixels, as insightface's
    ``Landmark.get`` with ``1k3d68.onnx``. z is relative depth in the same pixel units (insightface's sign)."""

    def __init__(self, model_path: str | Path, providers: Sequence[str] | None = None,
                 intra_op_num_threads: int | None = None):
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"3-D landmark model file not found: {path.resolve()} ({FETCH_HINT})")
        self.model_path = path
        self.name = f"insightface:{path.name}"

        self.session, normalised_in_graph = open_onnx(str(path), str(path), providers=providers,
                                                      intra_op_num_threads=intra_op_num_threads,
                                                      graph_check=graph_normalises)
        self.providers = self.session.get_providers()
        # insightface Landmark.__init__: (mean, std) = (0, 1) when the graph normalises, else (127.5, 128)
        self.input_mean, self.input_std = (0.0, 1.0) if normalised_in_graph else (DEFAULT_MEAN, DEFAULT_STD)
        self._check_signature()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None, model_file: str = MODEL_FILE, **kwargs) -> "Landmarks3D":
        """``model_dir/model_file`` (what ``jobs/fetch_models.py`` writes); insightface's own layout
        ``model_dir/buffalo_l/model_file`` is accepted too."""
        path = insightface_model_path(model_dir, model_file, "insightface 3-D landmark model")
        return cls(path, **kwargs)

    def _check_signature(self) -> None:
        """insightface Landmark.__init__ reads the input size from the input shape and recognises the 3-D
        68-point model by an output 3309 wide; anything else is not this model."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        found = (f"inputs {[(i.name, i.shape) for i in inputs]}, "
                 f"outputs {[(o.name, o.shape) for o in outputs]}")

        def bad(why: str) -> ValueError:
            return ValueError(f"{self.model_path}: not the insightface 3-D 68-point landmark model "
                              f"(1k3d68.onnx: input [N, 3, 192, 192], one output [N, {OUTPUT_WIDTH_3D68}]): "
                              f"{why}; found {found}")

        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise bad("expected one NCHW image input")
        _, c, h, w = inputs[0].shape
        if isinstance(c, int) and c != 3:
            raise bad("expected 3 input channels")
        if not (isinstance(h, int) and isinstance(w, int)) or h != w or h <= 0:
            raise bad("expected a fixed square input size")
        if len(outputs) != 1:
            raise bad("expected exactly one output")
        if len(outputs[0].shape) != 2 or outputs[0].shape[1] != OUTPUT_WIDTH_3D68:
            raise bad(f"expected an output {OUTPUT_WIDTH_3D68} wide (68 points x 3 in its last 204 values)")
        self.input_name = inputs[0].name
        self.output_names = [outputs[0].name]
        self.input_size = (int(w), int(h))  # (width, height), as insightface

    # -- preprocessing / decoding (insightface Landmark.get) -----------------------------------------------

    def crop(self, image_rgb: np.ndarray, box: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(crop [S, S, 3] uint8 RGB, M [2, 3] image -> crop affine) for a box x0, y0, x1, y1."""
        if not (isinstance(image_rgb, np.ndarray) and image_rgb.dtype == np.uint8 and image_rgb.ndim == 3
                and image_rgb.shape[2] == 3):
            raise ValueError(f"image must be HxWx3 uint8 RGB, got {getattr(image_rgb, 'dtype', type(image_rgb))} "
                             f"{getattr(image_rgb, 'shape', '')}")
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(-1)[:4])
        w, h = x1 - x0, y1 - y0
        if not (w > 0 and h > 0):
            raise ValueError(f"box must be x0, y0, x1, y1 with x1 > x0 and y1 > y0, got {list(box)}")
        size = self.input_size[0]
        scale = size / (max(w, h) * BOX_EXPANSION)
        M = crop_transform(((x0 + x1) / 2, (y0 + y1) / 2), size, scale, 0.0)
        crop = cv2.warpAffine(image_rgb, M, (size, size), borderValue=0.0)
        return crop, M

    def blob(self, crop_rgb: np.ndarray) -> np.ndarray:
        """[1, 3, S, S] float32 network input: (pixel - mean) / std, RGB (insightface's swapRB=True on BGR)."""
        x = (crop_rgb.astype(np.float32) - np.float32(self.input_mean)) * np.float32(1.0 / self.input_std)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def decode(self, pred: np.ndarray, M: np.ndarray) -> np.ndarray:
        """Raw network output [3309] -> [68, 3] image pixels (insightface Landmark.get + trans_points3d)."""
        pred = np.asarray(pred, np.float32).reshape(-1)
        pred = pred.reshape(-1, 3 if pred.shape[0] >= 3000 else 2)[-NUM_POINTS:].copy()
        half = self.input_size[0] // 2
        pred[:, :2] += 1
        pred[:, :2] *= half
        if pred.shape[1] == 3:
            pred[:, 2] *= half
        return trans_points3d(pred, cv2.invertAffineTransform(M))

    def __call__(self, image_rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """68 iBUG-order points [68, 3] float32 (x, y, z) in pixels of ``image_rgb`` (HxWx3 uint8 RGB) for the
        face in ``box`` (x0, y0, x1, y1 pixels, e.g. an SCRFD box)."""
        crop, M = self.crop(image_rgb, box)
        pred = self.session.run(self.output_names, {self.input_name: self.blob(crop)})[0][0]
        return self.decode(pred, M)


def pose_from_landmarks3d(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(pitch, yaw, roll) in degrees from 68 iBUG-order points [68, 2|3] in image pixels (e.g. ``Landmarks3D``).

    insightface's order (``matrix2angle`` returns rx = pitch, ry = yaw, rz = roll) and arithmetic (its
    ``meanshape_68``, ``estimate_affine_matrix_3d23d``, ``P2sRt``, ``matrix2angle``). Signs are the project's
    (``pipeline.scoring.pose``): yaw > 0 = face turned towards image right (the subject's left), pitch > 0 =
    chin up, roll > 0 = face rotated counter-clockwise on screen. Against insightface's ``face.pose``: pitch and
    yaw are equal, roll has the opposite sign (insightface's positive roll is clockwise on screen).
    """
    from pipeline.scoring.pose import pose_from_landmarks

    p = pose_from_landmarks(landmarks)
    return p["pitch"], p["yaw"], p["roll"]
