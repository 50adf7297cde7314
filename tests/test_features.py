"""Feature extractors: real diffusers/transformers/onnxruntime models, tiny and built here.

No pretrained weights are reachable, so loading is tested with checkpoints written locally under the
official key names / file layouts / ONNX signatures, and numerics with the smoke models.
"""
import re

import jsonschema
import numpy as np
import pytest
import torch

import schemas
from pipeline.features import dwpose as dw
from pipeline.features import vae as vae_mod
from pipeline.features import wav2vec as w2v
from pipeline.features.extractor import FeatureExtractor
from model_files import register
from pipeline.models.registry import FULL_MODELS, UntrustedModelFile
from pipeline.shards import load_npy

# Same key NAMES as SD 1.5's VAE (the channel change pattern 1->2->4->4 keeps every conv_shortcut),
# 16x narrower, so a state dict of it proves key-name compatibility without 330 MB of weights.
SHRUNK_SD15 = dict(vae_mod.SD15_VAE_CONFIG, block_out_channels=(8, 16, 32, 32), norm_num_groups=8)


def _seeded(fn, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


@pytest.fixture(scope="module")
def shrunk_vae():
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(**SHRUNK_SD15).eval())


@pytest.fixture(scope="module")
def smoke():
    return FeatureExtractor("smoke", batch_size=4)


def _frames(T, size=512, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (T, size, size, 3), dtype=np.uint8)


# ---- VAE ---------------------------------------------------------------------------------

def test_shrunk_config_has_the_sd15_key_names(shrunk_vae):
    from diffusers import AutoencoderKL

    with torch.device("meta"):  # full-size SD 1.5 VAE structure, no memory
        full = AutoencoderKL(**vae_mod.SD15_VAE_CONFIG)
    assert sorted(full.state_dict()) == sorted(shrunk_vae.state_dict())
    assert len(full.state_dict()) > 200


def test_vae_loads_from_local_diffusers_dir(tmp_path, shrunk_vae):
    # sd-vae/ holds the registry's VAE (pinned sha256): other weights there are refused whatever the lock says
    shrunk_vae.save_pretrained(tmp_path / "sd-vae", safe_serialization=True)
    register(tmp_path / "sd-vae" / "config.json", root=tmp_path)
    with pytest.raises(UntrustedModelFile, match=r"sd-vae/diffusion_pytorch_model\.safetensors.*pinned"):
        vae_mod.load_vae("full", tmp_path)
    # one's own VAE under another name (config features.vae_model), registered
    shrunk_vae.save_pretrained(tmp_path / "vae-standin", safe_serialization=True)
    register(tmp_path / "vae-standin", root=tmp_path)
    model, model_id = vae_mod.load_vae("full", tmp_path, "vae-standin")
    assert model_id == "local:vae-standin"
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x).latent_dist.mean, shrunk_vae.encode(x).latent_dist.mean)


def _diffusers_to_ldm(sd: dict, n_up: int = 4) -> dict:
    """Rename diffusers VAE keys to the original CompVis/LDM ones (inverse of diffusers' mapping)."""
    out = {}
    for k, v in sd.items():
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", n)
        n = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", n)
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".mid_block.attentions.0." in n:
            n = n.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
                n = n.replace(f".{a}.", f".{b}.")
            if v.ndim == 2:  # LDM attention projections are 1x1 convs
                v = v[:, :, None, None]
        out[n] = v
    return out


def test_vae_loads_single_files_diffusers_and_ldm_names(tmp_path, shrunk_vae):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in shrunk_vae.state_dict().items()}
    ldm = {f"first_stage_model.{k}": v for k, v in _diffusers_to_ldm(sd).items()}
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in ldm
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    ldm["model.diffusion_model.out.0.weight"] = torch.zeros(1)  # the rest of a full SD checkpoint
    save_file(sd, tmp_path / "diffusers.safetensors")
    save_file(ldm, tmp_path / "ldm.safetensors")
    torch.save(sd, tmp_path / "vae.pt")
    for name in ("diffusers.safetensors", "ldm.safetensors", "vae.pt"):
        register(tmp_path / name)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want = shrunk_vae.encode(x).latent_dist
        for name in ("diffusers.safetensors", "ldm.safetensors", "vae.pt"):
            got = vae_mod.load_vae_file(tmp_path / name, SHRUNK_SD15).encode(x).latent_dist
            assert torch.equal(got.mean, want.mean) and torch.equal(got.std, want.std), name
    save_file({k: v for k, v in sd.items() if "decoder" not in k}, tmp_path / "partial.safetensors")
    register(tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="missing"):
        vae_mod.load_vae_file(tmp_path / "partial.safetensors", SHRUNK_SD15)


def _fp16_rounding_bound(ref: np.ndarray) -> np.ndarray:
    """Largest error of storing fp32 ``ref`` as fp16 (round to nearest: half a unit in the last place;
    2**-10 relative leaves room for a last-bit tie flipped by a different batch split)."""
    return np.abs(ref) * 2.0 ** -10 + 2.0 ** -24


def test_encode_frames_stores_the_fp32_posterior_mean(shrunk_vae):
    frames = _frames(3, size=64)
    out = vae_mod.encode_frames(shrunk_vae, frames, batch_size=2)
    assert out.dtype == np.float16 and out.shape == (3, 4, 8, 8)  # mean only (schema 2.0)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        post = shrunk_vae.encode(x).latent_dist  # diffusers' AutoencoderKL, fp32, same weights
    mean, std = post.mean.numpy(), post.std.numpy()
    assert (np.abs(out - mean) <= _fp16_rounding_bound(mean)).all()  # equal within fp16 rounding
    both = vae_mod.encode_frames(shrunk_vae, frames, batch_size=2, store_std=True)  # features.vae_store_std
    assert both.shape == (3, 8, 8, 8)
    np.testing.assert_array_equal(both[:, :4], out)
    assert (np.abs(both[:, 4:] - std) <= _fp16_rounding_bound(std)).all() and (both[:, 4:] > 0).all()


def test_old_bf16_autocast_path_is_far_from_fp32(shrunk_vae):
    """Why fp32 (audit item 4): the pre-2.0 bf16 autocast encode moves the mean by much more than
    fp16 storage rounding (CPU autocast here; the CUDA figure for the full SD 1.5 size is in
    docs/features.md, from benchmarks/vae_precision.py)."""
    frames = _frames(2, size=64, seed=4)
    x = vae_mod.frames_to_input(torch.from_numpy(frames))
    with torch.no_grad():
        ref = shrunk_vae.encode(x).latent_dist.mean
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = shrunk_vae.encode(x).latent_dist.mean.float()
    rel_bf16 = float((bf16 - ref).norm() / ref.norm())
    stored = torch.from_numpy(vae_mod.encode_frames(shrunk_vae, frames)).float()
    rel_stored = float((stored - ref).norm() / ref.norm())
    assert rel_stored < 3e-4  # fp16 storage of the fp32 mean
    assert rel_bf16 > 10 * rel_stored


def test_partial_vae_dir_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "vae-standin"
    vae_mod.build_smoke_vae().save_pretrained(d, safe_serialization=True)
    f = d / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if not k.startswith("encoder.mid_block")}, f)
    register(d, root=tmp_path)
    with pytest.raises(ValueError, match="missing_keys"):
        vae_mod.load_vae("full", tmp_path, "vae-standin")


def test_missing_vae_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sd-vae/config\.json"):
        vae_mod.load_vae("full", tmp_path)
    (tmp_path / "sd-vae").mkdir()
    (tmp_path / "sd-vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        vae_mod.load_vae("full", tmp_path)


# ---- wav2vec2 ----------------------------------------------------------------------------

def test_to_16k_mono_rates_channels_and_ints():
    for rate in (16_000, 44_100, 48_000):
        t = np.arange(rate) / rate  # 1 s
        tone = 0.5 * np.sin(2 * np.pi * 440 * t)
        stereo = np.stack([tone, tone], 1).astype(np.float32)
        y = w2v.to_16k_mono(stereo, rate)
        assert y.dtype == np.float32 and abs(len(y) - 16_000) <= 1
        spec = np.abs(np.fft.rfft(y[:16_000]))
        assert abs(np.argmax(spec) - 440) <= 1  # 1 Hz bins: the tone keeps its pitch
        assert np.abs(y[2000:-2000]).max() == pytest.approx(0.5, abs=0.01)
    pcm = (np.array([0.5, -0.5, 0.25]) * 32768).astype(np.int16)
    np.testing.assert_allclose(w2v.to_16k_mono(pcm, 16_000), [0.5, -0.5, 0.25])
    lr = np.stack([np.ones(100), -np.ones(100)], 1)
    np.testing.assert_allclose(w2v.to_16k_mono(lr, 16_000), 0)  # channel mean
    with pytest.raises(ValueError, match="channels-last"):
        w2v.to_16k_mono(np.zeros((2, 1000)), 16_000)


def test_normalisation_matches_wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    x = np.random.default_rng(0).normal(0.3, 0.2, 3200).astype(np.float32)
    ref = Wav2Vec2FeatureExtractor(do_normalize=True)(x, sampling_rate=16_000).input_values[0]
    np.testing.assert_allclose(w2v.zero_mean_unit_var(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_samples", [5 * 640, 5 * 640 - 300, 5 * 640 + 1000])
def test_frame_aligned_input_cuts_pads_and_centres(n_samples):
    T = 5
    a = np.random.default_rng(0).normal(size=n_samples).astype(np.float32)
    x = w2v.frame_aligned_input(a, T)
    assert len(x) == T * 640 + 80
    assert (x[:40] == 0).all() and (x[-40:] == 0).all()
    kept = min(n_samples, T * 640)
    assert x[40:40 + kept].mean() == pytest.approx(0, abs=1e-5)
    assert x[40:40 + kept].std() == pytest.approx(1, abs=1e-3)
    assert (x[40 + kept:] == 0).all()
    assert w2v.n_feature_rows(len(x)) == 2 * T


def test_alignment_frame_i_owns_rows_2i_and_2i1():
    """A click in the middle of frame i reaches only frame i's two 50 Hz CNN rows; a click on the
    boundary between frames i-1 and i reaches one row of each (receptive field 400 > stride 320).

    The conv geometry is wav2vec2-base's; feat_extract_norm="layer" (per-step LayerNorm, as in
    wav2vec2-large) replaces base's first-layer GroupNorm, which normalises each channel over the
    whole clip and so would spread any click everywhere (a global gain, not a time shift).
    """
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(**dict(w2v.SMOKE_CONFIG, feat_extract_norm="layer", conv_bias=True))
    model = _seeded(lambda: Wav2Vec2Model(cfg).eval())
    T = 6
    base = np.zeros(T * 640, dtype=np.float32)

    def changed_rows(audio):
        with torch.no_grad():
            r = [model.feature_extractor(torch.from_numpy(w2v.frame_aligned_input(a, T, normalize=False))[None])[0].T
                 for a in (base, audio)]
        assert len(r[0]) == 2 * T
        return np.flatnonzero((r[1] - r[0]).abs().amax(1).numpy() > 0).tolist()

    for i in range(T):
        click = base.copy()
        click[640 * i + 320] = 1.0
        assert changed_rows(click) == [2 * i, 2 * i + 1]
    click = base.copy()
    click[640 * 3] = 1.0
    assert changed_rows(click) == [5, 6]


def test_encode_audio_shapes_and_pair_means():
    model = w2v.build_smoke_wav2vec2()
    T = 7
    a = np.random.default_rng(1).normal(size=T * 640 - 123).astype(np.float32)
    feats = w2v.encode_audio(model, a, T)
    L, D = model.config.num_hidden_layers + 1, model.config.hidden_size
    assert feats.dtype == np.float16 and feats.shape == (T, L, D)
    with torch.no_grad():
        hs = model(torch.from_numpy(w2v.frame_aligned_input(a, T))[None], output_hidden_states=True).hidden_states
    h = torch.stack(hs, 2)[0].numpy()  # [2T, L, D]
    np.testing.assert_allclose(feats[3], (h[6] + h[7]) / 2, rtol=1e-2, atol=1e-2)
    assert w2v.encode_audio(model, a, 0).shape == (0, L, D)


def test_encode_audio_runs_in_fp32_even_under_an_outer_autocast():
    model = w2v.build_smoke_wav2vec2()
    T = 5
    a = np.random.default_rng(2).normal(size=T * 640).astype(np.float32)
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o[0].dtype)) for m in model.encoder.layers]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = w2v.encode_audio(model, a, T)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [torch.float32] * model.config.num_hidden_layers
    np.testing.assert_array_equal(feats, w2v.encode_audio(model, a, T))
    half = w2v.build_smoke_wav2vec2().to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        w2v.encode_audio(half, a, T)


def test_wav2vec2_loads_transformers_ctc_checkpoint_dir(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    d = tmp_path / "wav2vec2-base-960h"
    ctc = _seeded(lambda: Wav2Vec2ForCTC(Wav2Vec2Config(**w2v.SMOKE_CONFIG)).eval(), seed=3)
    ctc.save_pretrained(d, safe_serialization=True)  # facebook/wav2vec2-base-960h is a ForCTC checkpoint
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(d)
    register(d, root=tmp_path)
    model, model_id, normalize = w2v.load_wav2vec2("full", tmp_path)
    assert model_id == "facebook/wav2vec2-base-960h" and normalize is True
    x = torch.randn(1, 4 * 640 + 80)
    with torch.no_grad():
        want = ctc.wav2vec2(x, output_hidden_states=True).hidden_states
        got = model(x, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == w2v.SMOKE_CONFIG["num_hidden_layers"] + 1
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"wav2vec2-base-960h/model\.safetensors"):
        w2v.load_wav2vec2("full", tmp_path)


# ---- DWPose ------------------------------------------------------------------------------

class _Planted(torch.nn.Module):
    """Constant SimCC outputs (the input only passes through) with peaks where we put them."""

    def __init__(self, sx, sy):
        super().__init__()
        self.register_buffer("sx", torch.from_numpy(sx))
        self.register_buffer("sy", torch.from_numpy(sy))

    def forward(self, x):
        z = x.mean() * 0
        return self.sx + z, self.sy + z


def test_simcc_peaks_decode_to_planted_keypoints():
    rng = np.random.default_rng(0)
    K = dw.NUM_KEYPOINTS
    center, scale, warp = dw.crop_box_transform(512, 512)
    planted = rng.uniform(60, 450, size=(K, 2))
    hx, hy = rng.uniform(0.2, 1.0, K), rng.uniform(0.2, 1.0, K)
    sx = rng.uniform(-0.1, 0.1, (1, K, 576)).astype(np.float32)
    sy = rng.uniform(-0.1, 0.1, (1, K, 768)).astype(np.float32)
    uv = planted @ warp[:, :2].T + warp[:, 2]  # crop pixels -> model-input pixels
    bins = np.rint(uv * dw.SIMCC_SPLIT_RATIO).astype(int)
    sx[0, np.arange(K), bins[:, 0]] = hx
    sy[0, np.arange(K), bins[:, 1]] = hy
    dead = 23 + 5  # a face point with no positive response anywhere
    sx[0, dead] = -1.0
    sy[0, dead] = -1.0
    pose = dw.DWPoseFace(dw.export_simcc_onnx(_Planted(sx, sy)), "test")
    out = pose(_frames(2))
    assert out.dtype == np.float32 and out.shape == (2, 68, 3)
    live = np.arange(23, 91) != dead
    err = np.abs(out[:, live, :2] - planted[23:91][live]).max()
    assert err <= 1.0, err
    np.testing.assert_allclose(out[0, live, 2], np.minimum(hx, hy)[23:91][live], rtol=1e-6)
    # DWPose marks a keypoint without response by location -1 (before /split ratio, then rescaled)
    np.testing.assert_allclose(out[0, dead - 23, :2], dw.to_image_coords(np.array([-0.5, -0.5]), center, scale))
    assert out[0, dead - 23, 2] <= 0


def test_top_down_transform_round_trips_and_normalises_rgb():
    center, scale, warp = dw.crop_box_transform(512, 512)
    np.testing.assert_allclose(center, [256, 256])
    np.testing.assert_allclose(scale, [640, 640 / 0.75])  # padding 1.25, then aspect 288/384
    p = np.random.default_rng(0).uniform(0, 512, (50, 2))
    uv = p @ warp[:, :2].T + warp[:, 2]
    np.testing.assert_allclose(uv[0:1] * 0 + (np.array([256, 256]) @ warp[:, :2].T + warp[:, 2]), [[144, 192]], atol=1e-3)
    np.testing.assert_allclose(dw.to_image_coords(uv, center, scale), p, atol=1e-3)
    frame = np.zeros((512, 512, 3), np.uint8)
    frame[...] = (200, 100, 50)
    x = dw.preprocess(frame, warp)
    assert x.shape == (3, 384, 288) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 192, 144], (np.array([200, 100, 50]) - dw.MEAN) / dw.STD, rtol=1e-5)
    np.testing.assert_allclose(x[:, 2, 144], -dw.MEAN / dw.STD, rtol=1e-5)  # outside the crop: black


def test_smoke_onnx_signature_and_dynamic_batch():
    fixed = dw.DWPoseFace(dw.build_smoke_onnx(), "fixed")
    assert fixed.batch_size == 1
    dynamic = dw.DWPoseFace(dw.build_smoke_onnx(batch=None), "dyn", batch_size=2)
    assert dynamic.batch_size == 2
    frames = _frames(3, seed=1)
    a, b = fixed(frames), dynamic(frames)
    # scores are continuous; argmax locations of a random net may flip on near-ties between batch sizes
    np.testing.assert_allclose(a[..., 2], b[..., 2], rtol=1e-4, atol=1e-5)
    assert (a[..., :2] == b[..., :2]).mean() > 0.9
    assert not np.allclose(a[0, :, 2], a[1, :, 2])  # frames differ, so a mix-up would show

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2))[:, None].expand(-1, 133, -1), x.mean((1, 3))[:, None].expand(-1, 17, -1)

    with pytest.raises(ValueError, match="DWPose|SimCC"):
        dw.DWPoseFace(dw.export_simcc_onnx(Wrong()), "wrong")


def test_missing_dwpose_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dw-ll_ucoco_384\.onnx"):
        dw.DWPoseFace.load("full", tmp_path)


# ---- extractor ---------------------------------------------------------------------------

def _check_schema(out, T):
    shapes = {"latent": (T, 4, 64, 64), "kps": (T, 68, 3), "motion": (max(T - 12 + 1, 0), 4)}
    for key, member in [("latent", "latent.npy"), ("audio", "audio.npy"), ("kps", "kps.npy"), ("motion", "motion.npy")]:
        assert out[key].dtype == np.dtype(schemas.MEMBERS[member].dtype), key
        if key in shapes:
            assert out[key].shape == shapes[key], key
    assert out["audio"].shape[0] == T and np.isfinite(out["audio"]).all()


def test_smoke_extractor_end_to_end(smoke):
    T = 13
    frames = _frames(T)
    audio = np.random.default_rng(0).normal(0, 0.1, T * 640 + 500).astype(np.float32)
    out = smoke(frames, audio)
    _check_schema(out, T)
    assert out["audio"].shape == (T, 3, 16)
    assert set(out["model_ids"]) == {"vae", "audio_encoder", "keypoints"}
    assert all(v.startswith("smoke:") for v in out["model_ids"].values())
    assert out["meta"]["vae_scaling_factor"] == pytest.approx(0.18215)
    assert out["meta"]["motion_window"] == 12 and out["meta"]["n_frames"] == T
    meta = out["meta"]
    jsonschema.validate(meta, schemas.meta_json_schema()["properties"]["features"])
    assert meta["vae_dtype"] == meta["audio_dtype"] == "float32" and meta["latent_layout"] == "mean"
    assert meta["audio_layers"] == 3 and meta["audio_layer0_included"] is True  # 2 layers + hidden_states[0]
    assert "mean of 50 Hz rows (2i, 2i+1)" in meta["audio_resampling"]
    assert meta["motion_columns"] == list(schemas.MOTION_COLUMNS) and meta["motion_score_threshold"] == 0.3
    motion_raw, motion_norm = out["motion"][:, :2], out["motion"][:, 2:]
    if meta["motion_face_size_px"] is not None:
        np.testing.assert_allclose(motion_norm, motion_raw / meta["motion_face_size_px"] ** 2, rtol=1e-5)
    members = FeatureExtractor.members(out)
    assert sorted(members) == ["audio.npy", "kps.npy", "latent.npy", "motion.npy"]
    np.testing.assert_array_equal(load_npy(members["kps.npy"]), out["kps"])
    # a prefix of the clip gives the same per-frame features (a different batch split may change CPU
    # conv summation order: equal up to fp16 rounding); a clip shorter than W has no motion windows
    short = smoke(frames[:3], audio[:3 * 640])
    np.testing.assert_allclose(short["latent"], out["latent"][:3], rtol=1e-2, atol=2e-3)
    np.testing.assert_array_equal(short["kps"], out["kps"][:3])
    assert short["motion"].shape == (0, 4) and short["audio"].shape == (3, 3, 16)


def test_extractor_vae_store_std_switch_and_ungated_motion(smoke):
    T = 13
    frames = _frames(T)
    audio = np.zeros(T * 640, np.float32)
    fx = FeatureExtractor("smoke", batch_size=4, vae_store_std=True, motion_score_threshold=None)
    out = fx(frames, audio)
    assert out["latent"].shape == (T, 8, 64, 64) and out["meta"]["latent_layout"] == "mean+std"
    np.testing.assert_array_equal(out["latent"][:, :4], smoke(frames, audio)["latent"])
    assert (out["latent"][:, 4:] > 0).all()
    # without gating (the smoke DWPose's random scores would gate most points) every window has values
    size = out["meta"]["motion_face_size_px"]
    assert out["meta"]["motion_score_threshold"] is None and size > 0
    assert out["motion"].shape == (2, 4) and np.isfinite(out["motion"]).all()
    np.testing.assert_allclose(out["motion"][:, 2:], out["motion"][:, :2] / size ** 2, rtol=1e-5)


def test_extractor_refuses_non_finite_features(smoke):
    p = next(smoke.vae.encoder.conv_in.parameters())
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            p.fill_(float("inf"))
        with pytest.raises(FloatingPointError, match="latent"):
            smoke(_frames(1), np.zeros(640, np.float32))
    finally:
        with torch.no_grad():
            p.copy_(saved)


def test_extractor_rejects_bad_inputs(smoke):
    with pytest.raises(ValueError, match="uint8"):
        smoke(np.zeros((2, 256, 256, 3), np.uint8), np.zeros(1280, np.float32))
    with pytest.raises(ValueError, match="at least one"):
        smoke(np.zeros((0, 512, 512, 3), np.uint8), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="CUDA"):
        FeatureExtractor("smoke", device="cpu", dtype="bf16")


def test_full_extractor_from_a_local_model_dir(tmp_path, shrunk_vae):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    with pytest.raises(FileNotFoundError, match="sd-vae"):
        FeatureExtractor("full", tmp_path, device="cpu")
    shrunk_vae.save_pretrained(tmp_path / "vae-standin", safe_serialization=True)  # sd-vae/ is pinned
    w = tmp_path / "wav2vec2-base-960h"
    _seeded(lambda: Wav2Vec2ForCTC(Wav2Vec2Config(**w2v.SMOKE_CONFIG))).save_pretrained(w)
    Wav2Vec2FeatureExtractor().save_pretrained(w)
    register(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dw-ll_ucoco_384\.onnx"):
        FeatureExtractor("full", tmp_path, device="cpu", vae_model="vae-standin")
    (tmp_path / "dw-ll_ucoco_384.onnx").write_bytes(dw.build_smoke_onnx())
    register(tmp_path / "dw-ll_ucoco_384.onnx")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    fx = FeatureExtractor("full", tmp_path, device="cpu", batch_size=2, vae_model="vae-standin")
    out = fx(_frames(2), np.zeros(2 * 640, np.float32))
    _check_schema(out, 2)
    assert out["model_ids"] == {"vae": "local:vae-standin", **{k: FULL_MODELS[n].model_id for k, n in
                                [("audio_encoder", "wav2vec2"), ("keypoints", "dwpose")]}}
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # workers only read model_dir


def test_tf32_is_a_recorded_choice_not_a_process_default(shrunk_vae):
    """precision.tf32_mode sets cuDNN's and matmul's TF32 flags for its block only; the VAE encode
    runs under the config's choice and wav2vec2 under strict fp32, whatever the process default;
    meta says whether TF32 ran (never on CPU)."""
    from pipeline.features.precision import tf32_mode

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    seen = []
    with tf32_mode(False):
        assert flags() == (False, False)
        with tf32_mode(True):
            assert flags() == (True, True)
        assert flags() == (False, False)
    assert flags() == before
    hook = shrunk_vae.encoder.register_forward_hook(lambda *_: seen.append(flags()))
    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    try:
        vae_mod.encode_frames(shrunk_vae, frames, batch_size=2, tf32=False)
        vae_mod.encode_frames(shrunk_vae, frames, batch_size=2, tf32=True)
    finally:
        hook.remove()
    assert seen == [(False, False), (True, True)] and flags() == before
    model = w2v.build_smoke_wav2vec2()
    w2v_seen = []
    h = model.feature_extractor.register_forward_hook(lambda *_: w2v_seen.append(flags()))
    with tf32_mode(True):
        w2v.encode_audio(model, np.zeros(3 * 640, np.float32), 3)
    h.remove()
    assert w2v_seen == [(False, False)]
    fx = FeatureExtractor("smoke", device="cpu", batch_size=4, tf32=True)
    assert fx.meta["vae_tf32"] is False  # CPU: no TF32 whatever the config says
