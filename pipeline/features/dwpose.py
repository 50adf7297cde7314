"""DWPose whole-body face keypoints on onnxruntime.

Contract (schemas: ``kps.npy`` float32 [T,68,3]): the 68 face points of the 133 COCO-WholeBody
keypoints (indices 23..90, iBUG-68 order), as x, y in pixels of the 512x512 crop, and score.

Model: DWPose's ``dw-ll_ucoco_384.onnx`` (RTMPose-l distilled; input 1x3x384x288 RGB, i.e. w=288,
h=384; outputs simcc_x [1,133,576] = 2 bins per input column and simcc_y [1,133,768] = 2 bins per
input row: SimCC split ratio 2.0, mmpose codec ``input_size=(288, 384)``). The pre- and post-processing
below follow DWPose's ``ControlNet-v1-1-nightly/annotator/dwpose/onnxpose.py`` step by step, with
one change: there is no person detector. The face crop is already a head-and-shoulders portrait, so
the whole crop [0, 0, 512, 512] is the box, which is exactly what DWPose itself uses when its
detector finds nothing (``preprocess``: ``out_bbox = [[0, 0, w, h]]``).

Colour order: the crop is RGB, and the network wants RGB normalised by the ImageNet RGB mean/std
(mmpose config ``data_preprocessor``: mean [123.675, 116.28, 103.53], ``bgr_to_rgb=True``).
"""
from __future__ import annotations

import io
import warnings

import numpy as np

from pipeline.models.registry import FULL_MODELS, require_file, verified_file

INPUT_W, INPUT_H = 288, 384  # model input (w, h)
SIMCC_SPLIT_RATIO = 2.0  # SimCC bins per input pixel: simcc_x has 2 * 288 = 576 bins, simcc_y 2 * 384 = 768
NUM_KEYPOINTS = 133
FACE = slice(23, 91)  # COCO-WholeBody face points 23..90 -> 68 points (iBUG order)
BBOX_PADDING = 1.25  # onnxpose.bbox_xyxy2cs(bbox, padding=1.25)
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
SMOKE_ID = "smoke:tiny-simcc-onnx-seed0"


# ---- top-down preprocessing (DWPose onnxpose.py: bbox_xyxy2cs, _fix_aspect_ratio, get_warp_matrix) --

def bbox_center_scale(bbox, padding: float = BBOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """(x0, y0, x1, y1) -> centre (x, y) and scale (w, h) * padding."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), np.array([x1 - x0, y1 - y0]) * padding


def fix_aspect_ratio(scale: np.ndarray, aspect: float = INPUT_W / INPUT_H) -> np.ndarray:
    """Grow the shorter side so that w / h == aspect (never shrink)."""
    w, h = float(scale[0]), float(scale[1])
    return np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])


def warp_matrix(center: np.ndarray, scale: np.ndarray, out_size=(INPUT_W, INPUT_H)) -> np.ndarray:
    """2x3 affine taking the box (centre, scale) to the model input, rotation 0.

    Built as DWPose does: three point pairs (centre, centre shifted up by half the box width, and a
    third point at 90 degrees) through cv2.getAffineTransform in float32.
    """
    import cv2

    dst_w, dst_h = out_size
    src_dir = np.array([0.0, scale[0] * -0.5])
    dst_dir = np.array([0.0, dst_w * -0.5])
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float32)


def crop_box_transform(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center, aspect-fixed scale, warp matrix) for a whole image used as the person box."""
    center, scale = bbox_center_scale([0, 0, width, height])
    scale = fix_aspect_ratio(scale)
    return center, scale, warp_matrix(center, scale)


def preprocess(frame: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """uint8 RGB [H,W,3] -> float32 [3,384,288]: affine warp (bilinear, black border), mean/std."""
    import cv2

    img = cv2.warpAffine(frame, warp, (INPUT_W, INPUT_H), flags=cv2.INTER_LINEAR)
    return ((img.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)


# ---- SimCC decoding (DWPose onnxpose.py: get_simcc_maximum, decode, postprocess) -------------

def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = SIMCC_SPLIT_RATIO):
    """[N,K,Wx], [N,K,Wy] -> keypoints [N,K,2] in model-input pixels and scores [N,K].

    As DWPose: argmax along each axis; the score is the *smaller* of the two axis maxima (DWPose's
    ``mask = max_val_x > max_val_y; max_val_x[mask] = max_val_y[mask]``); keypoints with score <= 0
    get location -1 before the division by the split ratio.
    """
    N, K, _ = simcc_x.shape
    sx, sy = simcc_x.reshape(N * K, -1), simcc_y.reshape(N * K, -1)
    locs = np.stack([sx.argmax(1), sy.argmax(1)], axis=-1).astype(np.float32)
    vals = np.minimum(sx.max(1), sy.max(1))
    locs[vals <= 0.0] = -1
    return locs.reshape(N, K, 2) / split_ratio, vals.reshape(N, K)


def to_image_coords(keypoints: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Model-input pixels -> image pixels (DWPose postprocess: kp / input_size * scale + center - scale / 2)."""
    return keypoints / np.array([INPUT_W, INPUT_H]) * scale + center - scale / 2


# ---- the model ---------------------------------------------------------------------------

def make_session(model, device: str = "cpu", threads: int | None = None):
    """onnxruntime session from a path or bytes; CUDA provider first when asked for and installed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        idx = int(str(device).split(":")[1]) if ":" in str(device) else 0
        providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    # a file is checked against its recorded sha256 before onnxruntime parses it; bytes are the
    # smoke stand-in built in memory
    src = model if isinstance(model, bytes) else str(verified_file(model, "DWPose ONNX model"))
    return ort.InferenceSession(src, sess_options=opts, providers=providers)


def _simcc_shapes_ok(shape_x, shape_y) -> bool:
    """[., 133, 576] and [., 133, 768]; symbolic (non-int) dims of a dynamic export are not judged."""
    want_x = [NUM_KEYPOINTS, int(INPUT_W * SIMCC_SPLIT_RATIO)]
    want_y = [NUM_KEYPOINTS, int(INPUT_H * SIMCC_SPLIT_RATIO)]
    pairs = list(zip(list(shape_x)[1:], want_x)) + list(zip(list(shape_y)[1:], want_y))
    return len(shape_x) == len(shape_y) == 3 and all(not isinstance(g, int) or g == w for g, w in pairs)


def check_signature(sess) -> list[str]:
    """The official model's I/O: one NCHW 3x384x288 input, simcc_x [.,133,576], simcc_y [.,133,768].
    Returns the output names in (simcc_x, simcc_y) order."""
    inp, outs = sess.get_inputs(), sess.get_outputs()
    if len(inp) != 1 or list(inp[0].shape)[1:] != [3, INPUT_H, INPUT_W] or len(outs) != 2:
        raise ValueError(f"not a DWPose 384x288 SimCC model: inputs {[(i.name, i.shape) for i in inp]}, "
                         f"outputs {[(o.name, o.shape) for o in outs]}")
    # DWPose unpacks the outputs by position (simcc_x, simcc_y); use the names when they are the
    # official ones, so an export that lists them the other way round still decodes right.
    by_name = {o.name: o for o in outs}
    if sorted(by_name) == ["simcc_x", "simcc_y"]:
        outs = [by_name["simcc_x"], by_name["simcc_y"]]
    if not _simcc_shapes_ok(outs[0].shape, outs[1].shape):
        raise ValueError(f"unexpected SimCC output shapes {[o.shape for o in outs]} "
                         f"(want [.,133,{INPUT_W * 2}], [.,133,{INPUT_H * 2}])")
    return [o.name for o in outs]


class DWPoseFace:
    """Face keypoints of 512x512 crops with a DWPose ONNX session (created once per worker)."""

    def __init__(self, model, model_id: str, device: str = "cpu", threads: int | None = None,
                 batch_size: int = 16):
        self.session = make_session(model, device, threads)
        self.output_names = check_signature(self.session)
        self.model_id = model_id
        self.input_name = self.session.get_inputs()[0].name
        # The official export has a fixed batch of 1; a dynamic batch dim is used when present.
        b = self.session.get_inputs()[0].shape[0]
        self.batch_size = batch_size if not isinstance(b, int) else b

    @classmethod
    def load(cls, profile: str, model_dir=None, device: str = "cpu", threads: int | None = None, batch_size: int = 16):
        if profile == "smoke":
            return cls(build_smoke_onnx(), SMOKE_ID, device, threads, batch_size)
        if profile != "full":
            raise ValueError(f"unknown profile {profile!r}")
        spec = FULL_MODELS["dwpose"]
        return cls(require_file(model_dir, spec.files[0].path, "dwpose"), spec.model_id, device, threads, batch_size)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB [T,H,W,3] -> float32 [T,68,3] (x, y in frame pixels, score)."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
        T, H, W, _ = frames.shape
        center, scale, warp = crop_box_transform(H, W)
        out = np.empty((T, FACE.stop - FACE.start, 3), dtype=np.float32)
        for i in range(0, T, self.batch_size):
            x = np.stack([preprocess(f, warp) for f in frames[i:i + self.batch_size]])
            simcc_x, simcc_y = self.session.run(self.output_names, {self.input_name: x})
            if not _simcc_shapes_ok(simcc_x.shape, simcc_y.shape) or len(simcc_x) != len(x):
                raise ValueError(f"SimCC outputs {simcc_x.shape}, {simcc_y.shape} for a batch of {len(x)}")
            kps, scores = decode_simcc(simcc_x, simcc_y)
            kps = to_image_coords(kps, center, scale)
            out[i:i + len(x), :, :2] = kps[:, FACE]
            out[i:i + len(x), :, 2] = scores[:, FACE]
        return out


# ---- smoke model -------------------------------------------------------------------------

def build_smoke_onnx(seed: int = 0, batch: int | None = 1) -> bytes:
    """A tiny SimCC network exported to ONNX with the official signature (batch 1 like the real
    file; ``batch=None`` exports a dynamic batch). Backbone -> per-keypoint maps -> 1-D x/y
    classification vectors, the shape of RTMPose's SimCC head without its GAU."""
    import torch

    class TinySimCC(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(8, NUM_KEYPOINTS, 1),
            )

        def forward(self, x):
            f = self.backbone(x)  # [N,133,96,72]
            sx = torch.nn.functional.interpolate(f.mean(2), size=int(INPUT_W * SIMCC_SPLIT_RATIO), mode="linear")
            sy = torch.nn.functional.interpolate(f.mean(3), size=int(INPUT_H * SIMCC_SPLIT_RATIO), mode="linear")
            return sx, sy

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = TinySimCC()
    return export_simcc_onnx(module, batch=batch)


def export_simcc_onnx(module, batch: int | None = 1) -> bytes:
    """Export a torch module mapping [N,3,384,288] -> (simcc_x, simcc_y) with the official names."""
    import torch

    buf = io.BytesIO()
    dynamic = None if batch else {"input": {0: "batch"}, "simcc_x": {0: "batch"}, "simcc_y": {0: "batch"}}
    # The TorchScript exporter: deterministic, needs no onnxscript, handles these few ops.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (torch.zeros(batch or 1, 3, INPUT_H, INPUT_W),), buf, dynamo=False,
                          input_names=["input"], output_names=["simcc_x", "simcc_y"], dynamic_axes=dynamic,
                          opset_version=17)
    return buf.getvalue()
