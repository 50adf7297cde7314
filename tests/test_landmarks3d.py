"""Landmarks3D (insightface 1k3d68) against tiny ONNX stand-ins with the official signature.

The stand-in has 1k3d68's input (``data``, 1x3x192x192 float) and output ([1, 3309], the 68 points x 3 in
the last 204 values, normalised so that crop pixel = (v + 1) * 96). It plants a 68-point face, rotated by a
known yaw / pitch / roll, at known crop positions, except that
* point 0 = the centroid of "red" in the network input (channel 0 minus channel 2) and point 1 = that of
  "blue": drawn at known *image* positions, they pin the warp into the crop, its inverse and the channel
  order (RGB in, as insightface feeds the network after ``swapRB=True`` on its BGR image);
* the z of point 2 = the network input's green value at crop pixel (10, 12): it pins the normalisation
  (the image there is green 200, so (200 - 127.5) / 128 whichever side normalises).
The returned points must be the planted ones mapped back with the box's transform, written out here from
insightface's definition (centre = box centre, scale = 192 / (1.5 * max(w, h)); image = centre +
(crop - 96) / scale, z / scale), not with the module's own helpers.

1k3d68.onnx is pinned to insightface's sha256, so the stand-ins carry their own (registered) name.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from model_files import register  # noqa: E402
from pipeline.faces.landmarks3d import Landmarks3D, graph_normalises_input, pose_from_landmarks3d  # noqa: E402
from pipeline.scoring import pose  # noqa: E402

S = 192
HALF = S // 2
STANDIN = "lmk3d_standin.onnx"  # 1k3d68's signature, not its weights
IMG_H, IMG_W = 360, 500  # non-square image
BOX = (170.0, 70.0, 350.0, 310.0)  # w 180, h 240 -> centre (260, 190), scale 192 / 360
RED_AT = (231.3, 152.7)  # image pixels
BLUE_AT = (300.4, 240.2)
PROBE = (10, 12)  # crop pixel (x, y) whose green value is planted as z of point 2
GREEN = 200
ANGLES = {"yaw": 35.0, "pitch": -15.0, "roll": 20.0}  # of the planted face
PX_PER_CM = 5.0  # face size in the crop


def face68() -> np.ndarray:
    """insightface's 68-point mean shape [68, 3] in OpenCV axes (x image right, y down, z away from the camera),
    scaled to about 14 cm across (the units of PX_PER_CM)."""
    return pose.meanshape_68().astype(np.float64) * [1.0, 1.0, -1.0] * 11.2


def planted_crop_points() -> np.ndarray:
    """[68, 3] crop pixels of the rotated face (z relative to the head centre, crop pixel units)."""
    R = pose.rotation_from_euler(ANGLES["yaw"], ANGLES["pitch"], ANGLES["roll"])
    return face68() @ R.T * PX_PER_CM + [HALF, HALF + 5, 0.0]


def box_scale(box=BOX) -> float:
    x0, y0, x1, y1 = box
    return S / (1.5 * max(x1 - x0, y1 - y0))


def crop_to_image(pts: np.ndarray, box=BOX) -> np.ndarray:
    x0, y0, x1, y1 = box
    s = box_scale(box)
    out = np.array(pts, np.float64)
    out[:, 0] = (x0 + x1) / 2 + (out[:, 0] - HALF) / s
    out[:, 1] = (y0 + y1) / 2 + (out[:, 1] - HALF) / s
    out[:, 2] = out[:, 2] / s
    return out


def image_to_crop(xy, box=BOX) -> np.ndarray:
    x0, y0, x1, y1 = box
    s = box_scale(box)
    return np.array([(xy[0] - (x0 + x1) / 2) * s + HALF, (xy[1] - (y0 + y1) / 2) * s + HALF])


def make_image() -> np.ndarray:
    """RGB, green 200 background, a red and a blue Gaussian spot (sigma 5 px) at RED_AT / BLUE_AT."""
    yy, xx = np.mgrid[:IMG_H, :IMG_W].astype(np.float64)
    img = np.zeros((IMG_H, IMG_W, 3))
    img[..., 1] = GREEN
    for (cx, cy), ch in ((RED_AT, 0), (BLUE_AT, 2)):
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 5.0 ** 2))
        g[g < 1e-3] = 0
        img[..., ch] += 255 * g
        img[..., 1] *= 1 - g
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


class FakeLandmark3D(torch.nn.Module):
    def __init__(self, planted_norm: np.ndarray, normalise_in_graph: bool = False, width: int = 3309):
        super().__init__()
        self.normalise_in_graph = normalise_in_graph
        self.register_buffer("filler", torch.linspace(-1, 1, width - 68 * 3))  # the other regression targets
        self.register_buffer("planted", torch.tensor(planted_norm, dtype=torch.float32))
        self.register_buffer("grid", torch.arange(S, dtype=torch.float32))

    def _centroid(self, w):  # [S, S] weights -> normalised (x, y)
        total = w.sum() + 1e-12
        cx = (w * self.grid[None, :w.shape[1]]).sum() / total
        cy = (w * self.grid[:w.shape[0], None]).sum() / total
        return cx / HALF - 1, cy / HALF - 1

    def forward(self, x):
        if self.normalise_in_graph:  # as insightface models that carry their own Sub / Mul input nodes
            x = (x - 127.5) * (1.0 / 128.0)
        red = self._centroid(torch.relu(x[0, 0] - x[0, 2]))
        blue = self._centroid(torch.relu(x[0, 2] - x[0, 0]))
        p = self.planted
        p0 = torch.stack([red[0], red[1], p[0, 2]])
        p1 = torch.stack([blue[0], blue[1], p[1, 2]])
        p2 = torch.stack([p[2, 0], p[2, 1], x[0, 1, PROBE[1], PROBE[0]]])
        lm = torch.cat([p0[None], p1[None], p2[None], p[3:]], 0).reshape(1, -1)
        return torch.cat([self.filler[None], lm], 1)


def export(module, path, input_shape=(1, 3, S, S)):
    torch.onnx.export(module, (torch.zeros(*input_shape),), str(path), input_names=["data"],
                      output_names=["fc1"], dynamo=False)
    m = onnx.load(str(path))
    for i, node in enumerate(m.graph.node):  # deterministic names that insightface's check does not match
        node.name = f"node{i}"
    if getattr(module, "normalise_in_graph", False):
        first = {op: next(i for i, n in enumerate(m.graph.node) if n.op_type == op) for op in ("Sub", "Mul")}
        assert max(first.values()) < 8
        m.graph.node[first["Sub"]].name = "Sub_0"  # named like the converted insightface graphs
        m.graph.node[first["Mul"]].name = "Mul_1"
    onnx.save(m, str(path))
    return register(path)  # loaders refuse weights without a recorded sha256


@pytest.fixture(scope="module")
def planted():
    crop = planted_crop_points()
    return crop, (crop / HALF - np.array([1.0, 1.0, 0.0]))  # network output: crop = (v + 1) * 96, z = v * 96


@pytest.fixture(scope="module")
def models(tmp_path_factory, planted):
    d = tmp_path_factory.mktemp("lmk3d")
    (d / "plain").mkdir()
    (d / "graphnorm").mkdir()
    return {
        "plain": export(FakeLandmark3D(planted[1]), d / "plain" / STANDIN),
        "graphnorm": export(FakeLandmark3D(planted[1], normalise_in_graph=True), d / "graphnorm" / STANDIN),
        "2d106": export(FakeLandmark3D(planted[1], width=212), d / "2d106det.onnx"),
        "nonsquare": export(FakeLandmark3D(planted[1]), d / "nonsquare.onnx", input_shape=(1, 3, S, 160)),
    }


def expected_points(planted_crop: np.ndarray) -> np.ndarray:
    crop = planted_crop.copy()
    crop[0, :2] = image_to_crop(RED_AT)
    crop[1, :2] = image_to_crop(BLUE_AT)
    crop[2, 2] = (GREEN - 127.5) / 128 * HALF
    return crop_to_image(crop)


@pytest.mark.parametrize("variant", ["plain", "graphnorm"])
def test_points_are_the_planted_ones_in_image_pixels(models, planted, variant):
    lm = Landmarks3D.from_model_dir(models[variant].parent, STANDIN)
    assert lm.name == f"insightface:{STANDIN}" and lm.input_size == (S, S)
    assert (lm.input_mean, lm.input_std) == ((0.0, 1.0) if variant == "graphnorm" else (127.5, 128.0))
    assert lm.providers[-1] == "CPUExecutionProvider"
    out = lm(make_image(), np.array(BOX, np.float32))
    assert out.shape == (68, 3) and out.dtype == np.float32
    want = expected_points(planted[0])
    err = np.abs(out - want)
    assert err[3:].max() < 0.01, err[3:].max()  # planted constants: exact up to float32
    assert err[:2, :2].max() < 1.0, err[:2]  # red / blue centroids: warp, inverse and channel order
    assert err[2, 2] < 1.0, (out[2, 2], want[2, 2])  # normalisation
    assert out[0, 0] < out[1, 0] and out[0, 1] < out[1, 1]  # red is left of and above blue (RGB, not BGR)


def test_pose_of_the_planted_face(models, planted):
    lm = Landmarks3D.from_model_dir(models["plain"].parent, STANDIN)
    out = lm(make_image(), BOX)
    # the planted face seen through the box's transform has the planted pose ...
    want = (ANGLES["pitch"], ANGLES["yaw"], ANGLES["roll"])
    assert pose_from_landmarks3d(crop_to_image(planted[0])) == pytest.approx(want, abs=1e-3)
    # ... and the model's output (points 0 and 1 moved to the colour spots) gives the pose of those points
    assert pose_from_landmarks3d(out) == pytest.approx(pose_from_landmarks3d(expected_points(planted[0])), abs=0.05)
    out[:2] = crop_to_image(planted[0])[:2]
    assert pose_from_landmarks3d(out) == pytest.approx(want, abs=0.05)


def test_pose_angles_and_sign_conventions():
    rng = np.random.default_rng(0)
    shape = face68()
    for yaw, pitch, roll in [(0, 0, 0), (60, 0, 0), (-45, 25, -30), (20, -35, 40), (-80, 10, 5)]:
        R = pose.rotation_from_euler(yaw, pitch, roll)
        img = shape @ R.T * 9.0 + [300, 250, 0] + rng.normal(0, 0.3, (68, 3))  # pixels, 0.3 px noise
        assert pose_from_landmarks3d(img) == pytest.approx((pitch, yaw, roll), abs=1.0)
    # yaw > 0: the face turns towards image right, so the nose tip moves right of the eyes' midpoint
    turned = shape @ pose.rotation_from_euler(30, 0, 0).T
    assert turned[30, 0] > (turned[39, 0] + turned[42, 0]) / 2
    # pitch > 0: chin up, so the nose tip rises relative to the eye corners
    up = shape @ pose.rotation_from_euler(0, 20, 0).T
    assert up[30, 1] - up[[36, 45], 1].mean() < shape[30, 1] - shape[[36, 45], 1].mean()
    # roll > 0: counter-clockwise on screen, as cv2.getRotationMatrix2D rotates an image by a positive angle
    import cv2

    frontal = shape[:, :2] * 9.0 + [300, 250]
    A = cv2.getRotationMatrix2D((300.0, 250.0), 25.0, 1.0)
    rolled = frontal @ A[:, :2].T + A[:, 2]
    assert pose_from_landmarks3d(rolled) == pytest.approx((0.0, 0.0, 25.0), abs=1.0)


def test_graph_normalisation_detection_follows_insightface_node_names(tmp_path):
    from onnx import TensorProto, helper

    def graph_file(names, name):
        nodes, prev = [], "data"
        for i, n in enumerate(names):
            nodes.append(helper.make_node("Identity", [prev], [f"t{i}"], name=n))
            prev = f"t{i}"
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1])])
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(g), str(path))
        return register(path)

    assert graph_normalises_input(graph_file(["_minusscalar0", "_mulscalar0", "conv0"], "mx"))
    assert graph_normalises_input(graph_file(["a", "bn_data", "c"], "bn"))
    assert not graph_normalises_input(graph_file(["a", "b", "c", "bn_data"], "bn_late"))
    assert not graph_normalises_input(graph_file(["Sub_0", "conv"], "sub_only"))
    assert not graph_normalises_input(graph_file(["c"] * 8 + ["Sub_0", "Mul_1"], "late"))


def test_missing_model_file_names_path_and_fetch_hint(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Landmarks3D.from_model_dir(tmp_path)
    assert str((tmp_path / "1k3d68.onnx").resolve()) in str(e.value)
    assert "python jobs/fetch_models.py --profile full --dir MODELS" in str(e.value)
    with pytest.raises(FileNotFoundError, match="model_dir"):
        Landmarks3D.from_model_dir(None)
    with pytest.raises(FileNotFoundError, match="fetch_models"):
        Landmarks3D(tmp_path / "nope.onnx")


def test_wrong_signature_or_not_onnx_is_a_value_error(models, tmp_path):
    with pytest.raises(ValueError, match=r"2d106det\.onnx.*3309"):
        Landmarks3D(models["2d106"])
    with pytest.raises(ValueError, match=r"nonsquare\.onnx.*square"):
        Landmarks3D(models["nonsquare"])
    with pytest.raises(ValueError, match=r"2d106det\.onnx"):
        Landmarks3D.from_model_dir(models["2d106"].parent, model_file="2d106det.onnx")
    junk = register_bytes(tmp_path / "junk.onnx", b"not an onnx file")  # recorded: the ONNX parser refuses it
    with pytest.raises(ValueError, match=r"junk\.onnx: could not load it as an ONNX model"):
        Landmarks3D.from_model_dir(tmp_path, "junk.onnx")


def register_bytes(path, data: bytes):
    path.write_bytes(data)
    return register(path)


def test_bad_inputs(models):
    lm = Landmarks3D(models["plain"])
    with pytest.raises(ValueError, match="uint8"):
        lm(make_image().astype(np.float32), BOX)
    with pytest.raises(ValueError, match="box"):
        lm(make_image(), (10, 10, 10, 40))


def test_registry_entry():
    from pipeline.models.registry import FULL_MODELS

    spec = FULL_MODELS["landmarks3d"]
    assert spec.model_id == "insightface/buffalo_l:1k3d68.onnx"
    assert [f.path for f in spec.files] == ["1k3d68.onnx"]
    assert spec.files[0].url.endswith("/models/buffalo_l/1k3d68.onnx")


def test_crop_transform_matches_insightface_similarity_composition():
    # insightface face_align.transform: scale, translate by -centre * scale, rotate, translate to the crop centre
    trans = pytest.importorskip("skimage.transform")
    from pipeline.faces.landmarks3d import crop_transform

    for center, size, scale, rot in [((260.0, 190.0), 192, 0.53, 0.0), ((10.5, -3.0), 192, 1.7, 30.0)]:
        t = (trans.SimilarityTransform(scale=scale)
             + trans.SimilarityTransform(translation=(-center[0] * scale, -center[1] * scale))
             + trans.SimilarityTransform(rotation=np.deg2rad(rot))
             + trans.SimilarityTransform(translation=(size / 2, size / 2)))
        assert np.allclose(crop_transform(center, size, scale, rot), t.params[:2], atol=1e-9)
