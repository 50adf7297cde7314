"""Throughput of the feature stages (frames/s), for sizing the features actor pool.

    python benchmarks/features.py [--seconds 1] [--frames 8] [--batch-size 8] [--out bench_features.json]

CPU: every stage with the smoke models (tiny random weights of the real architectures), so the
numbers measure the pipeline's own overhead and the architectures' shape, not production speed.
CUDA (when present): SD 1.5 VAE encode with the real architecture (random weights: speed does not
depend on them), bare ``vae.encode`` on tensors already on the GPU vs the extractor's path
(``vae.encode_frames``: uint8 host frames -> device -> [-1,1] -> encode -> fp16 mean on host)
at the same batch size and precision; the ratio is the extractor's overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.features import vae as vae_mod  # noqa: E402
from pipeline.features import wav2vec as w2v  # noqa: E402
from pipeline.features.extractor import FeatureExtractor, resolve_dtype  # noqa: E402
from pipeline.features.motion import motion_table  # noqa: E402


def timed(fn, n_frames: int, seconds: float, sync=lambda: None) -> dict:
    """Run ``fn`` once to warm up, then repeatedly for at least ``seconds``; frames/s."""
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return {"frames_per_s": calls * n_frames / dt, "calls": calls, "seconds": dt, "frames_per_call": n_frames}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def cpu_stages(args) -> dict:
    fx = FeatureExtractor("smoke", device="cpu", batch_size=args.batch_size)
    T = args.frames
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (T, 512, 512, 3), dtype=np.uint8)
    audio = rng.normal(0, 0.1, T * 640).astype(np.float32)
    kps = fx.dwpose(frames)
    return {
        "vae": timed(lambda: vae_mod.encode_frames(fx.vae, frames, batch_size=fx.batch_size), T, args.seconds),
        "audio": timed(lambda: w2v.encode_audio(fx.wav2vec, audio, T), T, args.seconds),
        "kps": timed(lambda: fx.dwpose(frames), T, args.seconds),
        "motion": timed(lambda: motion_table(np.repeat(kps, 4, 0)), 4 * T, args.seconds),
        "extractor": timed(lambda: fx(frames, audio), T, args.seconds),
    }


def cuda_vae(args) -> dict:
    from diffusers import AutoencoderKL

    device = torch.device("cuda")
    dtype = resolve_dtype(args.dtype, device)
    vae = AutoencoderKL(**vae_mod.SD15_VAE_CONFIG).to(device).eval()
    B = args.batch_size
    n = B * max(1, args.frames // B)
    frames = np.random.default_rng(0).integers(0, 256, (n, 512, 512, 3), dtype=np.uint8)
    x = torch.rand(B, 3, 512, 512, device=device) * 2 - 1

    @torch.inference_mode()
    def bare():
        for _ in range(n // B):
            with vae_mod.autocast_context(device, dtype):
                post = vae.encode(x).latent_dist
            post.mean.to(torch.float16)

    def extractor():
        vae_mod.encode_frames(vae, frames, batch_size=B, device=device, dtype=dtype)

    sync = torch.cuda.synchronize
    r_bare = timed(bare, n, args.seconds, sync)
    r_ext = timed(extractor, n, args.seconds, sync)
    return {"model": "AutoencoderKL(SD 1.5 config, random weights)", "batch_size": B,
            "dtype": str(dtype).replace("torch.", ""), "bare": r_bare, "extractor": r_ext,
            "extractor_over_bare": r_ext["frames_per_s"] / r_bare["frames_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per stage (after one warm-up call)")
    p.add_argument("--frames", type=int, default=8, help="frames per call")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="CUDA VAE precision: float32 (the default; auto = float32), fp16, bf16")
    p.add_argument("--out", default="bench_features.json")
    args = p.parse_args(argv)

    result = {"machine": machine(), "args": vars(args), "cpu_smoke": cpu_stages(args)}
    if torch.cuda.is_available():
        result["cuda_vae_sd15"] = cuda_vae(args)

    print(f"{'stage':<28}{'frames/s':>12}{'calls':>8}")
    for stage, r in result["cpu_smoke"].items():
        print(f"{'cpu smoke ' + stage:<28}{r['frames_per_s']:>12.1f}{r['calls']:>8}")
    if "cuda_vae_sd15" in result:
        c = result["cuda_vae_sd15"]
        for k in ("bare", "extractor"):
            label = f"cuda sd15 vae {k} {c['dtype']}"
            print(f"{label:<28}{c[k]['frames_per_s']:>12.1f}{c[k]['calls']:>8}")
        print(f"extractor / bare: {c['extractor_over_bare']:.3f}")
    print(f"machine: {result['machine']}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
