"""SyncNet: official weight layout, MFCC, offset/confidence definitions, and offset recovery on
synthetic clips (a deterministic envelope model and a tiny SyncNet trained here on CPU)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from model_files import register
from pipeline.scoring.syncnet import (SyncNet, align_av, calc_pdist, mfcc, shift_audio, sync_from_features,
                                      sync_scores, syncnet_crop, syncnet_crop_box)

# ---------------------------------------------------------------- official syncnet_v2.model layout
# Written from joonson/syncnet_python SyncNetModel.S (num_layers_in_fc_layers=1024): conv / linear
# layers (weight shape; each also has a bias) and BatchNorm layers (channels; weight, bias,
# running_mean, running_var). The 2017 file predates BatchNorm's num_batches_tracked.
_WEIGHTS = {
    "netcnnaud.0": (64, 1, 3, 3), "netcnnaud.4": (192, 64, 3, 3), "netcnnaud.8": (384, 192, 3, 3),
    "netcnnaud.11": (256, 384, 3, 3), "netcnnaud.14": (256, 256, 3, 3), "netcnnaud.18": (512, 256, 5, 4),
    "netfcaud.0": (512, 512), "netfcaud.3": (1024, 512),
    "netfclip.0": (512, 512), "netfclip.3": (1024, 512),
    "netcnnlip.0": (96, 3, 5, 7, 7), "netcnnlip.4": (256, 96, 1, 5, 5), "netcnnlip.8": (256, 256, 1, 3, 3),
    "netcnnlip.11": (256, 256, 1, 3, 3), "netcnnlip.14": (256, 256, 1, 3, 3), "netcnnlip.18": (512, 256, 1, 6, 6),
}
_BATCHNORMS = {
    "netcnnaud.1": 64, "netcnnaud.5": 192, "netcnnaud.9": 384, "netcnnaud.12": 256, "netcnnaud.15": 256,
    "netcnnaud.19": 512, "netfcaud.1": 512, "netfclip.1": 512,
    "netcnnlip.1": 96, "netcnnlip.5": 256, "netcnnlip.9": 256, "netcnnlip.12": 256, "netcnnlip.15": 256,
    "netcnnlip.19": 512,
}
OFFICIAL_SHAPES = {}
for _k, _s in _WEIGHTS.items():
    OFFICIAL_SHAPES[f"{_k}.weight"] = _s
    OFFICIAL_SHAPES[f"{_k}.bias"] = (_s[0],)
for _k, _c in _BATCHNORMS.items():
    for _p in ("weight", "bias", "running_mean", "running_var"):
        OFFICIAL_SHAPES[f"{_k}.{_p}"] = (_c,)


def test_full_model_has_official_keys_and_shapes():
    sd = SyncNet().state_dict()
    ours = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(OFFICIAL_SHAPES) == 88
    assert ours == OFFICIAL_SHAPES


def test_official_format_file_loads_strict(tmp_path):
    # a file laid out like syncnet_v2.model: plain tensor dict, official keys, no num_batches_tracked
    g = torch.Generator().manual_seed(0)
    sd = OrderedDict((k, torch.randn(s, generator=g)) for k, s in OFFICIAL_SHAPES.items())
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    path = tmp_path / "syncnet_v2.model"
    torch.save(sd, path)
    register(path)  # loaders refuse weights without a recorded sha256
    model = SyncNet.from_state_dict_file(path)
    assert model.model_id == "syncnet_v2" and not model.training
    assert torch.equal(model.netcnnlip[18].weight, sd["netcnnlip.18.weight"])
    assert torch.equal(model.netfcaud[1].running_var, sd["netfcaud.1.running_var"])
    with torch.inference_mode():
        assert model.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)
        assert model.forward_aud(torch.randn(2, 1, 13, 20)).shape == (2, 1024)
    # strict: a missing or foreign key is an error, not silently ignored
    bad = OrderedDict(sd)
    bad.pop("netfclip.3.bias")
    torch.save(bad, path)
    register(path)
    with pytest.raises(RuntimeError, match="netfclip.3.bias"):
        SyncNet.from_state_dict_file(path)


def test_instance_prefixed_keys_and_small_configs_load(tmp_path):
    tiny = SyncNet(width=1 / 16, embed_dim=32)  # 224 input like the official net, 1/16 width
    path = tmp_path / "s.model"
    torch.save({f"__S__.{k}": v for k, v in tiny.state_dict().items()}, path)
    loaded = SyncNet.from_state_dict_file(register(path))
    assert loaded.embed_dim == 32 and loaded.width == pytest.approx(1 / 16) and loaded.image_size == 224
    torch.save(SyncNet.tiny().state_dict(), path)  # 64 px input: last lip kernel 1
    assert SyncNet.from_state_dict_file(register(path)).image_size == 64


def test_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    rng = np.random.default_rng(0)
    for n in (399, 400, 16000, 16000 * 2 + 123):
        pcm = np.round(rng.standard_normal(n) * 3000).astype(np.int16)
        ref = psf.mfcc(pcm, 16000)  # how SyncNetInstance calls it: int16 samples, defaults
        np.testing.assert_allclose(mfcc(pcm / 32768.0), ref.T, rtol=1e-4, atol=1e-3)


def test_calc_pdist_matches_reference_loop():
    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    v = 4
    f2p = torch.nn.functional.pad(f2, (0, 0, v, v))
    loop = torch.stack([torch.nn.functional.pairwise_distance(f1[[i], :].repeat(2 * v + 1, 1), f2p[i:i + 2 * v + 1])
                        for i in range(len(f1))])
    torch.testing.assert_close(calc_pdist(f1, f2, v), loop)


def test_offset_sign_and_confidence_definitions():
    # audio embedding at window i + d equals video embedding at i: audio lags by d -> offset -d
    g = torch.Generator().manual_seed(2)
    base = torch.randn(60, 16, generator=g)
    for d in (-5, 0, 3):
        im = base[10:50]
        cc = base[10 - d:50 - d]
        r = sync_from_features(im, cc, vshift=15)
        assert r.offset == -d
        assert r.min_dist == pytest.approx(float(r.mdist.min()))
        assert r.conf == pytest.approx(float(np.median(r.mdist) - r.mdist.min()))
        # mean over frames of fconf = Sync-C (before smoothing), as in the reference
        assert r.frame_conf.mean() == pytest.approx(r.conf, rel=1e-5)
        assert 0 <= r.frame_conf_frac_above <= 1 and r.n_windows == 40


def test_shift_audio():
    a = np.arange(16000 * 2, dtype=np.float32)
    s = shift_audio(a, 2)  # delay by 2 frames = 1280 samples
    assert np.all(s[:1280] == 0) and s[1280] == 0 and s[1281] == 1 and len(s) == len(a)
    s = shift_audio(a, -1)
    assert s[0] == 640 and np.all(s[-640:] == 0)
    frames = np.arange(50)
    v, au = align_av(frames, a, 3)  # audio leads by 3: video frame 3 pairs with audio frame 0
    assert v[0] == 3 and au[0] == 0 and len(au) == len(v) * 640 == 47 * 640
    v, au = align_av(frames, a, -2)  # audio lags by 2: video frame 0 pairs with audio frame 2
    assert v[0] == 0 and au[0] == 2 * 640 and len(au) == len(v) * 640 == 48 * 640


def test_crop_box_geometry():
    # face box 100 px at (200..300, 100..200): bs = 50, crop x 250 +- 70, y 150 - 50 .. 150 + 90
    assert syncnet_crop_box((200, 100, 300, 200)) == pytest.approx((180, 100, 320, 240))
    frame = np.zeros((200, 250, 3), np.uint8)  # the crop runs past the bottom-right corner
    crop = syncnet_crop(frame, (200, 100, 300, 200))
    assert crop.shape == (224, 224, 3)
    assert crop[-1, -1, 0] == 110  # outside the frame: padded like crop_video


def test_crop_equals_the_crop_of_the_padded_frame():
    """syncnet_crop cuts only its crop (issue 13) but gives crop_video's pixels: the crop of the
    frame padded with 110 on every side, for boxes inside, across and outside the frame."""
    import cv2

    def padded_reference(frame, box):
        x0, y0, x1, y1 = syncnet_crop_box(box, 0.4)
        pad = int(max(x1 - x0, y1 - y0)) + 1
        padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=110)
        return cv2.resize(padded[int(y0 + pad):int(y1 + pad), int(x0 + pad):int(x1 + pad)], (224, 224))

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    for _ in range(300):
        c, s = rng.uniform(-60, 180, 2), rng.uniform(4, 150, 2)
        box = (c[0] - s[0] / 2, c[1] - s[1] / 2, c[0] + s[0] / 2, c[1] + s[1] / 2)
        try:
            expected = padded_reference(frame, box)
        except cv2.error:  # a small box far outside: the padded frame holds none of it, both refuse
            with pytest.raises(cv2.error):
                syncnet_crop(frame, box)
            continue
        np.testing.assert_array_equal(syncnet_crop(frame, box), expected)


# ---------------------------------------------------------------- synthetic talking clips
S, SPF, SR = 64, 640, 16000


def _envelope(n, rng):
    e = np.convolve(rng.uniform(0, 1, n), [0.25, 0.5, 0.25], mode="same")
    e[rng.uniform(size=n) < 0.2] = 0.0  # pauses
    return np.clip(e, 0, 1)


def _render(env, rng):
    """64x64 RGB frames: a face ellipse with a dark mouth whose height follows env."""
    yy, xx = np.mgrid[:S, :S]
    face = ((xx - 32) / 22) ** 2 + ((yy - 30) / 28) ** 2 <= 1
    frames = np.full((len(env), S, S, 3), 110, np.uint8)
    for t, e in enumerate(env):
        frames[t][face] = (200, 170, 150)
        frames[t][((xx - 32) / 11) ** 2 + ((yy - 44) / ((1 + 12 * e) / 2)) ** 2 <= 1] = (60, 20, 30)
    noise = rng.integers(-4, 5, frames.shape)
    return np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _voice(env, rng):
    """A voiced buzz (f0 ~120 Hz, 7 harmonics) plus breath noise, amplitude-modulated by env."""
    n = len(env) * SPF
    t = np.arange(n) / SR
    amp = np.interp(np.arange(n), np.arange(len(env)) * SPF + SPF / 2, env)
    phase = 2 * np.pi * np.cumsum(120 + 20 * np.sin(2 * np.pi * 0.7 * t)) / SR
    carrier = sum(np.sin(k * phase) / k for k in range(1, 8)) + 0.3 * rng.standard_normal(n)
    return (0.3 * amp * carrier + 0.002 * rng.standard_normal(n)).astype(np.float32)


def synthetic_clip(n_frames, k, seed, margin=16):
    """Frames and audio where the audio leads the video by k frames (audio frame i carries the
    mouth shape of video frame i + k), so the reference convention gives offset = +k."""
    rng = np.random.default_rng(seed)
    env = _envelope(n_frames + 2 * margin, rng)
    video = _render(env[margin:margin + n_frames], rng)
    audio = _voice(env[margin + k:margin + k + n_frames], rng)
    return video, audio


class EnvelopeOracle(nn.Module):
    """Hand-made model with SyncNet's interface: the lip embedding is the mouth darkness of the
    5 frames, the audio embedding the MFCC log energy (c0) averaged per frame, both z-scored."""

    image_size = S

    def forward_lip(self, x):  # [B, 3, 5, S, S], 0..255
        v = -x[:, :, :, 36:53, 20:45].mean((1, 3, 4))
        return (v - v.mean(1, keepdim=True)) / (v.std(1, keepdim=True) + 1e-3)

    def forward_aud(self, x):  # [B, 1, 13, 20]
        e = x[:, 0, 0].reshape(-1, 5, 4).mean(2)
        return (e - e.mean(1, keepdim=True)) / (e.std(1, keepdim=True) + 1e-3)


@pytest.mark.parametrize("k", list(range(-8, 9)))
def test_oracle_recovers_offset_and_correction(k):
    video, audio = synthetic_clip(80, k, seed=100 + k)
    r = sync_scores(EnvelopeOracle(), video, audio)
    assert r.offset == k
    fixed = sync_scores(EnvelopeOracle(), video, shift_audio(audio, r.offset))
    assert fixed.offset == 0
    assert fixed.conf > 0.5


@pytest.fixture(scope="module")
def trained_tiny_syncnet():
    """A 1/16-width SyncNet (64 px input) trained here on aligned synthetic clips.

    Each batch is two runs of 16 consecutive windows; every video window is contrasted with all
    32 audio windows (InfoNCE on negative Euclidean distance, both directions), so the
    negatives are exactly the small time shifts the offset search has to tell apart.
    250 steps: ~5 s on 2 idle CPU cores; offsets and corrections came out right for training
    seeds 0-5 with Sync-C >= 2.6.
    """
    rng = np.random.default_rng(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SyncNet(embed_dim=32, width=1 / 16, image_size=S)
        clips = [synthetic_clip(250, 0, seed=s) for s in range(4)]
        vids = [torch.from_numpy(np.ascontiguousarray(v[..., ::-1].transpose(3, 0, 1, 2))) for v, _ in clips]
        ccs = [torch.from_numpy(mfcc(a)) for _, a in clips]
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        target = torch.arange(32)
        for _ in range(250):
            ims, ccw = [], []
            for _run in range(2):
                c, start = rng.integers(len(clips)), rng.integers(0, 245 - 16)
                ims += [vids[c][:, b:b + 5] for b in range(start, start + 16)]
                ccw += [ccs[c][None, :, 4 * b:4 * b + 20] for b in range(start, start + 16)]
            logits = -torch.cdist(model.forward_lip(torch.stack(ims).float()), model.forward_aud(torch.stack(ccw)))
            loss = (torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("k", [-8, -3, 0, 4, 7])
def test_trained_tiny_syncnet_finds_offset(trained_tiny_syncnet, k):
    video, audio = synthetic_clip(100, k, seed=200 + k)
    r = sync_scores(trained_tiny_syncnet, video, audio)
    assert r.offset == k
    assert r.conf > 1.0
    v2, a2 = align_av(video, audio, r.offset)
    fixed = sync_scores(trained_tiny_syncnet, v2, a2)
    assert fixed.offset == 0 and fixed.conf > 1.0


def test_tiny_random_model_runs_on_any_crop_size():
    model = SyncNet.tiny(seed=0)
    assert model.image_size == 64 and model.model_id.startswith("syncnet_w")
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (30, 90, 90, 3), dtype=np.uint8)
    audio = rng.standard_normal(30 * SPF).astype(np.float32) * 0.1
    r = sync_scores(model, crops, audio, batch_size=7)
    assert r.n_windows == 25 and np.isfinite(r.conf) and -15 <= r.offset <= 15
    assert set(r.scores()) >= {"offset", "conf", "min_dist", "frame_conf_mean", "frame_conf_p10"}
    a = SyncNet.tiny(seed=0).state_dict()["netcnnlip.0.weight"]
    assert torch.equal(a, model.state_dict()["netcnnlip.0.weight"])
    with pytest.raises(ValueError, match="too short"):
        sync_scores(model, crops[:5], audio[:5 * SPF])
