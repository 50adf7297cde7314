"""Issue 4 through the pipeline: every kept clip carries latents, wav2vec2 features, face
keypoints and motion variances with the schema's shapes and dtypes, for clips of several
lengths and source audio at 16 / 44.1 / 48 kHz, mono or stereo; the trainer's loader reads them."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

import schemas
from conftest import read_samples
from pipeline.config import load_config
from pipeline.demo import make_talking_head
from pipeline.inputs import expand_inputs
from pipeline.runner import run_curation

CASES = [  # (duration s, audio rate, stereo)
    (2.6, 16000, False),
    (3.1, 44100, True),
    (3.6, 48000, True),
]


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory, ray_local):
    src = tmp_path_factory.mktemp("feat_in")
    for i, (dur, rate, stereo) in enumerate(CASES):
        make_talking_head(src / f"talk_{i}_{rate}_{'st' if stereo else 'mono'}.mp4", duration_s=dur, audio_rate=rate,
                          stereo=stereo, seed=20 + i)
    out = tmp_path_factory.mktemp("feat_out")
    config = load_config(None)
    assert config.features.enabled
    run_curation(expand_inputs([str(src)]), out, config, progress_every_s=60)
    return out


def _samples(out):
    return read_samples(out)


def test_members_match_schema(feature_run):
    index, samples = _samples(feature_run)
    assert len(samples) == len(CASES)
    assert set(index["members"]) == {"video.mp4", "meta.json", "latent.npy", "audio.npy", "kps.npy", "motion.npy"}
    lengths = set()
    rates = set()
    for key, members in samples.items():
        assert set(members) == set(index["members"])
        meta = json.loads(members["meta.json"])
        schemas.validate_meta(meta)
        T = meta["clip"]["n_frames"]
        lengths.add(T)
        rates.add(meta["source"]["audio_rate"])
        arrays = {m: np.load(io.BytesIO(members[m]), allow_pickle=False) for m in members if m.endswith(".npy")}
        for name, arr in arrays.items():
            assert arr.dtype == np.dtype(schemas.MEMBERS[name].dtype), name
        assert arrays["latent.npy"].shape == (T, 4, 64, 64)  # posterior mean only (schema 2.0 default)
        assert arrays["audio.npy"].shape[0] == T, "one audio feature row per video frame"
        L, D = arrays["audio.npy"].shape[1:]
        assert L == meta["features"]["audio_layers"] and D == meta["features"]["audio_dim"]
        assert arrays["kps.npy"].shape == (T, 68, 3)
        W = meta["features"]["motion_window"]
        assert W == 12 and arrays["motion.npy"].shape == (T - W + 1, len(schemas.MOTION_COLUMNS))
        assert np.isfinite(arrays["latent.npy"]).all()
        assert meta["schema_version"] == schemas.SCHEMA_VERSION == "2.1"
        f = meta["features"]
        assert f["latent_layout"] == "mean" and f["vae_dtype"] == f["audio_dtype"] == "float32"
        assert f["audio_layer0_included"] is True and f["audio_resampling"]
        assert meta["profile"] == "smoke" and meta["models"]["vae"].startswith("smoke:")
        assert meta["features"]["vae_scaling_factor"] == pytest.approx(0.18215)
        assert set(meta["members"]) == set(index["members"])
        # the stored motion summary is the mean of motion.npy's raw column over measurable windows
        raw_head = arrays["motion.npy"][:, 0]
        if np.isfinite(raw_head).any():
            assert meta["scores"]["head_motion_var_mean"] == pytest.approx(float(np.nanmean(raw_head)), rel=1e-5)
        else:
            assert "head_motion_var_mean" not in meta["scores"]
    assert len(lengths) == len(CASES), "clips of several lengths"
    assert rates == {16000, 44100, 48000}


def test_trainer_loader_reads_pipeline_output(feature_run):
    from loopy_model.data import LoaderConfig, StreamingWindowDataset

    with pytest.raises(Exception, match="smoke"):
        StreamingWindowDataset(LoaderConfig(uri=str(feature_run), global_batch_size=1), rank=0, world_size=1)
    ds = StreamingWindowDataset(LoaderConfig(uri=str(feature_run), global_batch_size=1, allow_smoke=True),
                                rank=0, world_size=1)
    batch = next(iter(ds))
    assert tuple(batch["latents"].shape) == (1, 12, 4, 64, 64)
    assert tuple(batch["motion_latents"].shape) == (1, 20, 4, 64, 64)  # TSM: 124 frames -> 20 latents
    assert tuple(batch["ref_latent"].shape) == (1, 4, 64, 64)
    assert tuple(batch["audio"].shape[:3]) == (1, 12, 5)  # t-2..t+2 per target frame
    assert tuple(batch["kps"].shape) == (1, 12, 68, 3)
