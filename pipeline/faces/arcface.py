"""ArcFace face identity embeddings (insightface ``buffalo_l`` ``w600k_r50.onnx``), run with onnxruntime.

Follows insightface 2.1's ``python-package/insightface/model_zoo/arcface_onnx.py`` (class ``ArcFaceONNX``)
and ``utils/face_align.py`` (``norm_crop`` / ``estimate_norm`` with the ``arcface_dst`` template), so that an
embedding equals ``face.embedding`` of ``insightface.app.FaceAnalysis`` for the same image and 5 keypoints:

* ``__init__``: the model normalises its input itself when one of its first 8 graph nodes is *named*
  ``Sub*``/``_minus*`` and one ``Mul*``/``_mul*`` (mxnet exports); then mean 0, std 1, else mean 127.5 and
  std 127.5 (what insightface logs for w600k_r50: ``['None', 3, 112, 112] 127.5 127.5``). The input size is the
  input's (W, H); the model has exactly one output.
* ``norm_crop``: a least-squares similarity transform (``skimage.transform.SimilarityTransform``, Umeyama,
  no reflection) from the 5 keypoints (left eye, right eye, nose tip, left mouth corner, right mouth corner, as
  seen in the image) to ``arcface_dst`` scaled by ``image_size / 112``, then ``cv2.warpAffine`` (bilinear,
  black border) into an ``image_size`` square.
* ``get_feat``: ``cv2.dnn.blobFromImages(imgs, 1/std, size, (mean,)*3, swapRB=True)`` on insightface's BGR
  image, i.e. the network sees RGB: our images are RGB already, so no channel swap here.

insightface's ``face.normed_embedding`` is the embedding divided by its L2 norm; ``embed_frames`` averages those
over a clip's frames and L2-normalises the mean (docs/identity.md). tests/test_identity_arcface.py runs
insightface's own ``ArcFaceONNX`` and ``norm_crop`` on the same ONNX file, images and keypoints and finds the
same aligned crops and embeddings.

``ArcFace.smoke()`` is a small deterministic random network with the same input and output (like the smoke
SyncNet): it makes the plumbing run without weights and says nothing about who is who.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .base import FETCH_HINT, insightface_model_path, open_onnx

log = logging.getLogger(__name__)

MODEL_FILE = "w600k_r50.onnx"
SMOKE_MODEL_ID = "smoke-random-arcface"
EMBEDDING_DIM = 512  # w600k_r50 (and every buffalo/antelope recognition model): 512-d embeddings

# insightface utils/face_align.py arcface_dst: the 5-point template of a 112x112 aligned face
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
# ArcFaceONNX.__init__ defaults when the graph does not normalise its input itself
DEFAULT_MEAN = 127.5
DEFAULT_STD = 127.5


def graph_normalises_input(graph) -> bool:
    """insightface ``ArcFaceONNX.__init__``: True when one of the graph's first 8 nodes is named ``Sub*`` or
    ``_minus*`` and one ``Mul*`` or ``_mul*`` (an mxnet export that normalises its own input)."""
    find_sub = find_mul = False
    for node in graph.node[:8]:
        if node.name.startswith(("Sub", "_minus")):
            find_sub = True
        if node.name.startswith(("Mul", "_mul")):
            find_mul = True
    return find_sub and find_mul


def estimate_norm(kps5: np.ndarray, image_size: int = 112) -> np.ndarray:
    """insightface ``face_align.estimate_norm`` (mode 'arcface'): the [2, 3] similarity from image pixels to the
    aligned crop. ``image_size`` must be a multiple of 112 (template scaled) or 128 (scaled and shifted 8 px)."""
    from skimage.transform import SimilarityTransform

    kps5 = np.asarray(kps5)
    if kps5.shape != (5, 2) or not np.isfinite(kps5).all():
        raise ValueError(f"expected 5 finite (x, y) keypoints, got shape {kps5.shape}")
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"image_size must be a multiple of 112 or 128 (insightface estimate_norm), got {image_size}")
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26 (estimate() is deprecated there)
        tform = SimilarityTransform.from_estimate(kps5, dst)
        if not tform:
            raise ValueError(f"degenerate keypoints, no similarity transform: {kps5.tolist()}")
    else:
        tform = SimilarityTransform()
        if not tform.estimate(kps5, dst):
            raise ValueError(f"degenerate keypoints, no similarity transform: {kps5.tolist()}")
    return tform.params[0:2, :]


def norm_crop(image: np.ndarray, kps5: np.ndarray, image_size: int = 112) -> np.ndarray:
    """insightface ``face_align.norm_crop``: the face warped onto the ArcFace template (channel order kept)."""
    M = estimate_norm(kps5, image_size)
    return cv2.warpAffine(image, M, (image_size, image_size), borderValue=0.0)



def smoke_model_bytes(seed: int = 0, input_size: int = 112) -> bytes:
    """A small random network with w600k_r50's signature (input ``input.1`` [N, 3, 112, 112] float, output
    [N, 512]), built with onnx.helper from a seeded generator: the same bytes on every machine. 16x16 average
    pooling, then two dense layers (tanh between): nearby images give nearby vectors, nothing more."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    cells = (input_size // 16) ** 2 * 3
    w1 = (rng.standard_normal((cells, 256)) / np.sqrt(cells)).astype(np.float32)
    w2 = (rng.standard_normal((256, EMBEDDING_DIM)) / 16.0).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")]
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16],
                              name="pool"),
             helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w1"], ["h"], name="dense1"),
             helper.make_node("Tanh", ["h"], ["ht"], name="tanh"),
             helper.make_node("MatMul", ["ht", "w2"], ["683"], name="dense2")]
    graph = helper.make_graph(
        nodes, "smoke_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, input_size, input_size])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", EMBEDDING_DIM])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="talking-head-smoke")
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model.SerializeToString()


class ArcFace:
    """``ArcFace(path)(image_rgb, kps5) -> float32 [512]`` as insightface's ``ArcFaceONNX.get``; ``embed`` takes
    several aligned crops at once."""

    def __init__(self, model_path: str | Path, providers: Sequence[str] | None = None,
                 intra_op_num_threads: int | None = None, *, _model_bytes: bytes | None = None,
                 _model_id: str | None = None):
        if _model_bytes is None:
            path = Path(model_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"ArcFace recognition model file not found: {path.resolve()} ({FETCH_HINT})")
        else:
            path = Path(model_path)
        self.model_path = path
        self.name = _model_id or f"insightface:{path.name}"
        self.session, normalised_in_graph = open_onnx(
            _model_bytes if _model_bytes is not None else str(path), str(path), providers=providers,
            intra_op_num_threads=intra_op_num_threads, graph_check=graph_normalises_input)
        self.providers = self.session.get_providers()
        # insightface ArcFaceONNX.__init__: (0, 1) when the graph normalises its input, else (127.5, 127.5)
        self.input_mean, self.input_std = (0.0, 1.0) if normalised_in_graph else (DEFAULT_MEAN, DEFAULT_STD)
        self._check_signature()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None, model_file: str = MODEL_FILE, **kwargs) -> "ArcFace":
        """``model_dir/model_file`` (what ``jobs/fetch_models.py`` writes); insightface's own layout
        ``model_dir/buffalo_l/model_file`` is accepted too."""
        path = insightface_model_path(model_dir, model_file, "ArcFace recognition model")
        return cls(path, **kwargs)

    @classmethod
    def smoke(cls, seed: int = 0, **kwargs) -> "ArcFace":
        """The ``smoke`` profile's stand-in (``smoke_model_bytes``), built in memory; model id ``smoke-random-arcface``."""
        return cls(f"<{SMOKE_MODEL_ID} seed {seed}>", _model_bytes=smoke_model_bytes(seed), _model_id=SMOKE_MODEL_ID,
                   **kwargs)

    def _check_signature(self) -> None:
        """What ArcFaceONNX reads from the session (one NCHW input whose square side is the crop size; exactly one
        output) plus what the scores contract needs (a 512-wide embedding)."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        found = (f"inputs {[(i.name, i.shape) for i in inputs]}, "
                 f"outputs {[(o.name, o.shape) for o in outputs]}")

        def bad(why: str) -> ValueError:
            return ValueError(f"{self.model_path}: not an insightface ArcFace recognition model (w600k_r50.onnx: "
                              f"input [N, 3, 112, 112], one output [N, {EMBEDDING_DIM}]): {why}; found {found}")

        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise bad("expected one NCHW image input")
        batch, c, h, w = inputs[0].shape
        if isinstance(c, int) and c != 3:
            raise bad("expected 3 input channels")
        if not (isinstance(h, int) and isinstance(w, int)) or h != w or not (h % 112 == 0 or h % 128 == 0):
            raise bad("expected a fixed square input whose side is a multiple of 112 or 128 (norm_crop sizes)")
        if "float" not in inputs[0].type:
            raise bad(f"expected a float input, got {inputs[0].type}")
        if len(outputs) != 1:
            raise bad("expected exactly one output")
        shape = outputs[0].shape
        if len(shape) != 2 or shape[1] != EMBEDDING_DIM:
            raise bad(f"expected one output [N, {EMBEDDING_DIM}]")
        self.input_name = inputs[0].name
        self.output_names = [outputs[0].name]
        self.input_size = (int(w), int(h))  # (width, height), as insightface
        self.fixed_batch = batch if isinstance(batch, int) else None

    # -- insightface ArcFaceONNX.get / get_feat -----------------------------------------------------------

    def align(self, image_rgb: np.ndarray, kps5: np.ndarray) -> np.ndarray:
        """The aligned [S, S, 3] uint8 RGB crop (insightface ``norm_crop``) for 5 keypoints in image pixels."""
        if not (isinstance(image_rgb, np.ndarray) and image_rgb.dtype == np.uint8 and image_rgb.ndim == 3
                and image_rgb.shape[2] == 3):
            raise ValueError(f"image must be HxWx3 uint8 RGB, got {getattr(image_rgb, 'dtype', type(image_rgb))} "
                             f"{getattr(image_rgb, 'shape', '')}")
        return norm_crop(image_rgb, kps5, self.input_size[0])

    def blob(self, crops_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """[N, 3, S, S] float32: (pixel - mean) / std, RGB (insightface's swapRB=True on BGR)."""
        x = np.stack([np.asarray(c) for c in crops_rgb]).astype(np.float32)
        x = (x - np.float32(self.input_mean)) * np.float32(1.0 / self.input_std)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def embed(self, crops_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """Raw (unnormalised) embeddings [N, 512] float32 of aligned RGB crops, as ``ArcFaceONNX.get_feat``."""
        if not len(crops_rgb):
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        blob = self.blob(crops_rgb)
        if self.fixed_batch is not None and self.fixed_batch != len(blob):  # a fixed-batch export: one at a time
            return np.concatenate([self.session.run(self.output_names, {self.input_name: blob[i:i + 1]})[0]
                                   for i in range(len(blob))]).astype(np.float32)
        return np.asarray(self.session.run(self.output_names, {self.input_name: blob})[0], np.float32)

    def __call__(self, image_rgb: np.ndarray, kps5: np.ndarray) -> np.ndarray:
        """``face.embedding`` of insightface for the face with these 5 keypoints: float32 [512], not normalised."""
        return self.embed([self.align(image_rgb, kps5)])[0]


def normalise(v: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows divided by their L2 norm (insightface ``Face.normed_embedding``)."""
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=axis, keepdims=True)


def clip_embedding(raw: np.ndarray) -> np.ndarray:
    """One identity vector for a clip from the raw embeddings of its frames [K, 512]: each frame's embedding
    L2-normalised (insightface's ``normed_embedding``), averaged, the mean L2-normalised again. float32 [512]."""
    raw = np.asarray(raw, np.float32)
    if raw.ndim != 2 or not len(raw):
        raise ValueError(f"expected [K >= 1, D] frame embeddings, got shape {raw.shape}")
    return normalise(normalise(raw).mean(axis=0))
