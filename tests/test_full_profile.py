"""The `full` profile end to end on CPU, with weights files built here in the official formats
(model hubs are unreachable): SyncNet v2 state dict layout, an SD-1.5-structured VAE saved as
a diffusers directory, a wav2vec2 ForCTC checkpoint directory and an ONNX with DWPose's
signature. The face detector stays mediapipe (a planted-face SCRFD stand-in finds no real
faces; tests/test_scrfd.py covers SCRFD decoding). Checks that shards record the full models,
sync rules are applied, and a missing weights file stops the job before any work.

The stand-ins are registered (their sha256 recorded in models.lock.json, tests/model_files.py) as one's own
weights are; those whose registry name is pinned to the published file's sha256 (sd-vae/, 1k3d68.onnx,
w600k_r50.onnx) carry their own names, given in the config, as a user's own weights would."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model_files import register
from pipeline.config import load_config
from pipeline.demo import make_talking_head
from pipeline.inputs import expand_inputs
from pipeline.runner import run_curation

ROOT = Path(__file__).resolve().parents[1]


def build_model_dir(d: Path) -> Path:
    from diffusers import AutoencoderKL
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from pipeline.features import dwpose, vae
    from pipeline.scoring.syncnet import SyncNet

    torch.manual_seed(0)
    sd = {k: v for k, v in SyncNet().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, d / "syncnet_v2.model")  # the published file's layout: a plain state dict
    # SD 1.5 VAE structure (key names) at a reduced width so the test stays small.
    AutoencoderKL(**dict(vae.SD15_VAE_CONFIG, block_out_channels=(8, 16, 32, 32), norm_num_groups=8)) \
        .save_pretrained(d / "vae-standin", safe_serialization=True)
    cfg = Wav2Vec2Config(hidden_size=16, conv_dim=(8,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
                         conv_kernel=(10, 3, 3, 3, 3, 2, 2), num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=20, vocab_size=32, num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2)
    Wav2Vec2ForCTC(cfg).save_pretrained(d / "wav2vec2-base-960h", safe_serialization=True)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(d / "wav2vec2-base-960h")
    (d / "dw-ll_ucoco_384.onnx").write_bytes(dwpose.build_smoke_onnx())
    from pipeline.faces.arcface import smoke_model_bytes

    (d / "arcface_standin.onnx").write_bytes(smoke_model_bytes())  # w600k_r50's signature (input.1 Nx3x112x112 -> [N, 512])
    # insightface 1k3d68 signature (input "data" 1x3x192x192, output [1, 3309]) returning a 68-point
    # face at a known pose, so the clip's pose scores must come from this model.
    from test_landmarks3d import ANGLES, HALF, planted_crop_points

    planted = planted_crop_points() / HALF - np.array([1.0, 1.0, 0.0])

    class ConstantFace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("out", torch.cat([torch.zeros(3309 - 204),
                                                   torch.tensor(planted, dtype=torch.float32).reshape(-1)])[None])

        def forward(self, x):
            return self.out + 0 * x.mean()

    torch.onnx.export(ConstantFace(), (torch.zeros(1, 3, 192, 192),), str(d / "lmk3d_standin.onnx"),
                      input_names=["data"], output_names=["fc1"], dynamo=False)
    register(d)  # every file's sha256 in d/models.lock.json: the loaders refuse unrecorded weights
    return d, ANGLES


# the stand-ins of the pinned models, named in the config as one's own weights are
STANDIN_CONFIG = ("score:\n  arcface_model: arcface_standin.onnx\n  landmarks3d_model: lmk3d_standin.onnx\n"
                  "features:\n  vae_model: vae-standin\n  batch_size: 8\n")


@pytest.mark.slow
def test_full_profile_end_to_end(tmp_path, ray_local):
    (tmp_path / "models").mkdir()
    models, angles = build_model_dir(tmp_path / "models")
    # 3.6 s: the offset fix re-cuts audio from the source, and a clip whose audio must move by up
    # to 15 frames past the audio's start loses 16 frames (two quanta) instead of being zero-filled
    src = make_talking_head(tmp_path / "in" / "talk.mp4", duration_s=3.6, seed=5)
    cfg = tmp_path / "full.yaml"
    # random SyncNet weights cannot reach Sync-C 3: that rule is switched off, the offset rule kept
    cfg.write_text(f"profile: full\nmodel_dir: {models}\ndetect:\n  backend: mediapipe\nfilters:\n"
                   "  sync_conf_min: null\n  sync_offset_abs_max: 15\n" + STANDIN_CONFIG)
    config = load_config(cfg)
    out = tmp_path / "out"
    summary = run_curation(expand_inputs([str(src)]), out, config, progress_every_s=60)
    assert summary["clips_kept"] == 1
    index = json.loads((out / "index.json").read_text())
    assert index["profile"] == "full"
    with tarfile.open(out / index["shardlist"][0]["url"]) as tar:
        meta = json.loads(next(tar.extractfile(m) for m in tar.getmembers() if m.name.endswith("meta.json")).read())
    assert meta["profile"] == "full"
    assert meta["models"]["syncnet"] == "syncnet_v2"
    assert meta["models"]["vae"] == "local:vae-standin"
    assert meta["models"]["audio_encoder"] == "facebook/wav2vec2-base-960h"
    assert meta["models"]["keypoints"] == "yzd-v/DWPose:dw-ll_ucoco_384.onnx"
    assert meta["models"]["pose_landmarks"] == "insightface:lmk3d_standin.onnx"
    assert meta["score_details"]["pose_source"] == "insightface:lmk3d_standin.onnx+meanshape_68"
    assert meta["models"]["identity"] == meta["scores"]["identity_model"] == "insightface:arcface_standin.onnx"
    for axis in ("yaw", "pitch", "roll"):  # the planted pose, whatever the face in the frames does
        assert meta["scores"][f"{axis}_mean"] == pytest.approx(angles[axis], abs=2.0)
    sc = meta["scores"]
    assert sc["sync_weights"] == "syncnet_v2" and -15 <= sc["sync_offset"] <= 15
    # offset correction: a kept clip's audio was shifted by exactly its measured offset
    assert meta["clip"]["audio_shift_s"] == pytest.approx(sc["sync_offset"] / 25)
    run = json.loads((out / "run.json").read_text())
    assert run["sync_rules_applied"] is True
    assert [r["applied"] for r in run["filter_rules"] if r["rule"] == "filters.sync_offset_abs_max"] == [True]
    # the trainer accepts full shards without allow_smoke
    from loopy_model.data import LoaderConfig, StreamingWindowDataset

    StreamingWindowDataset(LoaderConfig(uri=str(out), global_batch_size=1), rank=0, world_size=1)


def test_missing_weights_stop_the_job_before_work(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "syncnet_v2.model").write_bytes(b"")
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "curate.py"), "--input", str(tmp_path), "--output",
                        str(tmp_path / "out"), "--profile", "full", "--model-dir", str(tmp_path / "models")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    for name in ("det_10g.onnx", "1k3d68.onnx", "w600k_r50.onnx", "sd-vae/config.json", "wav2vec2-base-960h",
                 "dw-ll_ucoco_384.onnx"):
        assert name in r.stderr, r.stderr
    assert "fetch_models.py" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.realdata
def test_full_scores_use_scrfd_boxes_for_syncnet_and_1k3d68(tmp_path):
    """In `full` the SyncNet crop and the 1k3d68 input are boxed by the profile's detector (SCRFD, here a stand-in
    with SCRFD's signature that boxes a known region), not by BlazeFace, whose box still serves completeness."""
    import av

    from conftest import real_path
    from pipeline.clip_scores import ClipObserver
    from pipeline.faces.landmarks3d import Landmarks3D
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector
    from pipeline.faces.scrfd import ScrfdDetector
    from pipeline.scoring.syncnet import syncnet_crop
    from pipeline.segment import CandidateClip
    from test_landmarks3d import FakeLandmark3D, planted_crop_points
    from test_landmarks3d import export as export_landmarks
    from test_scrfd import BOX, FakeScrfd
    from test_scrfd import export as export_scrfd

    scrfd = ScrfdDetector(export_scrfd(FakeScrfd(), tmp_path / "scrfd_standin.onnx"))  # the real names are pinned
    lmk = Landmarks3D(export_landmarks(FakeLandmark3D(planted_crop_points() / 96 - [1.0, 1.0, 0.0]),
                                       tmp_path / "lmk3d_standin.onnx"))
    with av.open(str(real_path("wda_aoc_000.mp4"))) as c:  # 512 x 512: the crop stage's frames
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(16), c.decode(video=0))]
    clip = CandidateClip(clip_index=0, track_id=0, shot_index=0, start_s=0.0, n_frames=16, crop_x0=0.0, crop_y0=0.0,
                         crop_size=512.0, crop_scale=2.0, face_size_px=200.0, padded=False, max_faces=1)
    obs = ClipObserver(clip, MediaPipeFaceDetector(landmarks=True, ranges="short"), 224, landmarks3d=lmk,
                       box_detector=scrfd)
    for f in frames:
        obs.observe(f)
    obs._cut_sync_crops(final=True)
    scrfd_box = BOX / (640 / 512)  # the stand-in's planted box in 512-frame pixels (letterbox scale 1.25)
    np.testing.assert_allclose(np.stack(obs.det_boxes), np.tile(scrfd_box, (16, 1)), atol=0.05)
    blaze = np.stack(obs.boxes)
    assert np.isfinite(blaze).all() and np.abs(blaze - scrfd_box).max() > 20  # a different box, still recorded
    side = (scrfd_box[2:] - scrfd_box[:2]).max() / 2
    centre = (scrfd_box[:2] + scrfd_box[2:]) / 2
    square = np.r_[centre - side, centre + side]  # the 13-frame median of a constant box, squared
    for i in (0, 8, 15):
        np.testing.assert_array_equal(obs.sync_crops[i], syncnet_crop(frames[i], square.astype(np.float32), size=224))
        np.testing.assert_allclose(obs.lm68[i], lmk(frames[i], scrfd_box), atol=1e-4)
    assert not np.allclose(lmk(frames[0], blaze[0]), obs.lm68[0], atol=1.0)
