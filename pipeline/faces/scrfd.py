"""insightface SCRFD face detector (``full`` profile), run with onnxruntime.

Follows ``python-package/insightface/model_zoo/scrfd.py`` of deepinsight/insightface (class ``SCRFD``,
the version with batched-output support) step by step, so that boxes and keypoints match what
``insightface.app.FaceAnalysis`` gets from the same weights (e.g. ``buffalo_l/det_10g.onnx``):

* ``_init_vars``: output layout from the number of outputs (6 / 9: strides 8, 16, 32 with 2 anchors
  per location, 9 with keypoints; 10 / 15: strides 8..128 with 1 anchor, 15 with keypoints), and
  batched ``[1, N, C]`` vs unbatched ``[N, C]`` outputs from the rank of the first output;
* ``detect``: letterbox resize keeping the aspect ratio into the top-left corner of an
  ``input_size`` canvas of zeros, ``det_scale = new_height / image height``;
* ``forward``: ``cv2.dnn.blobFromImage(img, 1/128, size, (127.5,)*3, swapRB=True)`` on a BGR image,
  anchor centres, ``distance2bbox`` / ``distance2kps`` with predictions scaled by the stride,
  ``score >= threshold``;
* ``nms``: greedy NMS at IoU 0.4 with the ``+1`` pixel area convention;
* candidates are ordered by descending score with a stable sort, as insightface 2.x (0.7 reversed an
  ascending argsort, which orders equal scores the other way round).

tests/test_insightface_judge.py runs insightface 2.x's own ``SCRFD`` class on the same ONNX file and images
and finds the same boxes, scores and keypoints. One setting differs on purpose: insightface 2.x detects at
two input sizes (128 and 640) when the model's input is dynamic and no ``det_size`` is given; we detect at
one (``detect.scrfd_input_size``, 640, insightface 0.7's ``FaceAnalysis`` default).

Boxes are not clipped to the image (insightface does not clip either).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .base import FETCH_HINT, Face, insightface_model_path, open_onnx

log = logging.getLogger(__name__)


# insightface model_zoo/scrfd.py, SCRFD._init_vars: number of outputs -> (strides, anchors per location, keypoints)
_LAYOUTS: dict[int, tuple[tuple[int, ...], int, bool]] = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}

# insightface model_zoo/scrfd.py, SCRFD.forward (blobFromImage arguments) and SCRFD.__init__ (nms_thresh)
INPUT_MEAN = 127.5
INPUT_STD = 128.0
NMS_THRESHOLD = 0.4


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """insightface model_zoo/scrfd.py ``distance2bbox`` (no ``max_shape`` clamp, as SCRFD.forward calls it):
    (left, top, right, bottom) distances from each point -> [N, 4] x0, y0, x1, y1."""
    x0 = points[:, 0] - distance[:, 0]
    y0 = points[:, 1] - distance[:, 1]
    x1 = points[:, 0] + distance[:, 2]
    y1 = points[:, 1] + distance[:, 3]
    return np.stack([x0, y0, x1, y1], axis=-1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """insightface model_zoo/scrfd.py ``distance2kps``: interleaved (dx, dy) offsets from each point
    -> [N, 2K] interleaved absolute x, y."""
    out = np.empty_like(distance)
    out[:, 0::2] = points[:, 0:1] + distance[:, 0::2]
    out[:, 1::2] = points[:, 1:2] + distance[:, 1::2]
    return out


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """insightface model_zoo/scrfd.py SCRFD.forward ("solution-3"): the (x, y) of every feature-map cell
    times the stride, row-major (y outer, x inner), each repeated ``num_anchors`` times in a row."""
    centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    centers = (centers * stride).reshape(-1, 2)
    if num_anchors > 1:
        centers = np.repeat(centers, num_anchors, axis=0)
    return centers


def nms(dets: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """insightface model_zoo/scrfd.py SCRFD.nms: greedy NMS over [N, 5] (x0, y0, x1, y1, score) rows;
    areas use the ``+1`` pixel convention. Returns kept row indices, highest score first."""
    x0, y0, x1, y1, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")  # insightface 2.x: equal scores keep their order
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[np.where(iou <= threshold)[0]]
    return keep


def letterbox(image: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """insightface model_zoo/scrfd.py SCRFD.detect: resize keeping the aspect ratio so the image fits
    ``input_size`` = (width, height), paste it top-left on zeros. Returns (canvas, det_scale) where
    original pixel coordinates = network coordinates / det_scale."""
    in_w, in_h = input_size
    im_ratio = float(image.shape[0]) / image.shape[1]
    model_ratio = float(in_h) / in_w
    if im_ratio > model_ratio:
        new_height = in_h
        new_width = int(new_height / im_ratio)
    else:
        new_width = in_w
        new_height = int(new_width * im_ratio)
    det_scale = float(new_height) / image.shape[0]
    resized = cv2.resize(image, (new_width, new_height))  # cv2 default INTER_LINEAR, as insightface
    canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
    canvas[:new_height, :new_width, :] = resized
    return canvas, det_scale



def _as_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, (int, np.integer)):
        return int(input_size), int(input_size)
    w, h = input_size
    return int(w), int(h)


class ScrfdDetector:
    """SCRFD ONNX face detector: ``detect(image_rgb) -> list[Face]`` with box, score and (9/15-output
    models) the five keypoints, highest score first."""

    def __init__(self, model_path: str | Path, input_size: int | Sequence[int] = 640,
                 min_confidence: float = 0.5, nms_threshold: float = NMS_THRESHOLD,
                 providers: Sequence[str] | None = None, intra_op_num_threads: int | None = None):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SCRFD model file not found: {path.resolve()} ({FETCH_HINT})")
        self.model_path = path
        self.name = f"insightface-scrfd:{path.name}"
        self.min_confidence = float(min_confidence)
        self.nms_threshold = float(nms_threshold)

        self.session, _ = open_onnx(str(path), str(path), providers=providers,
                                    intra_op_num_threads=intra_op_num_threads)
        self.providers = self.session.get_providers()
        self._init_vars(_as_size(input_size))
        self._center_cache: dict[tuple[int, int, int], np.ndarray] = {}

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None, model_file: str = "det_10g.onnx",
                       input_size: int | Sequence[int] = 640, min_confidence: float = 0.5,
                       **kwargs) -> "ScrfdDetector":
        """``model_dir/model_file``; insightface's own layout ``model_dir/buffalo_l/model_file`` is
        accepted too."""
        path = insightface_model_path(model_dir, model_file, "SCRFD face detector model")
        return cls(path, input_size=input_size, min_confidence=min_confidence, **kwargs)

    # -- model signature: insightface model_zoo/scrfd.py SCRFD._init_vars --------------------------------

    def _init_vars(self, input_size: tuple[int, int]) -> None:
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        found = (f"inputs {[(i.name, i.shape) for i in inputs]}, "
                 f"{len(outputs)} outputs {[(o.name, o.shape) for o in outputs]}")

        def bad(why: str) -> ValueError:
            return ValueError(f"{self.model_path}: not an SCRFD detector ({why}); found {found}")

        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise bad("expected one NCHW image input")
        if isinstance(inputs[0].shape[1], int) and inputs[0].shape[1] != 3:
            raise bad("expected 3 input channels")
        if len(outputs) not in _LAYOUTS:
            raise bad(f"expected {sorted(_LAYOUTS)} outputs (scores, boxes[, keypoints] per stride)")
        ranks = {len(o.shape) for o in outputs}
        if len(ranks) != 1 or not ranks <= {2, 3}:
            raise bad("outputs must all be [N, C] or all [1, N, C]")
        self._strides, self._num_anchors, self.use_kps = _LAYOUTS[len(outputs)]
        fmc = len(self._strides)
        # insightface: scores for every stride, then boxes for every stride, then keypoints
        channels = [1] * fmc + [4] * fmc + ([10] * fmc if self.use_kps else [])
        for o, c in zip(outputs, channels):
            if isinstance(o.shape[-1], int) and o.shape[-1] != c:
                raise bad(f"output {o.name!r} should have {c} channels in its last dimension")
        self.batched = ranks == {3}
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in outputs]

        h, w = inputs[0].shape[2:4]
        if isinstance(h, int) and isinstance(w, int):  # fixed-size export: its size wins, as in SCRFD.prepare
            if (w, h) != input_size:
                log.warning("%s has a fixed input size %dx%d; ignoring input_size %s", self.model_path, w, h,
                            input_size)
            input_size = (w, h)
        self.input_size = input_size  # (width, height)

    # -- inference ---------------------------------------------------------------------------------------

    def _anchors(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        centers = self._center_cache.get(key)
        if centers is None:
            centers = anchor_centers(height, width, stride, self._num_anchors)
            if len(self._center_cache) < 100:
                self._center_cache[key] = centers
        return centers

    def _blob(self, canvas_rgb: np.ndarray) -> np.ndarray:
        # insightface feeds a BGR (cv2) image through blobFromImage(..., swapRB=True), so the network sees
        # RGB. Our image is already RGB: no channel swap. (x - 127.5) / 128, HWC -> NCHW float32.
        blob = (canvas_rgb.astype(np.float32) - INPUT_MEAN) / INPUT_STD
        return np.ascontiguousarray(blob.transpose(2, 0, 1)[None])

    def _forward(self, canvas_rgb: np.ndarray, threshold: float):
        """insightface model_zoo/scrfd.py SCRFD.forward: per-stride decode of the candidates above threshold."""
        blob = self._blob(canvas_rgb)
        net_outs = self.session.run(self.output_names, {self.input_name: blob})
        input_height, input_width = blob.shape[2], blob.shape[3]
        fmc = len(self._strides)
        scores_list, boxes_list, kps_list = [], [], []
        for idx, stride in enumerate(self._strides):
            outs = [net_outs[idx], net_outs[idx + fmc]] + ([net_outs[idx + 2 * fmc]] if self.use_kps else [])
            if self.batched:
                outs = [o[0] for o in outs]
            scores = outs[0].reshape(-1)
            centers = self._anchors(input_height // stride, input_width // stride, stride)
            if scores.shape[0] != centers.shape[0]:
                raise ValueError(f"{self.model_path}: stride-{stride} output has {scores.shape[0]} rows, expected "
                                 f"{centers.shape[0]} for a {input_width}x{input_height} input "
                                 f"with {self._num_anchors} anchor(s) per location")
            pos = np.where(scores >= threshold)[0]
            boxes = distance2bbox(centers[pos], outs[1].reshape(-1, 4)[pos] * stride)
            scores_list.append(scores[pos])
            boxes_list.append(boxes)
            if self.use_kps:
                kps = distance2kps(centers[pos], outs[2].reshape(-1, 10)[pos] * stride)
                kps_list.append(kps.reshape(-1, 5, 2))
        return scores_list, boxes_list, kps_list

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, highest score first (insightface model_zoo/scrfd.py SCRFD.detect
        with max_num=0)."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
        canvas, det_scale = letterbox(image_rgb, self.input_size)
        scores_list, boxes_list, kps_list = self._forward(canvas, self.min_confidence)

        scores = np.concatenate(scores_list).astype(np.float32)
        if scores.size == 0:
            return []
        order = np.argsort(-scores, kind="stable")  # insightface 2.x (0.7 reversed an argsort: ties differ)
        boxes = np.concatenate(boxes_list) / det_scale
        pre_det = np.hstack((boxes, scores[:, None])).astype(np.float32, copy=False)[order]
        keep = nms(pre_det, self.nms_threshold)
        det = pre_det[keep]
        kpss = (np.concatenate(kps_list) / det_scale).astype(np.float32)[order][keep] if self.use_kps else None
        return [Face(box=det[i, :4].copy(), score=float(det[i, 4]),
                     kps5=None if kpss is None else kpss[i].copy())
                for i in range(det.shape[0])]

    def __repr__(self) -> str:
        return (f"ScrfdDetector({str(self.model_path)!r}, input_size={self.input_size}, "
                f"min_confidence={self.min_confidence}, providers={self.providers})")
