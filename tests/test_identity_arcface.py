"""insightface 2.1 as the judge of ``pipeline.faces.arcface``: its own ``ArcFaceONNX`` (found by its own model
router) and ``face_align.norm_crop`` run on the same locally built ONNX file with w600k_r50's signature
(input ``input.1`` [None, 3, 112, 112], one output [1, 512]), the same images and 5 keypoints; the aligned
crops and embeddings must agree. The weights are stand-ins (model hubs are unreachable), image-dependent
and sensitive to channel order and alignment, so a wrong template, transform, channel order or
normalisation changes the answer. Skipped when insightface is not installed (``make setup`` installs it).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
insightface = pytest.importorskip("insightface")

from insightface.app.common import Face as IFace  # noqa: E402
from insightface.model_zoo import model_zoo  # noqa: E402
from insightface.model_zoo.arcface_onnx import ArcFaceONNX  # noqa: E402
from insightface.utils import face_align  # noqa: E402

from model_files import register  # noqa: E402
from pipeline.faces import arcface  # noqa: E402
from pipeline.faces.arcface import ArcFace, clip_embedding  # noqa: E402


class StandInArcFace(torch.nn.Module):
    """w600k_r50's I/O with seeded random convolutions: every output depends on every pixel and channel."""

    def __init__(self, normalise_in_graph: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.normalise_in_graph = normalise_in_graph
        self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=2)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16 * 13 * 13, 512)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(max(p[0].numel(), 1)))

    def forward(self, x):
        if self.normalise_in_graph:  # mxnet-style export: (x - 127.5) * (1 / 128) inside the graph
            x = (x - 127.5) * 0.0078125
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 13)
        return self.fc(x.flatten(1))


def _export(path, normalise_in_graph=False):
    torch.onnx.export(StandInArcFace(normalise_in_graph), (torch.zeros(1, 3, 112, 112),), str(path),
                      input_names=["input.1"], output_names=["fc1"], dynamic_axes={"input.1": {0: "None"}},
                      dynamo=False)
    import onnx

    model = onnx.load(str(path))
    # w600k_r50's output is named "683" (torch refuses numeric names at export: renamed here)
    for node in model.graph.node:
        node.output[:] = ["683" if o == "fc1" else o for o in node.output]
    model.graph.output[0].name = "683"
    if normalise_in_graph:  # insightface recognises such graphs by node names (Sub*/Mul* among the first 8)
        for node in model.graph.node[:8]:
            if node.op_type in ("Sub", "Mul"):
                node.name = f"{node.op_type}_{node.name.strip('/').replace('/', '_')}"
    onnx.save(model, str(path))
    return register(path)  # loaders refuse weights without a recorded sha256


@pytest.fixture(scope="module")
def w600k_file(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("arcface") / "arcface_standin.onnx")  # w600k_r50.onnx is pinned


@pytest.fixture(scope="module")
def mxnet_style_file(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("arcface_mx") / "arcface_standin.onnx", normalise_in_graph=True)


def _faces():
    """(name, RGB image, 5 keypoints): frontal, turned and scaled, partly outside the frame, sub-pixel."""
    import skimage.data

    astro = skimage.data.astronaut()
    frontal = np.array([[181.0, 111.0], [237.5, 108.0], [211.0, 146.0], [186.0, 178.0], [232.0, 176.5]], np.float32)
    c = frontal.mean(0)
    a = np.deg2rad(25)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    yield "astronaut frontal", astro, frontal
    yield "astronaut rotated 25 deg x1.4", astro, ((frontal - c) @ R.T * 1.4 + c).astype(np.float32)
    yield "astronaut near the corner", astro, (frontal - [170.0, 100.0]).astype(np.float32)
    rng = np.random.default_rng(5)
    yield "noise 480x720", rng.integers(0, 256, (480, 720, 3), dtype=np.uint8), (frontal * 1.7 + 0.33).astype(np.float32)


def test_insightface_router_picks_arcfaceonnx_for_the_signature(w600k_file):
    """insightface's own model router treats the stand-in as a recognition model, as it does w600k_r50."""
    judge = model_zoo.ModelRouter(str(w600k_file)).get_model(providers=["CPUExecutionProvider"])
    assert isinstance(judge, ArcFaceONNX) and judge.taskname == "recognition"
    assert judge.input_size == (112, 112) and (judge.input_mean, judge.input_std) == (127.5, 127.5)


@pytest.mark.parametrize("which", ["w600k", "mxnet"])
def test_embeddings_equal_insightface(w600k_file, mxnet_style_file, which):
    path = w600k_file if which == "w600k" else mxnet_style_file
    ours = ArcFace(path)
    judge = ArcFaceONNX(model_file=str(path))
    judge.prepare(-1)
    assert (ours.input_mean, ours.input_std) == (judge.input_mean, judge.input_std)
    assert (judge.input_mean, judge.input_std) == ((127.5, 127.5) if which == "w600k" else (0.0, 1.0))
    crops, theirs_all = [], []
    for name, rgb, kps in _faces():
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface works on cv2's BGR images
        aligned_theirs = face_align.norm_crop(bgr, landmark=kps, image_size=112)
        aligned_ours = ours.align(rgb, kps)
        assert np.array_equal(aligned_ours, aligned_theirs[..., ::-1]), name
        face = IFace(bbox=np.zeros(4, np.float32), kps=kps)
        theirs = judge.get(bgr, face)
        mine = ours(rgb, kps)
        scale = float(np.abs(theirs).max())
        assert scale > 0.1, name  # the stand-in's output is not degenerate
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4 * scale, err_msg=name)
        np.testing.assert_allclose(arcface.normalise(mine), face.normed_embedding, rtol=0, atol=1e-5, err_msg=name)
        crops.append(aligned_ours)
        theirs_all.append(theirs)
    # a batch gives what insightface's one-at-a-time get gives
    np.testing.assert_allclose(ours.embed(crops), np.stack(theirs_all), rtol=0, atol=1e-4 * float(np.abs(theirs_all).max()))


def test_wrong_channel_order_or_template_is_caught(w600k_file):
    """The judge comparison would notice a BGR/RGB slip or a shifted template: the stand-in is sensitive to both."""
    ours = ArcFace(w600k_file)
    name, rgb, kps = next(_faces())
    right = arcface.normalise(ours(rgb, kps))
    swapped = arcface.normalise(ours(np.ascontiguousarray(rgb[..., ::-1]), kps))
    shifted = arcface.normalise(ours(rgb, kps + 3.0))
    assert float(right @ swapped) < 0.999 and float(right @ shifted) < 0.999


def test_clip_embedding_is_mean_of_normed_then_normed():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((5, 512)).astype(np.float32) * rng.uniform(1, 20, (5, 1)).astype(np.float32)
    e = clip_embedding(raw)
    expected = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(e, expected / np.linalg.norm(expected), atol=1e-6)
    assert abs(float(np.linalg.norm(e)) - 1) < 1e-6


def test_bad_files_and_signatures_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "w600k_r50.onnx"
    with pytest.raises(FileNotFoundError, match="w600k_r50.onnx"):
        ArcFace(missing)
    with pytest.raises(FileNotFoundError, match="fetch_models"):
        ArcFace.from_model_dir(tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    register(junk)  # recorded, so the ONNX parser is what refuses it
    with pytest.raises(ValueError, match="junk.onnx: could not load it as an ONNX model"):
        ArcFace(junk)
    wrong = tmp_path / "wrong.onnx"  # a 1k3d68-like signature: 192x192 in, 3309 out
    torch.onnx.export(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3309)),
                      (torch.zeros(1, 3, 192, 192),), str(wrong), input_names=["data"], output_names=["fc1"], dynamo=False)
    register(wrong)
    with pytest.raises(ValueError, match=r"wrong.onnx.*not an insightface ArcFace.*\[N, 512\]"):
        ArcFace(wrong)
    with pytest.raises(ValueError, match="5 finite"):
        ArcFace.smoke().align(np.zeros((64, 64, 3), np.uint8), np.zeros((4, 2)))


def test_smoke_stand_in_is_deterministic_with_the_official_io():
    a, b = ArcFace.smoke(), ArcFace.smoke()
    assert a.name == arcface.SMOKE_MODEL_ID and a.input_size == (112, 112) and (a.input_mean, a.input_std) == (127.5, 127.5)
    assert a.session.get_inputs()[0].name == "input.1"
    assert arcface.smoke_model_bytes(0) == arcface.smoke_model_bytes(0) != arcface.smoke_model_bytes(1)
    name, rgb, kps = next(_faces())
    np.testing.assert_array_equal(a(rgb, kps), b(rgb, kps))


def test_registry_records_licence_and_hash():
    from pipeline.models.registry import FULL_MODELS, PROFILE_MODELS

    spec = FULL_MODELS["arcface"]
    assert "arcface" in PROFILE_MODELS["full"]
    assert spec.files[0].path == "w600k_r50.onnx" and spec.model_id == "insightface/buffalo_l:w600k_r50.onnx"
    assert "non-commercial" in spec.license
    assert spec.files[0].sha256 == "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43"
    assert spec.files[0].size == 174_383_860
