"""How far reduced-precision VAE encoding moves the stored latents (definitions audit item 4).

    python benchmarks/vae_precision.py [--frames 3] [--size 512] [--weights MODELS/sd-vae] [--out FILE]

Encodes real 512x512 face crops (``wda_aoc_000.mp4`` of ../shared/data/real: already a 512x512
25 fps talking-head crop) with the SD 1.5 VAE in fp32 (the reference, what the features stage
stores since schema 2.0) and under bf16 autocast (the pre-2.0 path) and fp16 autocast, and reports
for the posterior mean: the relative L2 error ||x - ref|| / ||ref||, the largest absolute error
relative to the mean's RMS, and the same for storing the fp32 mean as fp16 (the floor any stored
latent.npy has). Also the posterior std's median next to the mean's RMS (what storing the std buys).

Without ``--weights`` the VAE has SD 1.5's exact architecture with diffusers' default random
initialisation (the trained weights are not reachable offline); give a diffusers directory or a
single weights file of the real VAE to measure that. Runs on CUDA when present, else on CPU
(CPU autocast: bf16 and fp16 matmul/conv kernels of the CPU, not the GPU's).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine  # noqa: E402
from pipeline.features import vae as vae_mod  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real" / "wda_aoc_000.mp4"


def real_frames(path: Path, n: int, size: int) -> np.ndarray:
    """``n`` frames spread over the clip, uint8 [n, size, size, 3] RGB (resized if needed)."""
    import av
    import cv2

    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    picks = np.linspace(0, len(frames) - 1, n).round().astype(int)
    out = [frames[i] if frames[i].shape[:2] == (size, size) else
           cv2.resize(frames[i], (size, size), interpolation=cv2.INTER_AREA) for i in picks]
    return np.stack(out)


def errors(x: torch.Tensor, ref: torch.Tensor) -> dict:
    rms = ref.pow(2).mean().sqrt()
    return {"rel_l2": float((x - ref).norm() / ref.norm()), "max_abs_over_rms": float((x - ref).abs().max() / rms)}


@torch.inference_mode()
def measure(vae, frames: np.ndarray, device: torch.device) -> dict:
    x = vae_mod.frames_to_input(torch.from_numpy(frames).to(device))
    t0 = time.perf_counter()
    post = vae.encode(x).latent_dist
    ref, std = post.mean.float(), post.std.float()
    result = {"fp32_seconds": time.perf_counter() - t0,
              "fp16_storage_of_fp32": errors(ref.half().float(), ref),
              "posterior_std_median_over_mean_rms": float(std.median() / ref.pow(2).mean().sqrt())}
    for name, dtype in (("bf16_autocast", torch.bfloat16), ("fp16_autocast", torch.float16)):
        try:
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype):
                got = vae.encode(x).latent_dist.mean.float()
            result[name] = dict(errors(got, ref), seconds=time.perf_counter() - t0,
                                finite=bool(torch.isfinite(got).all()))
        except RuntimeError as e:  # an autocast dtype this device does not support
            result[name] = {"error": str(e).splitlines()[0]}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--video", default=str(REAL))
    p.add_argument("--weights", default=None, help="a diffusers sd-vae directory or a single weights file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="vae_precision.json")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.weights:
        w = Path(args.weights)
        vae = vae_mod.load_vae_dir(w) if w.is_dir() else vae_mod.load_vae_file(w)
        model = f"SD 1.5 VAE weights {w}"
    else:
        from diffusers import AutoencoderKL

        torch.manual_seed(args.seed)
        vae = AutoencoderKL(**vae_mod.SD15_VAE_CONFIG).eval()
        model = f"AutoencoderKL(SD 1.5 config), diffusers default init, seed {args.seed}"
    vae.to(device)
    frames = real_frames(Path(args.video), args.frames, args.size)
    result = {"machine": machine(device), "model": model, "device": str(device), "video": Path(args.video).name,
              "frames": args.frames, "size": args.size, "mean": measure(vae, frames, device)}
    m = result["mean"]
    print(f"{model} on {device}, {args.frames} frames {args.size}x{args.size} of {result['video']}")
    for k in ("fp16_storage_of_fp32", "bf16_autocast", "fp16_autocast"):
        r = m[k]
        print(f"  {k:<22}" + (f"rel L2 {r['rel_l2']:.2e}   max|err|/rms {r['max_abs_over_rms']:.2e}"
                              if "rel_l2" in r else r["error"]))
    print(f"  posterior std median / mean rms: {m['posterior_std_median_over_mean_rms']:.2e}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
