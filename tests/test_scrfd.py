"""ScrfdDetector against tiny ONNX stand-ins for insightface SCRFD (no real weights needed).

The stand-in model has SCRFD's input (``input.1``, NCHW, dynamic H and W) and its outputs in SCRFD's
order and shapes (scores for strides 8/16/32, then boxes, then keypoints; 2 anchors per location, rows
ordered y, x, anchor). Its score at a cell is high where the *network's* channel 0 (red) is bright and
channel 2 (blue) dark, so a red patch in the RGB image is "a face" and a blue one is not: this pins the
channel order and the (x - 127.5) / 128 normalisation. Every anchor regresses distances that decode to
one planted box and five keypoints given in network-input pixels, so the decoded result must equal the
planted geometry divided by insightface's letterbox ``det_scale``.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from model_files import register  # noqa: E402
from pipeline.faces.scrfd import ScrfdDetector, nms  # noqa: E402

INPUT = 640
# planted face, network-input (640x640 letterboxed) pixels
BOX = np.array([256.0, 128.0, 384.0, 288.0], dtype=np.float32)
KPS = np.array([[290, 180], [350, 182], [320, 220], [296, 255], [344, 254]], dtype=np.float32)


class FakeScrfd(torch.nn.Module):
    def __init__(self, strides=(8, 16, 32), num_anchors=2, kps=True, batched=False):
        super().__init__()
        self.strides, self.num_anchors, self.kps, self.batched = strides, num_anchors, kps, batched
        self.register_buffer("box", torch.from_numpy(BOX))
        self.register_buffer("kpts", torch.from_numpy(KPS.reshape(-1)))

    def _rows(self, t):  # [1, h, w, C] -> [h*w*A, C] (or [1, h*w*A, C]), each cell repeated per anchor
        t = torch.stack([t] * self.num_anchors, dim=3).reshape(-1, t.shape[-1])
        return t.unsqueeze(0) if self.batched else t

    def forward(self, x):
        scores, boxes, kpss = [], [], []
        for s in self.strides:
            f = torch.nn.functional.avg_pool2d(x, s)  # [1, 3, h, w]
            score = torch.sigmoid(10.0 * (f[:, 0] - f[:, 2]) - 5.0).unsqueeze(-1)  # [1, h, w, 1]
            ones = torch.ones_like(f[:, 0])  # [1, h, w]
            cx = (torch.cumsum(ones, dim=2) - 1.0) * s  # anchor centre x (insightface: cell index * stride)
            cy = (torch.cumsum(ones, dim=1) - 1.0) * s
            b = self.box
            dist = torch.stack([cx - b[0], cy - b[1], b[2] - cx, b[3] - cy], dim=-1) / s
            k = self.kpts
            kd = torch.stack([(k[i] - cx) if i % 2 == 0 else (k[i] - cy) for i in range(10)], dim=-1) / s
            scores.append(self._rows(score))
            boxes.append(self._rows(dist))
            kpss.append(self._rows(kd))
        return tuple(scores + boxes + (kpss if self.kps else []))


def export(module, path, n_out=None):
    n_out = n_out or len(module.strides) * (3 if module.kps else 2)
    torch.onnx.export(module, (torch.zeros(1, 3, INPUT, INPUT),), str(path), input_names=["input.1"],
                      output_names=[f"out{i}" for i in range(n_out)],
                      dynamic_axes={"input.1": {2: "height", 3: "width"}}, dynamo=False)
    return register(path)  # loaders refuse weights without a recorded sha256


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("scrfd")
    return {
        "9": export(FakeScrfd(), d / "det_9.onnx"),
        "9b": export(FakeScrfd(batched=True), d / "det_9b.onnx"),
        "6": export(FakeScrfd(kps=False), d / "det_6.onnx"),
        "15": export(FakeScrfd(strides=(8, 16, 32, 64, 128), num_anchors=1), d / "det_15.onnx"),
    }


def det_scale(h, w, size=INPUT):
    # insightface model_zoo/scrfd.py SCRFD.detect: int-truncated resized side / original side
    new_h = size if h / w > 1 else int(size * h / w)
    return new_h / h


def face_image(h, w, color=(255, 0, 0)):
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = np.round(BOX / det_scale(h, w)).astype(int)
    img[y0:y1, x0:x1] = color
    return img


def test_official_9_output_signature(models):
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(models["9"]), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input.1"
    outs = sess.run(None, {"input.1": np.zeros((1, 3, INPUT, INPUT), np.float32)})
    assert [o.shape for o in outs] == [(12800, 1), (3200, 1), (800, 1), (12800, 4), (3200, 4), (800, 4),
                                       (12800, 10), (3200, 10), (800, 10)]


@pytest.mark.parametrize("variant", ["9", "9b", "15"])
@pytest.mark.parametrize("hw", [(480, 720), (720, 480), (640, 640)])
def test_decodes_planted_face(models, variant, hw):
    det = ScrfdDetector(models[variant], input_size=INPUT, min_confidence=0.5)
    assert det.name == f"insightface-scrfd:{models[variant].name}"
    assert det.batched == (variant == "9b") and det.use_kps
    faces = det.detect(face_image(*hw))
    assert len(faces) == 1  # every anchor on the patch decodes to the same box: NMS keeps one
    f = faces[0]
    scale = det_scale(*hw)
    assert f.box.dtype == np.float32 and f.box.shape == (4,)
    np.testing.assert_allclose(f.box, BOX / scale, atol=0.05)
    assert f.kps5.dtype == np.float32 and f.kps5.shape == (5, 2)
    np.testing.assert_allclose(f.kps5, KPS / scale, atol=0.05)
    assert f.score > 0.99 and f.landmarks is None


def test_six_outputs_no_keypoints(models):
    det = ScrfdDetector(models["6"])
    assert not det.use_kps
    (f,) = det.detect(face_image(480, 720))
    np.testing.assert_allclose(f.box, BOX / det_scale(480, 720), atol=0.05)
    assert f.kps5 is None


def test_channel_order_and_threshold(models):
    det = ScrfdDetector(models["9"])
    # blue in RGB would look red to the network if the channels were swapped
    assert det.detect(face_image(480, 720, color=(0, 0, 255))) == []
    assert det.detect(np.zeros((480, 720, 3), np.uint8)) == []
    # a dim red patch (R=100: network channel 0 - channel 2 = 0.78, score sigmoid(10 * 0.78 - 5) ~ 0.94)
    # passes the default threshold and is dropped by a higher one
    dim = face_image(480, 720, color=(100, 0, 0))
    (f,) = det.detect(dim)
    assert 0.5 < f.score < 0.99
    assert ScrfdDetector(models["9"], min_confidence=0.99).detect(dim) == []


def test_nms_keeps_best_first():
    dets = np.array([[0, 0, 10, 10, 0.6], [1, 1, 11, 11, 0.9], [50, 50, 60, 60, 0.7]], np.float32)
    assert nms(dets) == [1, 2]


def test_missing_model_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_models.py --profile full"):
        ScrfdDetector.from_model_dir(None)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ScrfdDetector.from_model_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as e:
        ScrfdDetector.from_model_dir(tmp_path, model_file="det_10g.onnx")
    assert str(tmp_path / "det_10g.onnx") in str(e.value)
    assert "python jobs/fetch_models.py --profile full --dir MODELS" in str(e.value)


def test_from_model_dir_finds_buffalo_l_layout(tmp_path, models):
    # det_10g.onnx is pinned to insightface's sha256: a stand-in gets its own (registered) name
    (tmp_path / "buffalo_l").mkdir()
    (tmp_path / "buffalo_l" / "scrfd_standin.onnx").write_bytes(models["9"].read_bytes())
    register(tmp_path / "buffalo_l", root=tmp_path)
    det = ScrfdDetector.from_model_dir(tmp_path, model_file="scrfd_standin.onnx", input_size=640, min_confidence=0.5)
    assert det.name == "insightface-scrfd:scrfd_standin.onnx"


class NotScrfd(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))


def test_wrong_signature(tmp_path):
    path = export(NotScrfd(), tmp_path / "classifier.onnx", n_out=2)
    with pytest.raises(ValueError, match=r"classifier\.onnx.*not an SCRFD detector.*2 outputs"):
        ScrfdDetector(path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    register(junk)  # recorded, so the ONNX parser is what refuses it
    with pytest.raises(ValueError, match=r"junk\.onnx: could not load it as an ONNX model"):
        ScrfdDetector(junk)
