"""The face analysis interface every backend implements.

A backend turns one RGB image into a list of faces: a box, a confidence, optionally five
keypoints (SCRFD order: left eye, right eye, nose tip, left mouth corner, right mouth corner,
"left"/"right" as seen in the image) and optionally a dense landmark set. Coordinates are pixels of the
image passed in. Backends are created once per Ray actor and reused for every frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass
class Face:
    box: np.ndarray  # float32 [4]: x0, y0, x1, y1 in pixels
    score: float
    kps5: np.ndarray | None = None  # float32 [5, 2]
    landmarks: np.ndarray | None = None  # float32 [K, 2] or [K, 3] (x, y[, z]) in pixels

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def center(self) -> tuple[float, float]:
        return float(self.box[0] + self.box[2]) / 2, float(self.box[1] + self.box[3]) / 2


class FaceDetector(Protocol):
    #: model id recorded in meta.json["models"]["face_detector"]
    name: str

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, highest score first."""
        ...


def make_detector(config) -> FaceDetector:
    """Build the backend the config names (``CurateConfig``)."""
    backend = config.detector_backend
    if backend == "mediapipe":
        from .mediapipe_backend import MediaPipeFaceDetector

        # Boxes only: tracking and segmenting read nothing else (the scores' landmarks are measured
        # on the output frames by the crop & score stage).
        return MediaPipeFaceDetector(min_confidence=config.detect.min_confidence, landmarks=False)
    if backend == "scrfd":
        from .scrfd import ScrfdDetector

        return ScrfdDetector.from_model_dir(config.model_dir, model_file=config.detect.scrfd_model,
                                            input_size=config.detect.scrfd_input_size,
                                            min_confidence=config.detect.min_confidence)
    raise ValueError(f"unknown face detector backend {backend!r}")


FETCH_HINT = "run `python jobs/fetch_models.py --profile full --dir MODELS` and pass that MODELS dir as model_dir"


def insightface_model_path(model_dir: str | Path | None, model_file: str, what: str) -> Path:
    """``model_dir/model_file`` (what ``jobs/fetch_models.py`` writes), or insightface's own
    ``model_dir/buffalo_l/model_file``; a missing directory or file is a FileNotFoundError naming
    the paths tried and how to fetch them. ``what`` names the model in the message."""
    if model_dir is None:
        raise FileNotFoundError(f"the {what} needs model_dir (the directory holding {model_file}); {FETCH_HINT}")
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model_dir does not exist: {root.resolve()} (looking for {model_file}); {FETCH_HINT}")
    candidates = [root / model_file, root / "buffalo_l" / model_file]
    for path in candidates:
        if path.is_file():
            return path
    tried = " or ".join(str(p.resolve()) for p in candidates)
    raise FileNotFoundError(f"{what} file not found: {tried} ({FETCH_HINT})")


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build and the actor have it (Ray sets CUDA_VISIBLE_DEVICES)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_onnx(model: str | bytes, label: str, *, providers=None, intra_op_num_threads: int | None = None,
              graph_check=None):
    """(onnxruntime session, ``graph_check(onnx graph)`` or None) for a model file path or bytes. A
    file that is not an ONNX model is a ValueError naming ``label`` (onnx's DecodeError,
    onnxruntime's InvalidProtobuf / Fail are not errors a caller should have to know).

    A file is checked against its recorded sha256 first (``verified_file``): a changed or unknown
    file is refused before onnx or onnxruntime parse a byte of it. Bytes are models built in memory
    (the smoke stand-ins), nothing read from disk."""
    import onnx
    import onnxruntime

    from pipeline.models.registry import verified_file

    if not isinstance(model, bytes):
        model = str(verified_file(model, "ONNX model"))

    options = onnxruntime.SessionOptions()
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = int(intra_op_num_threads)
    try:
        checked = None
        if graph_check is not None:
            parsed = (onnx.load_from_string(model) if isinstance(model, bytes)
                      else onnx.load(model, load_external_data=False))
            checked = graph_check(parsed.graph)
        session = onnxruntime.InferenceSession(model, sess_options=options,
                                               providers=list(providers or default_providers()))
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise ValueError(f"{label}: could not load it as an ONNX model: {e}") from e
    return session, checked
