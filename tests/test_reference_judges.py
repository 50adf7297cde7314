"""Maintained packages of the reference code as judges of our SyncNet and DWPose processing.

Each test loads the SAME weights into our implementation and into the reference package, feeds
both the same real frames, and asserts the outputs equal within float tolerance.

- SyncNet: ``syncnet-python`` (PyPI), a packaging of joonson/syncnet_python. Its
  ``SyncNetInstance.evaluate`` runs on a directory of JPEG crops plus a 16 kHz ``audio.wav`` (no
  ffmpeg), so it runs as published on the crops and audio we score. Its ``SyncNetModel.S`` is the
  full-size network only (224 px, 1024-d), so the judged weights are a random full-size state dict
  in the ``syncnet_v2.model`` layout; the tiny 64 px models of other tests do not fit ``S``.
  ``SyncNetPipeline._crop`` (their ``crop_video``) judges ``syncnet_crop``.
- DWPose: ``rtmlib``'s ``RTMPose`` (the RTMPose/DWPose top-down pre- and post-processing that
  its ``Wholebody(mode=...)`` uses, 288x384 for DWPose) on the same ONNX file and image.

The packages are installed without their dependencies (``make setup``): each test skips
cleanly when its judge is absent.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from model_files import register
from pipeline.features import dwpose as dw
from pipeline.media import decode_audio, iter_frames
from pipeline.scoring import syncnet as sn
from tests.conftest import real_path

def _judge(module: str):
    """Import a judge or skip: ImportError too, not only a missing module, because
    syncnet_python's __init__ raises ImportError when a package it imports (scenedetect) is absent."""
    return pytest.importorskip(module, exc_type=ImportError)


CLIP = "wda_aoc_000.mp4"  # a real speaker, already 512x512 at 25 fps
N_FRAMES = 40  # 35 SyncNet windows


@pytest.fixture(scope="module")
def real_frames() -> np.ndarray:
    path = str(real_path(CLIP))
    return np.stack([f for _, f in iter_frames(path, end_s=N_FRAMES / sn.FPS)])[:N_FRAMES]


@pytest.fixture(scope="module")
def real_audio_pcm() -> np.ndarray:
    """The clip's first N_FRAMES * 640 samples at 16 kHz as int16 (what the reference reads from WAV)."""
    audio, _ = decode_audio(str(real_path(CLIP)), sn.SAMPLE_RATE)
    audio = audio[: N_FRAMES * sn.SAMPLE_RATE // sn.FPS]
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


@pytest.fixture(scope="module")
def face_box(real_frames) -> np.ndarray:
    """The face box of frame 0 from the pipeline's detector (BlazeFace)."""
    pytest.importorskip("mediapipe")
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector

    faces = MediaPipeFaceDetector(landmarks=False, ranges="short").detect(real_frames[0])
    assert faces, f"no face found in {CLIP} frame 0"
    return faces[0].box.astype(np.float64)


# ----------------------------------------------------------------------------- SyncNet


def _official_layout_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random full-size SyncNet state dict with the ``syncnet_v2.model`` keys (no
    num_batches_tracked, as the published file). BatchNorm statistics and affines are random
    too, so a BatchNorm that runs in training mode on either side would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sd = sn.SyncNet().state_dict()
    batchnorms = {k[: -len("running_mean")] for k in sd if k.endswith("running_mean")}
    out = {}
    for k, v in sd.items():
        prefix, name = k.rsplit(".", 1)
        if name == "num_batches_tracked":
            continue
        if prefix + "." in batchnorms:
            scale, base = {"running_var": (1.5, 0.5), "weight": (0.2, 0.9)}.get(name, (0.2, -0.1))
            v = torch.rand(v.shape, generator=gen) * scale + base
        out[k] = v
    return out


class _Recorder:
    """Wraps a reference function: calls it unchanged and keeps its arguments and result."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


def test_syncnet_scores_equal_syncnet_python_on_a_real_clip(tmp_path, monkeypatch, real_frames, real_audio_pcm,
                                                            face_box):
    """Same weights, same crops, same 16 kHz audio: our offset / Sync-C / Sync-D / per-frame
    confidence equal SyncNetInstance.evaluate's."""
    ref_instance = _judge("syncnet_python.SyncNetInstance")
    ref_pipeline = _judge("syncnet_python.syncnet_pipeline")
    import cv2
    from scipy import signal
    from scipy.io import wavfile

    weights = tmp_path / "syncnet_v2.model"
    torch.save(_official_layout_state_dict(), weights)
    ours = sn.SyncNet.from_state_dict_file(register(weights))  # loaders refuse weights without a recorded sha256
    # Their own loader (SyncNetPipeline._load_syncnet: S(), load_state_dict, eval) on the same file.
    theirs = ref_pipeline.SyncNetPipeline._load_syncnet(types.SimpleNamespace(device="cpu"), str(weights))

    # The reference reads JPEG crops with cv2.imread (BGR) and audio.wav with scipy: write ours
    # there and score the decoded JPEGs ourselves, so both sides see identical pixels.
    crop_dir = tmp_path / "pywork"
    crop_dir.mkdir()
    for i, frame in enumerate(real_frames):
        crop_rgb = sn.syncnet_crop(frame, face_box)
        assert cv2.imwrite(str(crop_dir / f"{i:06d}.jpg"), crop_rgb[..., ::-1])
    wavfile.write(crop_dir / "audio.wav", sn.SAMPLE_RATE, real_audio_pcm)
    decoded_rgb = np.stack([cv2.imread(str(crop_dir / f"{i:06d}.jpg"))[..., ::-1] for i in range(N_FRAMES)])

    # Spies that keep what evaluate computes but does not return: the embeddings and distances
    # (calc_pdist) and the per-frame confidence before and after its median filter (medfilt).
    pdist = _Recorder(ref_instance.calc_pdist)
    medfilt = _Recorder(signal.medfilt)
    monkeypatch.setattr(ref_instance, "calc_pdist", pdist)
    monkeypatch.setattr(ref_instance, "signal", types.SimpleNamespace(medfilt=medfilt))
    opt = types.SimpleNamespace(tmp_dir=str(crop_dir), batch_size=20, vshift=15)
    with torch.inference_mode():
        offset, conf, min_dist = theirs.evaluate(opt)

    res = sn.sync_scores(ours, decoded_rgb, real_audio_pcm / 32768.0, vshift=15, batch_size=20)
    im_ours, cc_ours = sn.embed(ours, decoded_rgb, real_audio_pcm / 32768.0, batch_size=20)
    (im_ref, cc_ref, *_), _, dists_ref = pdist.calls[0]
    dists_ref = torch.stack(dists_ref).numpy()  # [N, 31]
    (fconf_ref, *_), _, fconfm_ref = medfilt.calls[0]

    assert res.n_windows == len(im_ref) == N_FRAMES - 5
    assert res.offset == offset
    diffs = {
        "lip embedding": np.abs(im_ours.numpy() - im_ref.numpy()).max(),
        "audio embedding": np.abs(cc_ours.numpy() - cc_ref.numpy()).max(),
        "mdist": np.abs(res.mdist - dists_ref.mean(0)).max(),
        "Sync-C": abs(res.conf - conf),
        "Sync-D": abs(res.min_dist - min_dist),
        "frame conf": np.abs(res.frame_conf - fconf_ref).max(),
        "frame conf (medfilt 9)": np.abs(res.frame_conf_smooth - fconfm_ref).max(),
    }
    print("syncnet-python max abs diff:", {k: f"{v:.2e}" for k, v in diffs.items()})
    # Measured here: both embeddings bit-equal (identical pixels, weights and batches; our MFCC
    # rounds to the same float32 as python_speech_features'), distances within 1.5e-6 (a
    # vectorised calc_pdist against the reference loop). The bound leaves room for other BLAS.
    assert max(diffs.values()) < 1e-4, diffs
    # The offset is decided by a margin far above those differences, so its equality is no tie.
    margin = np.partition(res.mdist, 1)[1] - res.mdist.min()
    assert margin > 100 * diffs["mdist"], (margin, diffs["mdist"])


class _RecordingVideoWriter:
    """Stands in for cv2.VideoWriter in the reference's crop step: keeps each written crop
    losslessly instead of XVID-encoding it."""

    written: list[np.ndarray] = []

    def __init__(self, *args, **kwargs):
        type(self).written = []

    def write(self, frame):
        type(self).written.append(frame.copy())

    def release(self):
        pass


# The reference median-filters box tracks with scipy's zero-padded medfilt and says so for
# tracks shorter than its kernel; the constant box below is unaffected (see the comment there).
@pytest.mark.filterwarnings("ignore:kernel_size exceeds volume extent")
@pytest.mark.parametrize("shift", [(0.0, 0.0), (-90.3, -200.45), (77.45, 61.2)],
                         ids=["detected", "past-top-left", "past-bottom-right"])
def test_syncnet_crop_equals_syncnet_python_crop(tmp_path, monkeypatch, real_frames, face_box, shift):
    """syncnet_crop cuts the same pixels as the reference crop step (SyncNetPipeline._crop, i.e.
    run_pipeline.crop_video), also where the crop reaches past the frame edge at a fractional
    coordinate (int() of a negative number rounds up; the reference floors the padded one)."""
    ref_pipeline = _judge("syncnet_python.syncnet_pipeline")
    import cv2

    frame_paths = []
    for i, frame in enumerate(real_frames[:8]):
        p = tmp_path / f"{i:06d}.jpg"
        assert cv2.imwrite(str(p), frame[..., ::-1])
        frame_paths.append(str(p))
    box = face_box + np.array([*shift, *shift])
    # A constant box over 8 frames: the reference's medfilt(13) (zero-padded) keeps it unchanged
    # from the 7th value on, i.e. everywhere, so only the crop cut itself is judged here.
    track = {"frame": np.arange(len(frame_paths)), "bbox": np.tile(box, (len(frame_paths), 1))}

    job = ref_pipeline.SyncNetPipeline.__new__(ref_pipeline.SyncNetPipeline)  # no weights needed
    job.cfg = ref_pipeline.PipelineConfig(ffmpeg_bin=str(tmp_path / "no-ffmpeg"))
    cv2_proxy = types.SimpleNamespace(**{k: getattr(cv2, k) for k in dir(cv2) if not k.startswith("__")})
    cv2_proxy.VideoWriter = _RecordingVideoWriter
    monkeypatch.setattr(ref_pipeline, "cv2", cv2_proxy)
    # The crops are written before it cuts the audio with ffmpeg, which is absent by design here.
    with pytest.raises(RuntimeError, match="FFmpeg"):
        job._crop(track, frame_paths, str(tmp_path / "audio.wav"), tmp_path / "crops" / "00000")
    theirs = _RecordingVideoWriter.written
    assert len(theirs) == len(frame_paths)

    x0, y0, x1, y1 = sn.syncnet_crop_box(box)
    if shift != (0.0, 0.0):  # the case this parameter exists for: the crop leaves the frame
        assert min(x0, y0) < 0 or max(x1, y1) > real_frames.shape[1]
    for path, ref_crop in zip(frame_paths, theirs):
        our_crop = sn.syncnet_crop(cv2.imread(path), box)
        assert our_crop.shape == ref_crop.shape == (224, 224, 3)
        assert np.array_equal(our_crop, ref_crop), np.abs(our_crop.astype(int) - ref_crop).max()


# ----------------------------------------------------------------------------- DWPose


class _ImageDrivenSimCC(torch.nn.Module):
    """A SimCC net whose outputs depend on every input pixel and channel (a random 3x3 conv to
    133 maps, averaged along each axis, 2 bins per pixel): a different warp, colour order or
    normalisation moves the argmax. Its biases put some keypoint maxima below 0 so the
    "no response -> location -1" rule is exercised too."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(3, dw.NUM_KEYPOINTS, 3, padding=1)
            torch.nn.init.uniform_(self.conv.bias, -0.6, 0.4)

    def forward(self, x):
        f = self.conv(x)  # [N,133,384,288]
        sx = torch.nn.functional.interpolate(f.mean(2), scale_factor=dw.SIMCC_SPLIT_RATIO, mode="nearest")
        sy = torch.nn.functional.interpolate(f.mean(3), scale_factor=dw.SIMCC_SPLIT_RATIO, mode="nearest")
        return sx, sy


@pytest.fixture(scope="module")
def dwpose_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("dwpose") / "dw-ll_ucoco_384.onnx"
    path.write_bytes(dw.export_simcc_onnx(_ImageDrivenSimCC()))
    return register(path)


def _rtmpose(path):
    rtmlib = _judge("rtmlib")
    # As rtmlib's Wholebody for a 384x288 DWPose model: RTMPose with its default ImageNet mean/std.
    return rtmlib.RTMPose(str(path), model_input_size=(dw.INPUT_W, dw.INPUT_H), backend="onnxruntime", device="cpu")


def test_dwpose_preprocessing_equals_rtmlib(dwpose_onnx, real_frames):
    """Box padding 1.25, aspect fix, affine warp to 288x384 and mean/std: the same network input."""
    pose = _rtmpose(dwpose_onnx)
    frame = real_frames[0]
    center, scale, warp = dw.crop_box_transform(*frame.shape[:2])
    ref_input, ref_center, ref_scale = pose.preprocess(frame, [0, 0, frame.shape[1], frame.shape[0]])
    np.testing.assert_array_equal(center, ref_center)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-12)
    ours = dw.preprocess(frame, warp)  # [3,384,288] float32
    diff = np.abs(ours - ref_input.transpose(2, 0, 1)).max()
    print(f"rtmlib preprocess max abs diff: {diff:.2e}")
    assert diff < 1e-5  # float32 (ours) against float64 (rtmlib) arithmetic on identical warped pixels


def test_dwpose_keypoints_equal_rtmlib_with_the_score_rule_aligned(dwpose_onnx, real_frames, monkeypatch):
    """End to end on the same ONNX file and real frames (whole frame as the box, as DWPose does
    without a person box): locations equal rtmlib's; scores equal once rtmlib's score rule is
    set to DWPose's.

    Two documented differences, each undone here:
    - Colour order: we feed RGB (mmpose's training config, ``bgr_to_rgb=True``); rtmlib and
      DWPose's own example pass cv2's BGR image straight to the network. rtmlib gets our RGB array.
    - Score: DWPose's onnxpose.py (and mmpose 1.0) take min(max_x, max_y); rtmlib 0.0.16's 2-D
      ``get_simcc_maximum`` takes their mean. With the rule set to "min" (rtmlib's own
      ``_combine_axis_scores``) everything equals; with its default, locations where both
      rules see a response equal and its scores are >= ours.
    """
    _judge("rtmlib")
    from rtmlib.tools.pose_estimation import post_processings

    frames = real_frames[:3]
    ours = dw.DWPoseFace(dwpose_onnx, "judge")(frames)  # [T,68,3]: x, y, score of points 23..90

    def rtmlib_face(score_rule):
        combine = post_processings._combine_axis_scores
        monkeypatch.setattr(post_processings, "_combine_axis_scores",
                            lambda mx, my, method: combine(mx, my, score_rule or method))
        pose = _rtmpose(dwpose_onnx)
        out = [pose(f) for f in frames]
        monkeypatch.undo()
        return (np.stack([k[0, dw.FACE] for k, _ in out]), np.stack([s[0, dw.FACE] for _, s in out]))

    kps_min, scores_min = rtmlib_face("min")
    kps_mean, scores_mean = rtmlib_face(None)
    live = ours[..., 2] > 0
    assert 0.2 < live.mean() < 0.95, live.mean()  # both the "response" and "no response" paths run
    xy_diff = np.abs(ours[..., :2] - kps_min).max()
    score_diff = np.abs(ours[..., 2] - scores_min).max()
    print(f"rtmlib (score rule min) max abs diff: keypoints {xy_diff:.2e} px, scores {score_diff:.2e}")
    assert xy_diff < 1e-3 and score_diff < 1e-5
    # rtmlib's default rule: same points wherever both maxima are positive, and a score >= ours.
    np.testing.assert_allclose(ours[..., :2][live], kps_mean[live], atol=1e-3)
    assert (scores_mean >= ours[..., 2] - 1e-6).all()
    assert (scores_mean > ours[..., 2] + 1e-3).any()  # the rule does differ on these outputs
