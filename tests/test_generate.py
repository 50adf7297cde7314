"""Audio-only generation (loopy_model/sampling.py, loopy_model/generate.py, jobs/generate.py) on CPU
with the tiny preset: an mp4 from a checkpoint trained by jobs/train.py, the three-pass guidance
arithmetic, the guidance passes checked on the attention inputs, determinism for a seed, bad
inputs (exit 2, one error line, no traceback), --batch with one model load, and the
autoregressive clip loop.

Generation uses the smoke wav2vec2 (2 hidden layers + embeddings = 3 layers x 16), so every model
here is built, or trained, with that audio layout.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import loader_fixtures
from model_files import register
from loopy_model import temporal_segment as tsm
from loopy_model.diffusion import Diffusion, DiffusionConfig
from loopy_model.models import LoopyContext, LoopyModel, processors
from loopy_model.models.processors import ReferenceReadProcessor, spatial_self_attentions
from loopy_model.models.temporal import InterClipTemporalLayer
from loopy_model.presets import preset
from loopy_model.sampling import (GuidanceConfig, audio_windows, combine_guidance, generate_latents, pass_masks,
                                  sample_clip)

ROOT = Path(__file__).resolve().parents[1]
GENERATE = [sys.executable, str(ROOT / "jobs" / "generate.py")]
TRAIN = [sys.executable, str(ROOT / "jobs" / "train.py")]
SPEECH = ROOT.parent / "shared" / "data" / "real" / "edtalk_mouth_source.wav"
LAYERS, DIM = 3, 16  # the smoke wav2vec2 (pipeline/features/wav2vec.py SMOKE_CONFIG: 2 layers + 1, 16)
RATE, SPF, FPS = 16000, 640, 25
# one intra-op thread in every subprocess too: two oversubscribe a shared 2-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in test_model.py: the tiny model gains nothing from intra-op threads on a shared 2-core
    machine. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def speech(n_samples: int) -> np.ndarray:
    """Real speech (a cut of the shared test wav) or, without it, a syllable-rate modulated tone."""
    if SPEECH.exists():
        from pipeline.media import decode_audio

        samples, _ = decode_audio(str(SPEECH), RATE)
        if len(samples) >= RATE + n_samples:
            return samples[RATE:RATE + n_samples]
    t = np.arange(n_samples) / RATE
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def write_mp3_with_cover(path: Path, samples: np.ndarray) -> Path:
    """An mp3 (libmp3lame, 16 kHz mono) with a PNG cover picture as a video stream (ID3 APIC)."""
    import av
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, "PNG")
    with av.open(str(path), "w", format="mp3") as out:
        a = out.add_stream("libmp3lame", rate=RATE)
        a.layout = "mono"
        v = out.add_stream("png", rate=1)
        v.width, v.height, v.pix_fmt = 64, 64, "rgb24"
        pic = av.Packet(buf.getvalue())
        pic.stream, pic.pts, pic.dts = v, 0, 0
        out.mux(pic)
        for i in range(0, len(samples), 1152):
            frame = av.AudioFrame.from_ndarray(samples[None, i:i + 1152].astype(np.float32), format="flt",
                                               layout="mono")
            frame.sample_rate, frame.pts = RATE, i
            for p in a.encode(frame):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A real portrait (skimage's astronaut: MediaPipe finds her face), speech and the bad inputs."""
    import av
    import skimage.data
    from PIL import Image

    d = tmp_path_factory.mktemp("gen_inputs")
    Image.fromarray(skimage.data.astronaut()).save(d / "face.png")
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(d / "gray.png")  # no face
    (d / "empty.png").write_bytes(b"")
    (d / "empty.wav").write_bytes(b"")
    files = {"face": d / "face.png", "gray": d / "gray.png", "empty_png": d / "empty.png",
             "empty_wav": d / "empty.wav",
             "speech": write_wav(d / "speech.wav", speech(24100)),  # 1.506 s: 37.66 -> 38 frames
             "short": write_wav(d / "short.wav", speech(9000)),  # 14.06 -> 14 frames, 4 clips
             "silent": write_wav(d / "silent.wav", np.zeros(RATE, np.float32)),
             "cover_mp3": write_mp3_with_cover(d / "cover.mp3", speech(RATE))}
    with av.open(str(files["cover_mp3"])) as c:  # the fixture really has both streams
        assert [s.type for s in c.streams] == ["audio", "video"]
    return files


def tiny_stage2(seed: int = 0, perturb_scale: float = 0.05) -> LoopyModel:
    """A tiny stage-2 model with the smoke audio layout; its zero-initialised layers (temporal
    proj_out, audio attention output, A2L's FC) perturbed so that every condition matters."""
    torch.manual_seed(seed)
    model = LoopyModel(stage=1, audio_layers=LAYERS, audio_dim=DIM, **preset("tiny")["model"]).to_stage2()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb_scale)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A bare model directory (what Generator accepts besides RUN_DIRs and checkpoints)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_stage2().save_pretrained(d)
    return register(d)  # a model dir not written by the trainer is registered (its sha256s recorded)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """jobs/train.py: stage 1 then stage 2 (with EMA), 2 steps each, on a synthetic smoke-layout
    dataset (loader_fixtures with the smoke wav2vec2's 3 x 16 audio features)."""
    d = tmp_path_factory.mktemp("gen_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader_fixtures, "LAYERS", LAYERS)
        mp.setattr(loader_fixtures, "DIM", DIM)
        data = loader_fixtures.make_dataset(d / "data", [2, 2], frames=(20, 30), profile="smoke")
    common = ["--data", str(data), "--preset", "tiny", "--max-steps", "2", "--batch-size", "1",
              "--loader-workers", "0", "--no-progress", "--allow-smoke", "--precision", "no"]
    for stage, extra in ((1, []), (2, ["--init", str(d / "s1"), "--ema-decay", "0.9"])):
        p = subprocess.run(TRAIN + common + ["--stage", str(stage), "--out", str(d / f"s{stage}")] + extra,
                           capture_output=True, text=True, env=ENV)
        assert p.returncode == 0, p.stderr[-3000:]
    assert (d / "s2" / "checkpoints" / "step-00000002" / "ema" / "config.json").exists()
    return d / "s2"


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(**Diffusion(DiffusionConfig()).scheduler_config())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


_JOB = []


def _generate_job():
    """jobs/generate.py as a module (loaded once, under a name no other module uses)."""
    if not _JOB:
        import importlib.util

        spec = importlib.util.spec_from_file_location("jobs_generate_cli", ROOT / "jobs" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _JOB.append(module)
    return _JOB[0]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """jobs/generate.py's main() in this process (no interpreter start): (exit code, stdout, stderr)."""
    job = _generate_job()
    capsys.readouterr()
    rc = job.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- 1. the CLI writes an mp4
@pytest.mark.slow
def test_cli_writes_an_mp4_from_a_trained_checkpoint(trained_run, inputs, tmp_path):
    from pipeline.media import decode_audio, probe, read_clip

    out = tmp_path / "talk.mp4"
    p = subprocess.run(GENERATE + ["--model", str(trained_run), "--image", str(inputs["face"]), "--audio",
                                   str(inputs["speech"]), "--out", str(out), "--steps", "2", "--device", "cpu",
                                   "--no-progress"], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    n_samples = len(decode_audio(str(inputs["speech"]), RATE)[0])
    assert n_samples == 24100
    n_frames = round(n_samples / SPF)  # 38
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["frames"] == n_frames and result["size"] == 128
    info = probe(str(out))
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.fps == pytest.approx(25.0) and info.nominal_fps == pytest.approx(25.0) and not info.vfr
    size = preset("tiny")["data"]["latent_size"] * 8  # 16x16 latents -> 128x128
    assert (info.width, info.height) == (size, size)
    assert info.n_frames == n_frames
    audio_s = n_samples / RATE
    assert abs(info.duration_s - audio_s) <= 1 / FPS, (info.duration_s, audio_s)
    assert abs(info.video_duration_s - audio_s) <= 1 / FPS
    assert (info.audio_rate, info.audio_channels, info.audio_streams) == (RATE, 1, 1)
    frames, audio, _ = read_clip(out.read_bytes())
    assert frames.shape == (n_frames, size, size, 3)
    assert abs(len(audio) / RATE - audio_s) <= 1 / FPS  # the input audio is what was muxed
    assert not (tmp_path / ".talk.mp4.tmp.mp4").exists()


# ----------------------------------------------------------------------------- 2. guidance arithmetic
def test_combine_guidance_formula():
    one, two, four = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    # e_noref + ref_cfg (e_noaudio - e_noref) + audio_cfg (e_all - e_noaudio) = 4 + 3 (2 - 4) + 5 (1 - 2)
    assert combine_guidance(one, two, four, audio_cfg=5.0, ref_cfg=3.0).item() == -7.0
    g = torch.Generator().manual_seed(0)
    e_all, e_noaudio, e_noref = (torch.randn(2, 4, 4, 16, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(combine_guidance(e_all, e_noaudio, e_noref, 5.0, 3.0),
                               e_noref + 3.0 * (e_noaudio - e_noref) + 5.0 * (e_all - e_noaudio), atol=0, rtol=0)
    torch.testing.assert_close(combine_guidance(e_all, e_noaudio, e_noref, 1.0, 1.0), e_all, atol=1e-6, rtol=0)
    torch.testing.assert_close(combine_guidance(e_all, e_noaudio, e_noref, 0.0, 1.0), e_noaudio, atol=1e-6, rtol=0)
    torch.testing.assert_close(combine_guidance(e_all, e_noaudio, e_noref, 0.0, 0.0), e_noref, atol=0, rtol=0)


def test_pass_masks_layout():
    m = pass_masks(2, "cpu")
    assert m["ref_keep"].tolist() == [True, True, True, True, False, False]
    assert m["audio_keep"].tolist() == [True, True, False, False, False, False]


class StubModel:
    """A network whose three guidance passes return known tensors: pass p (read from the row's
    audio_keep and ctx.ref_keep) predicts E[p] + 0.5 * x_in, per sample."""

    def __init__(self, b: int, f: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.E = [torch.randn(b, f, 4, 16, 16, generator=g) for _ in range(3)]
        self.config = type("Config", (), {"num_frames": f, "stage": 2})()
        self.calls: list[dict] = []

    @staticmethod
    def pass_of(audio_keep: bool, ref_keep: bool) -> int:
        return {(True, True): 0, (False, True): 1, (False, False): 2}[(audio_keep, ref_keep)]

    def denoise(self, x, t, ctx, *, audio=None, a2l_condition=None, audio_keep=None, **_):
        self.calls.append(dict(x=x, t=t, ctx=ctx, audio=audio, a2l_condition=a2l_condition, audio_keep=audio_keep))
        b = len(self.E[0])
        out = torch.empty_like(x)
        for row in range(x.shape[0]):
            p = self.pass_of(bool(audio_keep[row]), bool(ctx.ref_keep[row]))
            out[row] = self.E[p][row % b] + 0.5 * x[row]
        return out


def manual_ddim(stub: StubModel, noise: torch.Tensor, guidance: GuidanceConfig, only_all: bool = False):
    """The same DDIM trajectory, guidance combined by hand from the stub's known predictions."""
    sch = scheduler()
    sch.set_timesteps(guidance.steps)
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t)
        e_all, e_noaudio, e_noref = (stub.E[p] + 0.5 * x_in for p in range(3))
        e = e_all if only_all else (e_noref + guidance.ref_cfg * (e_noaudio - e_noref)
                                    + guidance.audio_cfg * (e_all - e_noaudio))
        x = sch.step(e, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 3])
def test_sample_clip_combines_the_three_passes_exactly(steps):
    b, f = 2, 4
    stub = StubModel(b, f)
    noise = torch.randn(b, f, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    audio = torch.randn(b, f, 5, LAYERS, DIM, generator=torch.Generator().manual_seed(2))
    ctx = LoopyContext(batch_size=b, num_frames=f, ref_keep=torch.ones(b, dtype=torch.bool))
    guidance = GuidanceConfig(audio_cfg=5.0, ref_cfg=3.0, steps=steps)
    out = sample_clip(stub, scheduler(), ctx, audio, noise, guidance)
    torch.testing.assert_close(out, manual_ddim(stub, noise, guidance), atol=1e-5, rtol=1e-5)

    # the three passes are ONE batched call per step, pass-major, on identical inputs
    assert len(stub.calls) == steps
    for call in stub.calls:
        assert call["x"].shape == (3 * b, f, 4, 16, 16)
        x1, x2, x3 = call["x"].chunk(3)
        assert torch.equal(x1, x2) and torch.equal(x1, x3)
        assert call["t"].shape == (3 * b,) and len(set(call["t"].tolist())) == 1
        assert torch.equal(call["audio"], audio.repeat(3, 1, 1, 1, 1))
        assert call["a2l_condition"].tolist() == [0] * (3 * b)  # A2L from audio only
        assert call["audio_keep"].tolist() == [True] * b + [False] * (2 * b)
        assert call["ctx"].ref_keep.tolist() == [True] * (2 * b) + [False] * b
        assert call["ctx"].batch_size == 3 * b
    sch = scheduler()
    sch.set_timesteps(steps)
    assert [int(c["t"][0]) for c in stub.calls] == sch.timesteps.tolist()


def test_sample_clip_with_unit_guidance_is_the_all_conditions_prediction():
    b, f = 1, 4
    stub = StubModel(b, f, seed=3)
    noise = torch.randn(b, f, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    ctx = LoopyContext(batch_size=b, num_frames=f, ref_keep=torch.ones(b, dtype=torch.bool))
    guidance = GuidanceConfig(audio_cfg=1.0, ref_cfg=1.0, steps=4)
    out = sample_clip(stub, scheduler(), ctx, torch.zeros(b, f, 5, LAYERS, DIM), noise, guidance)
    torch.testing.assert_close(out, manual_ddim(stub, noise, guidance, only_all=True), atol=1e-5, rtol=1e-5)
    # and the guidance is not a no-op otherwise
    stub.calls.clear()
    other = sample_clip(stub, scheduler(), ctx, torch.zeros(b, f, 5, LAYERS, DIM), noise,
                        GuidanceConfig(audio_cfg=5.0, ref_cfg=3.0, steps=4))
    assert (other - out).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 3. what each pass sees
@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call (q, k, v, mask, the code objects on the stack), as in test_model.py."""
    real = processors.F.scaled_dot_product_attention
    calls: list[dict] = []

    def recorder(query, key, value, attn_mask=None, *args, **kwargs):
        frame, codes = sys._getframe(1), []
        while frame is not None and len(codes) < 16:
            codes.append(frame.f_code)
            frame = frame.f_back
        calls.append(dict(q=query, k=key, v=value, mask=attn_mask, codes=codes))
        return real(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(processors.F, "scaled_dot_product_attention", recorder)
    return calls


READ_CODE = ReferenceReadProcessor.__call__.__code__
INTER_CODE = InterClipTemporalLayer.forward.__code__


def test_guidance_passes_drop_audio_a2l_reference_and_motion_on_the_attention_inputs(sdpa_calls):
    model = tiny_stage2()
    cfg = model.config
    f, m = cfg.num_frames, cfg.num_motion_latents
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(1, 4, 16, 16, generator=g)
    motion = torch.randn(1, m, 4, 16, 16, generator=g)
    history = torch.tensor([[False] + [True] * (m - 1)])  # a short history: the oldest slot is empty
    ctx = model.reference_context(ref, f, motion_latents=motion, motion_mask=history)
    audio = torch.randn(1, f, 5, LAYERS, DIM, generator=g)
    noise = torch.randn(1, f, 4, 16, 16, generator=g)

    seen = {}
    hooks = [model.audio_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("audio", args[0])),
             model.a2l.register_forward_hook(lambda _m, _a, out: seen.__setitem__("a2l_out", out)),
             model.denoising_unet.class_embedding.register_forward_pre_hook(
                 lambda _m, args: seen.__setitem__("class_labels", args[0]))]
    sdpa_calls.clear()
    try:
        sample_clip(model, scheduler(), ctx, audio, noise, GuidanceConfig(steps=1), motion_mask=ctx.motion_keep)
    finally:
        for h in hooks:
            h.remove()

    # audio: pass 1 gets the real features, passes 2 and 3 exact zeros
    a = seen["audio"]
    assert a.shape == (3, f, 5, LAYERS, DIM)
    torch.testing.assert_close(a[0], audio[0], atol=0, rtol=0)
    assert a[0].abs().min() > 0 and not a[1:].any()
    # A2L motion latents (the class labels reaching the U-Net's class embedding): zero for passes 2-3
    labels = seen["class_labels"].view(3, f, -1)
    assert labels[0].abs().max() > 1e-4 and not labels[1:].any()
    assert seen["a2l_out"].view(3, f, -1)[1:].abs().max() > 1e-4  # A2L's own output is not zero there

    # reference: own + reference tokens in every denoiser attn1; masked exactly on pass 3's rows
    reads = [c for c in sdpa_calls if c["codes"][0] is READ_CODE]
    assert len(reads) == len(spatial_self_attentions(model.denoising_unet)) == len(ctx.ref_bank)
    for call in reads:
        q, k, mask = call["q"], call["k"], call["mask"]
        own = q.shape[2]
        n_ref = k.shape[2] - own
        assert q.shape[0] == k.shape[0] == 3 * f and n_ref == own  # reference at the same resolution
        assert mask is not None and mask.dtype == torch.bool and mask.shape == (3 * f, 1, 1, own + n_ref)
        assert mask[..., :own].all()
        assert mask[:2 * f, ..., own:].all()  # passes 1 and 2 see the reference
        assert not mask[2 * f:, ..., own:].any()  # pass 3 does not

    # motion frames: the history mask for passes 1-2, no motion frame at all for pass 3
    inters = [c for c in sdpa_calls if INTER_CODE in c["codes"]]
    assert len(inters) == 2 * len(reads)  # attn1 + attn2 of every inter-clip layer
    for call in inters:
        q, mask = call["q"], call["mask"]
        assert q.shape[2] == m + f and mask is not None and mask.dtype == torch.bool
        mask = mask.expand(q.shape[0], q.shape[1], m + f, m + f)
        pixels = q.shape[0] // 3  # rows are (pass, pixel)
        for p in (0, 1):
            rows = mask[p * pixels:(p + 1) * pixels]
            assert not rows[..., 0].any() and rows[..., 1:m].all() and rows[..., m:].all()
        assert not mask[2 * pixels:, ..., :m].any() and mask[2 * pixels:, ..., m:].all()


def test_first_clip_masks_every_motion_slot_in_all_passes(sdpa_calls):
    model = tiny_stage2()
    f, m = model.config.num_frames, model.config.num_motion_latents
    ref = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    ctx = model.reference_context(ref, f, motion_latents=None)
    assert ctx.motion_keep.tolist() == [[False] * m]
    sdpa_calls.clear()
    sample_clip(model, scheduler(), ctx, torch.randn(1, f, 5, LAYERS, DIM), torch.randn(1, f, 4, 16, 16),
                GuidanceConfig(steps=1), motion_mask=ctx.motion_keep)
    inters = [c for c in sdpa_calls if INTER_CODE in c["codes"]]
    assert inters
    for call in inters:
        mask = call["mask"].expand(call["q"].shape[0], call["q"].shape[1], m + f, m + f)
        assert not mask[..., :m].any() and mask[..., m:].all()


# ----------------------------------------------------------------------------- 4. determinism
def test_same_seed_same_latents_other_seed_other_latents():
    model = tiny_stage2()
    ref = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(7))
    audio = torch.randn(6, LAYERS, DIM, generator=torch.Generator().manual_seed(8))
    guidance = GuidanceConfig(steps=2)
    a = generate_latents(model, scheduler(), ref, audio, 6, guidance, seed=0, progress=False)
    b = generate_latents(model, scheduler(), ref, audio, 6, guidance, seed=0, progress=False)
    c = generate_latents(model, scheduler(), ref, audio, 6, guidance, seed=1, progress=False)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-2


def test_same_seed_same_video_frames(model_dir, inputs, tmp_path):
    from loopy_model.generate import GenerateConfig, Generator
    from pipeline.media import read_clip

    gen = Generator(model_dir, GenerateConfig(guidance=GuidanceConfig(steps=2), progress=False))
    frames = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = gen.render(inputs["face"], inputs["short"], tmp_path / f"{name}.mp4", seed=seed)
        assert result["frames"] == 14
        frames[name] = read_clip((tmp_path / f"{name}.mp4").read_bytes())[0]
        assert frames[name].shape == (14, 128, 128, 3)
    assert np.array_equal(frames["a"], frames["b"])
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert np.abs(frames["a"].astype(int) - frames["c"].astype(int)).mean() > 1.0


# ----------------------------------------------------------------------------- 5. bad inputs
BAD = {  # case -> (image key, audio key, the file the message names)
    "no_face": ("gray", "short", "gray"),
    "silent_audio": ("face", "silent", "silent"),
    "empty_image": ("empty_png", "short", "empty_png"),
    "empty_audio": ("face", "empty_wav", "empty_wav"),
    "mp3_with_cover_as_image": ("cover_mp3", "short", "cover_mp3"),
    "image_as_audio": ("face", "face", "face"),
    "missing_image": ("missing", "short", "missing"),
}


def _path(inputs, key: str) -> Path:
    return inputs[key] if key in inputs else inputs["face"].parent / f"{key}.png"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_line_exit_2(case, model_dir, inputs, tmp_path, capsys):
    image, audio, named = (_path(inputs, k) for k in BAD[case])
    out = tmp_path / "out.mp4"
    rc, stdout, stderr = run_main(["--model", str(model_dir), "--image", str(image), "--audio", str(audio),
                                   "--out", str(out), "--steps", "1", "--device", "cpu", "--no-progress"], capsys)
    assert rc == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert str(named) in lines[0]
    assert not out.exists() and not stdout.strip()


def test_mp3_with_cover_art_as_audio_works(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "cover.mp4"
    rc, stdout, stderr = run_main(["--model", str(model_dir), "--image", str(inputs["face"]), "--audio",
                                   str(inputs["cover_mp3"]), "--out", str(out), "--steps", "1", "--device", "cpu",
                                   "--no-progress"], capsys)
    assert rc == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["frames"] == 25
    assert out.exists()


def test_not_a_loopy_checkpoint(inputs, tmp_path, capsys):
    bogus = tmp_path / "unet"
    bogus.mkdir()
    (bogus / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    for model in (bogus, tmp_path / "nothing_here", inputs["face"]):
        rc, _, stderr = run_main(["--model", str(model), "--image", str(inputs["face"]), "--audio",
                                  str(inputs["short"]), "--out", str(tmp_path / "o.mp4")], capsys)
        assert rc == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(model) in lines[0], stderr


def _mismatched_checkpoint(model_dir: Path, tmp_path: Path) -> Path:
    import shutil

    bad = tmp_path / "mismatched"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["audio_proj_hidden"] *= 2  # the weights no longer fit the config
    (bad / "config.json").write_text(json.dumps(config))
    return register(bad)  # recorded as it is: what refuses it is the config mismatch


def test_checkpoint_not_matching_its_config_exit_2_named(model_dir, inputs, tmp_path, capsys):
    bad = _mismatched_checkpoint(model_dir, tmp_path)
    rc, _, stderr = run_main(["--model", str(bad), "--image", str(inputs["face"]), "--audio", str(inputs["short"]),
                              "--out", str(tmp_path / "o.mp4")], capsys)
    assert rc == 2 and "Traceback" not in stderr
    assert stderr.startswith("error: ") and str(bad) in stderr.splitlines()[0]
    assert "does not match" in stderr.splitlines()[0]


def test_checkpoint_not_matching_its_config_is_one_line(model_dir, inputs, tmp_path, capsys):
    bad = _mismatched_checkpoint(model_dir, tmp_path)
    rc, _, stderr = run_main(["--model", str(bad), "--image", str(inputs["face"]), "--audio", str(inputs["short"]),
                              "--out", str(tmp_path / "o.mp4")], capsys)
    assert rc == 2
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.fixture(scope="module")
def bad_batch_cli(trained_run, inputs, tmp_path_factory):
    """One real jobs/generate.py process over a batch of every bad input plus one good request."""
    d = tmp_path_factory.mktemp("bad_batch")
    rows = [{"image": str(_path(inputs, image)), "audio": str(_path(inputs, audio)), "out": str(d / f"{case}.mp4")}
            for case, (image, audio, _) in sorted(BAD.items())]
    rows.append({"image": str(inputs["face"]), "audio": str(inputs["short"]), "out": str(d / "good.mp4")})
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = subprocess.run(GENERATE + ["--model", str(trained_run), "--batch", str(d / "requests.jsonl"), "--steps", "1",
                                   "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=ENV)
    return p, d


@pytest.mark.slow
def test_bad_inputs_in_a_real_process_exit_2_without_traceback(bad_batch_cli, inputs):
    p, d = bad_batch_cli
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "Error:" not in p.stderr.replace("error:", "")
    errors = error_lines(p.stderr)
    assert len(errors) == len(BAD), p.stderr
    for line, (case, (_, _, named)) in zip(errors, sorted(BAD.items())):
        assert str(_path(inputs, named)) in line, (case, line)
        assert not (d / f"{case}.mp4").exists()
    assert (d / "good.mp4").exists()  # the bad requests failed alone
    assert len(p.stdout.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_input_stderr_is_only_the_error_lines(bad_batch_cli):
    p, _ = bad_batch_cli
    assert p.stderr.strip().splitlines() == error_lines(p.stderr)


# ----------------------------------------------------------------------------- 6. --batch, one load
def test_batch_renders_with_one_model_load(model_dir, inputs, tmp_path, capsys, monkeypatch):
    loads = []
    real = LoopyModel.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(LoopyModel, "from_pretrained", counting)
    rows = [{"image": str(inputs["face"]), "audio": str(inputs["short"]), "out": str(tmp_path / "one.mp4")},
            {"image": str(inputs["gray"]), "audio": str(inputs["short"]), "out": str(tmp_path / "bad.mp4")},
            {"image": str(inputs["face"]), "audio": str(inputs["cover_mp3"]), "out": str(tmp_path / "two.mp4"),
             "seed": 3}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc, stdout, stderr = run_main(["--model", str(model_dir), "--batch", str(tmp_path / "requests.jsonl"),
                                   "--steps", "1", "--device", "cpu", "--no-progress"], capsys)
    assert rc == 2  # one request failed ...
    assert len(loads) == 1  # ... the model was loaded once for all three
    assert stderr.strip().splitlines() == [f"error: {inputs['gray']}: no face found"]
    results = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["out"] for r in results] == [str(tmp_path / "one.mp4"), str(tmp_path / "two.mp4")]
    assert [r["frames"] for r in results] == [14, 25]
    assert (tmp_path / "one.mp4").exists() and (tmp_path / "two.mp4").exists() and not (tmp_path / "bad.mp4").exists()


def test_batch_request_without_an_output_is_refused(model_dir, inputs, tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": str(inputs["face"]), "audio": str(inputs["short"])}) + "\n")
    rc, _, stderr = run_main(["--model", str(model_dir), "--batch", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 2 and error_lines(stderr) and "lacks ['out']" in stderr and "Traceback" not in stderr


def test_batch_file_with_a_bad_json_line_exit_2(model_dir, tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text('{"image": "a.png"\n')
    rc, _, stderr = run_main(["--model", str(model_dir), "--batch", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and error_lines(stderr)


def test_batch_file_with_a_bad_json_line_names_the_file(model_dir, tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text('{"image": "a.png"\n')
    rc, _, stderr = run_main(["--model", str(model_dir), "--batch", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 2 and str(tmp_path / "r.jsonl") in stderr


def test_batch_line_that_is_not_an_object_exit_2(model_dir, tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text("5\n")
    rc, _, stderr = run_main(["--model", str(model_dir), "--batch", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 2 and len(error_lines(stderr)) == 1 and str(tmp_path / "r.jsonl") in stderr


# ----------------------------------------------------------------------------- checkpoint resolution
@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A RUN_DIR trained with v-prediction and zero-terminal SNR (files only, no weights)."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000002"
    for sub in ("model", "ema"):
        (step / sub).mkdir(parents=True)
        (step / sub / "config.json").write_text('{"_class_name": "LoopyModel", "stage": 2}')
    (step / "trainer.pt").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("step-00000002")
    (run / "config.json").write_text(json.dumps({"prediction_type": "v_prediction", "zero_terminal_snr": True}))
    return run


def test_resolve_checkpoint_from_run_dir_and_checkpoint(fake_run):
    from loopy_model.generate import resolve_checkpoint

    step = fake_run / "checkpoints" / "step-00000002"
    want = {"prediction_type": "v_prediction", "zero_terminal_snr": True}
    assert resolve_checkpoint(fake_run) == (step / "ema", want)
    assert resolve_checkpoint(fake_run, use_ema=False) == (step / "model", want)
    assert resolve_checkpoint(step) == (step / "ema", want)


@pytest.mark.parametrize("sub", ["model", "ema"])
def test_resolve_checkpoint_from_model_dir_keeps_the_run_schedule(fake_run, sub):
    from loopy_model.generate import resolve_checkpoint

    path = fake_run / "checkpoints" / "step-00000002" / sub
    assert resolve_checkpoint(path)[1] == {"prediction_type": "v_prediction", "zero_terminal_snr": True}


# ----------------------------------------------------------------------------- 7. autoregressive clips
def test_autoregressive_clips_motion_frames_and_reference_once_per_clip(monkeypatch):
    import loopy_model.sampling as sampling

    model = tiny_stage2()
    cfg = model.config
    f, n_frames, steps = cfg.num_frames, 10, 2
    clips = -(-n_frames // f)  # 3: 4 + 4 + 2 (the last clip cut)
    ref = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(9))
    audio = torch.randn(n_frames, LAYERS, DIM, generator=torch.Generator().manual_seed(10))

    context_calls, clip_calls, ref_forwards, denoise_calls = [], [], [], []
    real_context, real_denoise, real_sample = model.reference_context, model.denoise, sampling.sample_clip

    def context(*args, **kwargs):
        ctx = real_context(*args, **kwargs)
        context_calls.append(dict(kwargs, ctx=ctx))
        return ctx

    def denoise(x, *args, **kwargs):
        denoise_calls.append(x.shape[0])
        return real_denoise(x, *args, **kwargs)

    def sample(model_, scheduler_, ctx, window, noise, *args, **kwargs):
        clip_calls.append(dict(ctx=ctx, window=window, motion_mask=kwargs.get("motion_mask")))
        return real_sample(model_, scheduler_, ctx, window, noise, *args, **kwargs)

    monkeypatch.setattr(model, "reference_context", context)
    monkeypatch.setattr(model, "denoise", denoise)
    monkeypatch.setattr(sampling, "sample_clip", sample)
    hook = model.reference_unet.register_forward_pre_hook(lambda *_: ref_forwards.append(1))
    try:
        latents = generate_latents(model, scheduler(), ref, audio, n_frames, GuidanceConfig(steps=steps), seed=0,
                                   progress=False)
    finally:
        hook.remove()

    assert latents.shape == (n_frames, 4, 16, 16)
    assert len(clip_calls) == clips
    assert len(ref_forwards) == clips + 1  # reference tokens once per video, motion frames once per clip
    assert denoise_calls == [3] * (clips * steps)  # one batched 3-pass forward per step
    assert len(context_calls) == clips + 1
    base = context_calls[0]
    assert base.get("motion_latents") is None and base.get("reuse") is None
    assert context_calls[1].get("motion_latents") is None  # the first clip: no history, every slot masked
    assert not context_calls[1]["ctx"].motion_keep.any()
    for call in context_calls[1:]:
        assert call["reuse"] is base["ctx"]
        assert all(torch.equal(call["ctx"].ref_bank[k], base["ctx"].ref_bank[k]) for k in base["ctx"].ref_bank)

    # clip 2's motion frames are clip 1's latents, reduced by the temporal segment module: with the
    # tiny preset (s=2, r=2, 2 segments over 6 frames) and 4 frames of history, slots 1..3 are frames
    # 1..3 of the video (offsets -3, -2, -1 in the uniform mode) and slot 0 (offset -5) is empty
    second = context_calls[2]
    motion, mask = second["motion_latents"], second["motion_mask"]
    assert mask.tolist() == [[False, True, True, True]]
    assert torch.equal(motion[0, 1:], latents[1:4]) and not motion[0, 0].any()
    expected, expected_mask = tsm.apply_temporal_segment(latents[None, :4], stride=cfg.motion_stride,
                                                         expand_ratio=cfg.motion_expand_ratio,
                                                         num_segments=cfg.motion_segments, mode=cfg.motion_mode)
    assert torch.equal(motion, expected) and torch.equal(mask, expected_mask)
    third = context_calls[3]  # 8 frames of history: every slot real
    assert third["motion_mask"].all()
    assert torch.equal(third["motion_latents"], tsm.apply_temporal_segment(
        latents[None, :8], stride=cfg.motion_stride, expand_ratio=cfg.motion_expand_ratio,
        num_segments=cfg.motion_segments, mode=cfg.motion_mode)[0])
    for k, call in enumerate(clip_calls):
        assert torch.equal(call["motion_mask"], context_calls[k + 1]["ctx"].motion_keep)
        torch.testing.assert_close(call["window"][0], audio_windows(audio, k * f, f), atol=0, rtol=0)


@pytest.mark.slow
def test_batch_as_a_ray_data_job(model_dir, inputs, tmp_path, ray_local):
    """--ray: the same requests over a model-holding Ray actor; a bad request comes back as an
    error row, the good ones are written and match the in-process render."""
    from loopy_model.generate import GenerateConfig, Generator, render_with_ray
    from loopy_model.sampling import GuidanceConfig

    cfg = GenerateConfig(guidance=GuidanceConfig(steps=1), progress=False)
    rows = [{"image": str(inputs["face"]), "audio": str(inputs["short"]), "out": str(tmp_path / "ray.mp4")},
            {"image": str(inputs["gray"]), "audio": str(inputs["short"]), "out": str(tmp_path / "bad.mp4")}]
    results = sorted(render_with_ray(model_dir, cfg, rows, actors=1), key=lambda r: r["out"])
    assert [r["error"] for r in results] == [f"{inputs['gray']}: no face found", ""]
    assert results[1]["frames"] == 14 and not (tmp_path / "bad.mp4").exists()
    Generator(model_dir, cfg).render(inputs["face"], inputs["short"], tmp_path / "local.mp4")
    from pipeline.media import read_clip

    ray_frames, _, _ = read_clip((tmp_path / "ray.mp4").read_bytes())
    local_frames, _, _ = read_clip((tmp_path / "local.mp4").read_bytes())
    assert np.array_equal(ray_frames, local_frames)
