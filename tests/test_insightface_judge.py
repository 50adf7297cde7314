"""insightface 2.x as the judge: its own ``model_zoo`` classes run on the same ONNX files, images and boxes as
ours, and the answers must agree.

* ``insightface.model_zoo.scrfd.SCRFD`` vs ``pipeline.faces.scrfd.ScrfdDetector``: boxes, scores, 5 keypoints.
* ``insightface.model_zoo.landmark.Landmark`` vs ``pipeline.faces.landmarks3d.Landmarks3D``: the 68 x 3 points,
  and its ``face.pose`` vs ``pose_from_landmarks3d`` (pitch and yaw equal, roll negated: the project's roll is
  counter-clockwise on screen, insightface's clockwise; pipeline/scoring/pose.py).
* ``meanshape_68.pkl`` shipped in the wheel vs our ``pipeline/scoring/meanshape_68.npy``.

The ONNX files are stand-ins with the official signatures (built here: model hubs are unreachable), whose
outputs depend on the image so that decoding, ordering and NMS are exercised on many different candidates.
insightface 2.x defaults to detecting at two sizes (128 and 640) when the model's input is dynamic; we detect at
one size (``detect.scrfd_input_size``, 640: insightface 0.7's ``FaceAnalysis`` default), so the judge is given
``input_size=(640, 640)``. Skipped when insightface is not installed (``make setup`` installs it).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
insightface = pytest.importorskip("insightface")

from insightface.app.common import Face as IFace  # noqa: E402
from insightface.model_zoo.landmark import Landmark  # noqa: E402
from insightface.model_zoo.scrfd import SCRFD  # noqa: E402

from model_files import register  # noqa: E402
from pipeline.faces.landmarks3d import Landmarks3D, pose_from_landmarks3d  # noqa: E402
from pipeline.faces.scrfd import ScrfdDetector  # noqa: E402
from pipeline.scoring import pose  # noqa: E402


def test_judge_is_insightface_2():
    assert int(insightface.__version__.split(".")[0]) >= 2


def test_meanshape_npy_is_insightfaces_pickle():
    from insightface.data import get_object

    theirs = get_object("meanshape_68.pkl")  # the test may unpickle the package's own file; the pipeline never does
    assert theirs.dtype == np.float32 and np.array_equal(pose.meanshape_68(), theirs)


# ---------------------------------------------------------------- SCRFD


class VaryingScrfd(torch.nn.Module):
    """SCRFD's outputs (9: scores, boxes, keypoints for strides 8/16/32, 2 anchors per cell) where every anchor
    has its own score, box and keypoints, all smooth functions of the image around it."""

    def __init__(self, strides=(8, 16, 32), num_anchors=2):
        super().__init__()
        self.strides, self.num_anchors = strides, num_anchors

    def _rows(self, t):  # [1, C, h, w] -> [h*w*A, C], anchor a of a cell scaled by (1 + a / 4)
        t = t[0].permute(1, 2, 0)
        t = torch.stack([t * (1 + a / 4) for a in range(self.num_anchors)], dim=2)
        return t.reshape(-1, t.shape[-1])

    def forward(self, x):
        scores, boxes, kpss = [], [], []
        for s in self.strides:
            f = torch.nn.functional.avg_pool2d(x, s)  # [1, 3, h, w], normalised pixels
            r, g, b = f[:, 0:1], f[:, 1:2], f[:, 2:3]
            scores.append(torch.sigmoid(6.0 * (r - b) + 2.0 * g)[0].permute(1, 2, 0).reshape(-1, 1)
                          .repeat_interleave(self.num_anchors, 0))
            dist = torch.cat([1.5 + r.abs(), 1.2 + g.abs(), 1.7 + b.abs(), 2.0 + (r - g).abs()], 1)
            boxes.append(self._rows(dist))
            kps = torch.cat([(r - g) * k + b * (k % 3) for k in range(10)], 1)
            kpss.append(self._rows(kps))
        return tuple(scores + boxes + kpss)


@pytest.fixture(scope="module")
def scrfd_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge_scrfd") / "scrfd_standin.onnx"  # det_10g.onnx is pinned to the real file
    torch.onnx.export(VaryingScrfd(), (torch.zeros(1, 3, 640, 640),), str(path), input_names=["input.1"],
                      output_names=[f"out{i}" for i in range(9)],
                      dynamic_axes={"input.1": {2: "height", 3: "width"}}, dynamo=False)
    return register(path)  # loaders refuse weights without a recorded sha256


def _test_images():
    import skimage.data

    yield "astronaut", skimage.data.astronaut()
    yield "chelsea 300x451", skimage.data.chelsea()
    rng = np.random.default_rng(3)
    yield "noise 480x720", rng.integers(0, 256, (480, 720, 3), dtype=np.uint8)


def _judge_scrfd(path, threshold):
    judge = SCRFD(model_file=str(path))
    judge.prepare(-1, input_size=(640, 640), det_thresh=threshold)
    return judge


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_scrfd_equals_insightface(scrfd_file, threshold):
    ours = ScrfdDetector(scrfd_file, input_size=640, min_confidence=threshold)
    judge = _judge_scrfd(scrfd_file, threshold)
    for name, rgb in _test_images():
        det, kps = judge.detect(np.ascontiguousarray(rgb[..., ::-1]), input_size=(640, 640))  # insightface: BGR
        faces = ours.detect(rgb)
        assert len(det) >= 5, (name, len(det))  # enough candidates survive NMS to compare order and values
        assert len(faces) == len(det), name
        np.testing.assert_allclose(np.stack([f.box for f in faces]), det[:, :4], rtol=0, atol=1e-3, err_msg=name)
        np.testing.assert_allclose([f.score for f in faces], det[:, 4], rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.stack([f.kps5 for f in faces]), kps, rtol=0, atol=1e-3, err_msg=name)


# ---------------------------------------------------------------- 1k3d68 landmarks and pose


class VaryingLandmark3D(torch.nn.Module):
    """1k3d68's signature ([1, 3, 192, 192] -> [1, 3309], the 68 x 3 points last, crop = (v + 1) * 96): the
    mean shape turned by a known pose, each point moved by a smooth function of the crop's colours."""

    def __init__(self, yaw=25.0, pitch=-10.0, roll=15.0):
        super().__init__()
        pts = pose.meanshape_posed(yaw, pitch, roll, scale=0.45)  # normalised crop units around the centre
        self.register_buffer("base", torch.tensor(pts, dtype=torch.float32))
        self.register_buffer("gain", torch.linspace(-0.02, 0.02, 68 * 3).reshape(68, 3))
        self.register_buffer("filler", torch.linspace(-1, 1, 3309 - 204))

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 2).reshape(-1)  # 12 colour means
        wobble = self.gain * (f[:3].sum() - f[9:].sum()) / 255.0
        return torch.cat([self.filler, (self.base + wobble).reshape(-1)])[None]


@pytest.fixture(scope="module")
def landmark_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge_lmk") / "lmk3d_standin.onnx"  # 1k3d68.onnx is pinned to the real file
    torch.onnx.export(VaryingLandmark3D(), (torch.zeros(1, 3, 192, 192),), str(path), input_names=["data"],
                      output_names=["fc1"], dynamo=False)
    return register(path)  # loaders refuse weights without a recorded sha256


@pytest.mark.parametrize("box", [(180.0, 150.0, 330.0, 350.0), (10.0, -40.0, 250.0, 160.0), (300.5, 220.25, 420.75, 380.0)])
def test_landmarks_and_pose_equal_insightface(landmark_file, box):
    import skimage.data

    rgb = skimage.data.astronaut()
    ours = Landmarks3D(landmark_file)
    judge = Landmark(model_file=str(landmark_file))
    assert (judge.input_mean, judge.input_std) == (ours.input_mean, ours.input_std) and judge.require_pose
    face = IFace(bbox=np.array(box, np.float32))
    theirs = judge.get(np.ascontiguousarray(rgb[..., ::-1]), face)  # insightface: BGR
    pts = ours(rgb, box)
    np.testing.assert_allclose(pts, theirs, rtol=0, atol=1e-3)
    pitch_if, yaw_if, roll_if = (float(v) for v in face["pose"])
    assert pose_from_landmarks3d(pts) == pytest.approx((pitch_if, yaw_if, -roll_if), abs=1e-3)
    assert pose.insightface_angles(theirs) == pytest.approx((pitch_if, yaw_if, roll_if), abs=1e-3)


def test_scrfd_box_into_1k3d68_as_faceanalysis(scrfd_file, landmark_file):
    """insightface's FaceAnalysis chain (SCRFD box -> Landmark.get) against ours on the same image."""
    import skimage.data

    rgb = skimage.data.astronaut()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    det, _ = _judge_scrfd(scrfd_file, 0.5).detect(bgr, input_size=(640, 640))
    judge = Landmark(model_file=str(landmark_file))
    face = ScrfdDetector(scrfd_file, input_size=640, min_confidence=0.5).detect(rgb)[0]
    theirs = IFace(bbox=det[0, :4])
    pts = judge.get(bgr, theirs)
    np.testing.assert_allclose(Landmarks3D(landmark_file)(rgb, face.box), pts, rtol=0, atol=1e-3)
    assert pose_from_landmarks3d(pts) == pytest.approx(tuple(np.array(theirs["pose"]) * [1, 1, -1]), abs=1e-3)
