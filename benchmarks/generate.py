"""Audio-only generation speed and memory: seconds per generated second of video, peak memory.

    python benchmarks/generate.py                                   # CPU, tiny preset (what CI can run)
    python benchmarks/generate.py --device cuda --preset paper --out benchmarks/results/generate-gpu.json
    python benchmarks/generate.py --preset paper --build-only       # the paper path builds (meta device, no run)

What is timed is the sampler of the library (``loopy_model.sampling.generate_latents``: the
ReferenceNet once per clip, ``--steps`` DDIM steps each one batched forward of the three guidance
passes, autoregressive clips with temporal-segment motion frames) and the VAE decode of every
frame (``loopy_model.generate.Generator.decode``), on a random-init stage-2 ``LoopyModel`` of the
preset. The once-per-video inputs (face detection and crop, the portrait's VAE encode, wav2vec2)
are not in the model-side figure; on CPU with the tiny preset the ``end_to_end`` entry adds them:
``Generator.render`` of a real portrait (skimage's astronaut) and speech (the shared test wav when
present, else a modulated tone) into an mp4, the smoke feature models and MediaPipe included.

- ``tiny`` (default on CPU): 16x16 latents (128x128 video), 4-frame clips, smoke VAE and the smoke
  wav2vec2 audio layout (3 x 16), fp32.
- ``paper`` (for a GPU): SD 1.5 U-Nets, 64x64 latents (512x512), 12-frame clips, 20 motion latents,
  wav2vec2-base layout (13 x 768), SD 1.5 VAE config (random init), bf16 autocast over fp32
  weights, as ``Generator.render`` runs on CUDA. Goal (issue 10): a 12-frame clip (25 steps x 3
  passes) in <= 5 s and <= 24 GB on an H100-class GPU.

Each configuration runs ``--warmup`` untimed videos (one clip each) and then ``--repeats`` timed
ones; reported: median and min seconds, seconds per video second (median), seconds per clip,
the split latents / decode, and the peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (and
reserved) over the timed runs, on CPU the process's peak RSS (``resource.getrusage`` ru_maxrss,
imports included) and the RSS before the model was built. The JSON (``--out``) records the machine;
the last line printed is the same JSON on one line.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loopy_model.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from machine import loadavg, machine  # noqa: E402  (benchmarks/machine.py)
from loopy_model.generate import AUDIO_RATE, FPS, GenerateConfig, Generator  # noqa: E402
from loopy_model.models import LoopyModel  # noqa: E402
from loopy_model.presets import preset  # noqa: E402
from loopy_model.sampling import GuidanceConfig, generate_latents  # noqa: E402

GIB = 2**30
GOALS = {"paper_clip_s_max": 5.0, "paper_peak_gb_max": 24.0}
AUDIO_LAYOUT = {"tiny": (3, 16), "paper": (13, 768)}  # smoke wav2vec2; wav2vec2-base, all layers
SPEECH = ROOT.parent / "shared" / "data" / "real" / "edtalk_mouth_source.wav"


# ---------------------------------------------------------------------------- machine
def rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------- models
def build_model(name: str, device: torch.device, seed: int = 0) -> LoopyModel:
    """Random-init stage-2 LoopyModel of the preset, with the preset's feature models' audio layout."""
    layers, dim = AUDIO_LAYOUT[name]
    torch.manual_seed(seed)
    return LoopyModel(stage=2, audio_layers=layers, audio_dim=dim, **preset(name)["model"]).eval().to(device)


def build_vae(name: str, device: torch.device):
    from diffusers import AutoencoderKL

    from pipeline.features.vae import SD15_VAE_CONFIG, build_smoke_vae

    if name == "tiny":
        return build_smoke_vae().to(device)
    torch.manual_seed(0)
    return AutoencoderKL(**SD15_VAE_CONFIG).eval().to(device)


def build_only(name: str) -> dict:
    """Construct the preset's model and VAE on the meta device: configs and shapes, no memory."""
    with torch.device("meta"):
        model = build_model(name, torch.device("meta"))
        vae = build_vae(name, torch.device("meta"))
    cfg = model.config
    return {"preset": name, "model_params": sum(p.numel() for p in model.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters()), "num_frames": cfg.num_frames,
            "num_motion_latents": cfg.num_motion_latents, "latent_size": preset(name)["data"]["latent_size"],
            "audio_layout": list(AUDIO_LAYOUT[name])}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- one video
@torch.no_grad()
def one_video(model, vae, scheduler, device, frames: int, steps: int, precision: str, seed: int) -> dict:
    cfg = model.config
    size = model.config.unet["sample_size"]
    layers, dim = cfg.audio_layers, cfg.audio_dim
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(4, size, size, generator=g).to(device)
    audio = torch.randn(frames, layers, dim, generator=g)
    guidance = GuidanceConfig(steps=steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync(device)
    t0 = time.perf_counter()
    with autocast:
        latents = generate_latents(model, scheduler, ref, audio, frames, guidance, seed=seed, progress=False)
    sync(device)
    t1 = time.perf_counter()
    video = Generator.decode(SimpleNamespace(vae=vae, device=device), latents.float())
    sync(device)
    t2 = time.perf_counter()
    assert video.shape == (frames, 8 * size, 8 * size, 3), video.shape
    assert np.isfinite(latents.float().cpu().numpy()).all()
    return {"latents_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0}


def bench(args, device: torch.device) -> dict:
    rss_before = rss_mib()
    model = build_model(args.preset, device)
    vae = build_vae(args.preset, device)
    scheduler_cfg = Diffusion(DiffusionConfig()).scheduler_config()
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**scheduler_cfg)
    f = model.config.num_frames
    for i in range(args.warmup):  # one clip: kernels, allocator, autotuning
        one_video(model, vae, scheduler, device, f, min(args.steps, 2), args.precision, seed=100 + i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [one_video(model, vae, scheduler, device, args.frames, args.steps, args.precision, seed=i)
            for i in range(args.repeats)]
    clips = -(-args.frames // f)
    video_s = args.frames / FPS
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = {"preset": args.preset, "device": str(device), "precision": args.precision, "steps": args.steps,
           "passes_per_step": 3, "frames": args.frames, "video_s": video_s, "clip_frames": f, "clips": clips,
           "size": 8 * model.config.unet["sample_size"], "repeats": args.repeats, "warmup": args.warmup,
           "runs": runs, "median_total_s": med["total_s"], "min_total_s": min(r["total_s"] for r in runs),
           "median_latents_s": med["latents_s"], "median_decode_s": med["decode_s"],
           "s_per_video_s": med["total_s"] / video_s, "s_per_clip": med["total_s"] / clips,
           "latents_s_per_clip": med["latents_s"] / clips,
           "model_params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
        if args.preset == "paper":
            out["goals"] = {**GOALS, "clip_s_ok": out["s_per_clip"] <= GOALS["paper_clip_s_max"],
                            "peak_gb_ok": out["peak_allocated_gb"] <= GOALS["paper_peak_gb_max"]}
    else:
        out["rss_before_model_mib"] = rss_before
        out["peak_rss_mib"] = peak_rss_mib()
    del model, vae
    return out


# ---------------------------------------------------------------------------- end to end (CPU tiny)
def write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_RATE)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def end_to_end(args, device: torch.device) -> dict:
    """Generator.render: portrait + speech -> mp4, every stage of jobs/generate.py after the load."""
    import skimage.data
    from PIL import Image

    from pipeline.media import decode_audio

    n = int(args.frames * AUDIO_RATE / FPS)
    samples = None
    if SPEECH.exists():
        s, _ = decode_audio(str(SPEECH), AUDIO_RATE)
        samples = s[AUDIO_RATE:AUDIO_RATE + n] if len(s) >= AUDIO_RATE + n else None
    source = str(SPEECH) if samples is not None else "tone"
    if samples is None:
        t = np.arange(n) / AUDIO_RATE
        samples = (0.3 * np.sin(2 * np.pi * 180 * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="gen-bench-") as tmp:
        tmp = Path(tmp)
        build_model(args.preset, torch.device("cpu")).save_pretrained(tmp / "model")
        Image.fromarray(skimage.data.astronaut()).save(tmp / "face.png")
        write_wav(tmp / "speech.wav", samples)
        t0 = time.perf_counter()
        gen = Generator(tmp / "model", GenerateConfig(guidance=GuidanceConfig(steps=args.steps), progress=False,
                                                      device=str(device)))
        load_s = time.perf_counter() - t0
        gen.render(tmp / "face.png", tmp / "speech.wav", tmp / "warm.mp4", seed=0)  # MediaPipe, first calls
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            result = gen.render(tmp / "face.png", tmp / "speech.wav", tmp / f"out{i}.mp4", seed=i)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"audio": source, "frames": result["frames"], "video_s": result["seconds"], "size": result["size"],
            "load_s": load_s, "render_s": times, "median_render_s": med, "s_per_video_s": med / result["seconds"],
            "peak_rss_mib": peak_rss_mib()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=("tiny", "paper"), default=None, help="default: tiny on CPU, paper on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 25 paper, 10 tiny)")
    ap.add_argument("--frames", type=int, default=None,
                    help="video frames (default: one 12-frame clip for paper, 50 = 2 s for tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", choices=("bf16", "no"), default=None, help="default: bf16 on CUDA, no on CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip Generator.render (CPU tiny only)")
    ap.add_argument("--build-only", action="store_true",
                    help="construct the preset's model and VAE on the meta device and stop (no forward)")
    ap.add_argument("--out", help="results JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.preset = args.preset or ("paper" if device.type == "cuda" else "tiny")
    args.steps = args.steps or (25 if args.preset == "paper" else 10)
    args.frames = args.frames or (preset(args.preset)["model"]["num_frames"] if args.preset == "paper" else 50)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    if args.preset == "paper" and device.type == "cpu" and not args.build_only:
        ap.error("the paper preset is for a GPU (--device cuda); on CPU use --build-only")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.build_only:
        result = {"build_only": build_only(args.preset), "machine": machine(torch.device("cpu"))}
    else:
        result = {"machine": machine(device), "args": vars(args), "model_side": bench(args, device)}
        if device.type == "cpu" and args.preset == "tiny" and not args.no_end_to_end:
            result["end_to_end"] = end_to_end(args, device)
        result["machine"]["loadavg_end"] = loadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
