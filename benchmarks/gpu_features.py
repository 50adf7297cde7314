"""The feature stage's work on a GPU against the bare VAE encoder, in one run, on models of the real sizes.

    python benchmarks/gpu_features.py [--clips 8] [--frames 100] [--batch-size 16] [--workers 1 2 4]
                                      [--tiny] [--out benchmarks/results/gpu_features.json]

Models are randomly initialised at the real sizes (no hub here): diffusers' AutoencoderKL with SD
1.5's VAE config and transformers' Wav2Vec2Model with wav2vec2-base's config; DWPose is the smoke
SimCC ONNX model through onnxruntime (CPU provider unless onnxruntime-gpu is installed), so its
share is a stand-in and is reported on its own line. Speed does not depend on the weights' values.

Measured, each over the same synthetic 512x512 clips (x264, as the crop stage writes them):
- the bare VAE encoder: uint8 frames already on the GPU, ``vae.encode(x).latent_dist.mean`` at the
  batch size, per precision (strict fp32, TF32 convolutions = PyTorch's default, bf16 and fp16
  autocast), plus channels_last;
- the feature stage's per-clip work as ``FeatureStage`` does it (mp4 decode, VAE, wav2vec2, DWPose,
  motion, .npy members), by one worker and by N workers sharing the GPU (threads standing in for N
  Ray actors with ``features.num_gpus = 1/N``), with the GPU's utilisation sampled by nvidia-smi;
- each component's seconds, and how far each precision moves the latents from strict fp32.
``ratio`` = stage frames/s (best worker count) / bare VAE frames/s at the stage's precision.
Ray's own overhead (Arrow blocks, object store) is measured on CPU by benchmarks/feature_stage.py.
``--tiny``: smoke-size models and small clips, to check the script on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.features import vae as vae_mod  # noqa: E402
from pipeline.features import wav2vec as w2v_mod  # noqa: E402
from pipeline.features.extractor import FeatureExtractor  # noqa: E402
from pipeline.media import encode_clip, read_clip  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synthetic_clip(i: int, n_frames: int, size: int) -> tuple[bytes, np.ndarray]:
    """A moving, textured picture (compresses and decodes like video, unlike noise) + speech-band noise."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for t in range(n_frames):
        phase = 2 * np.pi * t / 50
        base = 0.5 + 0.25 * np.sin(6 * xx + phase + i) + 0.25 * np.cos(5 * yy - phase)
        face = ((xx - 0.5 - 0.05 * np.sin(phase)) ** 2 + (yy - 0.45) ** 2) < 0.08
        img = np.stack([base * 200, base * 150 + 40 * face, base * 120 + 80 * face], -1)
        frames[t] = np.clip(img, 0, 215).astype(np.uint8) + texture
    audio = (rng.standard_normal(n_frames * 640) * 0.1).astype(np.float32)
    return encode_clip(frames, audio), audio


def build_extractor(tiny: bool, device: str, batch_size: int, dtype: torch.dtype,
                    threads: int | None = None) -> FeatureExtractor:
    """The smoke extractor with the real-size VAE and wav2vec2 swapped in (random weights)."""
    fx = FeatureExtractor("smoke", device=device, batch_size=batch_size, dtype=dtype, ort_threads=threads)
    if not tiny:
        from diffusers import AutoencoderKL
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        torch.manual_seed(0)
        fx.vae = AutoencoderKL(**vae_mod.SD15_VAE_CONFIG).eval().to(fx.device)
        fx.wav2vec = Wav2Vec2Model(Wav2Vec2Config()).eval().to(fx.device)  # wav2vec2-base: 12 layers x 768
    return fx


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(enabled: bool) -> None:
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


@torch.inference_mode()
def bare_vae(vae, frames: np.ndarray, device: torch.device, batch: int, dtype: torch.dtype, repeats: int) -> float:
    """frames/s of the encoder alone: uint8 batches already on the device, the posterior mean out."""
    x = torch.from_numpy(frames[:batch]).to(device)
    for _ in range(2):  # warm-up (cuDNN algorithm choice)
        with vae_mod.autocast_context(device, dtype):
            vae.encode(vae_mod.frames_to_input(x)).latent_dist.mean
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        with vae_mod.autocast_context(device, dtype):
            vae.encode(vae_mod.frames_to_input(x)).latent_dist.mean
    sync(device)
    return repeats * batch / (time.perf_counter() - t)


def stage_pass(extractors: list[FeatureExtractor], clips: list[tuple[bytes, np.ndarray]], rounds: int) -> dict:
    """Each worker runs FeatureStage's per-clip work on its share of the clips, `rounds` times."""
    frames_done = [0] * len(extractors)
    work = [clips[w::len(extractors)] or clips[:1] for w in range(len(extractors))]

    def worker(w: int) -> None:
        for _ in range(rounds):
            for mp4, audio in work[w]:
                frames, _, _ = read_clip(mp4)
                FeatureExtractor.members(extractors[w](frames, audio))
                frames_done[w] += len(frames)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(len(extractors))]
    sampler = GpuSampler(extractors[0].device)
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sync(extractors[0].device)
    elapsed = time.perf_counter() - t
    util = sampler.stop()
    return {"workers": len(extractors), "frames": sum(frames_done), "seconds": elapsed,
            "frames_per_s": sum(frames_done) / elapsed, "gpu_util_mean_pct": util}


def _proc_worker(w, n, args, clips, barrier, results) -> None:
    """One stand-in for a Ray feature actor: its own process, models and CPU threads."""
    import cv2

    threads = max(1, (os.cpu_count() or 1) // n)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    set_tf32(args.precision != "fp32")
    fx = build_extractor(args.tiny, "cuda" if torch.cuda.is_available() else "cpu", args.batch_size,
                         PRECISIONS[args.precision], threads)
    mine = clips[w::n] or clips[:1]
    frames, _, _ = read_clip(mine[0][0])
    FeatureExtractor.members(fx(frames, mine[0][1]))  # warm-up
    barrier.wait()
    t0, done = time.perf_counter(), 0
    for _ in range(args.rounds):
        for mp4, audio in mine:
            frames, _, _ = read_clip(mp4)
            FeatureExtractor.members(fx(frames, audio))
            done += len(frames)
    sync(fx.device)
    results.put((w, done, t0, time.perf_counter()))


def process_pass(n: int, args, clips) -> dict:
    """n worker processes sharing the GPU, as n Ray actors with features.num_gpus = 1/n do."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=_proc_worker, args=(w, n, args, clips, barrier, results)) for w in range(n)]
    for p in procs:
        p.start()
    barrier.wait()
    sampler = GpuSampler(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    got = [results.get(timeout=900) for _ in procs]
    util = sampler.stop()
    for p in procs:
        p.join()
    frames = sum(g[1] for g in got)
    elapsed = max(g[3] for g in got) - min(g[2] for g in got)
    return {"processes": n, "frames": frames, "seconds": elapsed, "frames_per_s": frames / elapsed,
            "gpu_util_mean_pct": util}


def read_clip_threaded(data: bytes) -> np.ndarray:
    """read_clip's video decode with FFmpeg's frame+slice threading (thread_type AUTO)."""
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(v)])


@torch.inference_mode()
def components(fx: FeatureExtractor, clips, rounds: int) -> dict:
    """Seconds per frame of each piece of the per-clip work, one worker, run in sequence."""
    from pipeline.features import motion as motion_mod

    total = {"decode": 0.0, "decode_threaded": 0.0, "vae": 0.0, "wav2vec2": 0.0, "dwpose_stand_in": 0.0, "motion": 0.0, "npy_members": 0.0}
    n = 0
    for _ in range(rounds):
        for mp4, audio in clips:
            t0 = time.perf_counter()
            frames, _, _ = read_clip(mp4)
            t1 = time.perf_counter()
            read_clip_threaded(mp4)
            total["decode_threaded"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            latent = vae_mod.encode_frames(fx.vae, frames, batch_size=fx.batch_size, device=fx.device, dtype=fx.dtype)
            t2 = time.perf_counter()
            feats = w2v_mod.encode_audio(fx.wav2vec, audio, len(frames), device=fx.device, normalize=fx.audio_normalize)
            t3 = time.perf_counter()
            kps = fx.dwpose(frames)
            t4 = time.perf_counter()
            motion, _ = motion_mod.motion_table(kps, fx.motion_window)
            t5 = time.perf_counter()
            FeatureExtractor.members({"latent": latent, "audio": feats, "kps": kps, "motion": motion})
            t6 = time.perf_counter()
            for k, dt in zip([k for k in total if k != "decode_threaded"], (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                total[k] += dt
            n += len(frames)
    return {k: v / n * 1000 for k, v in total.items()} | {"frames": n}


@torch.inference_mode()
def latent_error(vae, frames: np.ndarray, device: torch.device, batch: int) -> dict:
    """Max |latent - strict fp32 latent| / std(strict fp32 latent), per precision."""
    out = {}
    for name, dtype in PRECISIONS.items():
        set_tf32(name == "tf32")
        out[name] = vae_mod.encode_frames(vae, frames[:batch], batch_size=batch, device=device, dtype=dtype)
    set_tf32(True)
    ref = out["fp32"].astype(np.float64)
    return {k: float(np.abs(v.astype(np.float64) - ref).max() / ref.std()) for k, v in out.items() if k != "fp32"}


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 100 ms while a pass runs (None without a GPU)."""

    def __init__(self, device: torch.device):
        self.proc = None
        if device.type == "cuda":
            try:
                self.proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self.proc = None

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        values = [float(s) for s in self.proc.communicate()[0].split() if s.strip().replace(".", "").isdigit()]
        return sum(values) / len(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--frames", type=int, default=100, help="frames per clip (4 s at 25 fps)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--procs", type=int, nargs="*", default=[],
                    help="also run N worker processes sharing the GPU (Ray actors with num_gpus=1/N)")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the clips per measurement")
    ap.add_argument("--precision", choices=["tf32", "fp32", "bf16", "fp16"], default="tf32",
                    help="the stage's VAE precision (features.dtype float32 runs as TF32 convolutions on CUDA "
                         "unless TF32 is turned off)")
    ap.add_argument("--tiny", action="store_true", help="smoke-size models and 128 px clips (a CPU check)")
    ap.add_argument("--out", default="benchmarks/results/gpu_features.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 128 if args.tiny else 512
    t = time.perf_counter()
    clips = [synthetic_clip(i, args.frames, size) for i in range(args.clips)]
    print(f"clips made in {time.perf_counter() - t:.1f} s", flush=True)
    if args.tiny:  # the extractor wants 512x512 frames: upscale the small clips' decoded frames once
        import cv2

        def up(mp4):
            frames, audio, _ = read_clip(mp4)
            return np.stack([cv2.resize(f, (512, 512)) for f in frames]), audio
        big = [up(mp4) for mp4, _ in clips]
        clips = [(encode_clip(f, a), a) for f, a in big]

    fx = build_extractor(args.tiny, str(device), args.batch_size, PRECISIONS[args.precision])
    set_tf32(args.precision != "fp32")
    frames0, _, _ = read_clip(clips[0][0])
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "models": "tiny smoke" if args.tiny else "SD1.5 VAE + wav2vec2-base (random init); DWPose smoke ONNX",
              "batch_size": args.batch_size, "clip_frames": args.frames, "clips": args.clips,
              "stage_precision": args.precision, "bare_vae_frames_per_s": {}}
    repeats = 4 if args.tiny else 20
    for name, dtype in PRECISIONS.items():
        if device.type != "cuda" and name != "fp32":
            continue
        set_tf32(name != "fp32")
        result["bare_vae_frames_per_s"][name] = bare_vae(fx.vae, frames0, device, args.batch_size, dtype, repeats)
        print(f"bare VAE {name}: {result['bare_vae_frames_per_s'][name]:.1f} frames/s", flush=True)
    set_tf32(args.precision != "fp32")
    fx.vae.to(memory_format=torch.channels_last)
    result["bare_vae_channels_last_frames_per_s"] = bare_vae(fx.vae, frames0, device, args.batch_size,
                                                             PRECISIONS[args.precision], repeats)
    fx.vae.to(memory_format=torch.contiguous_format)
    if device.type == "cuda":
        result["latent_max_err_over_std_vs_strict_fp32"] = latent_error(fx.vae, frames0, device, args.batch_size)
        set_tf32(args.precision != "fp32")

    result["ms_per_frame_one_worker"] = components(fx, clips[:2], 1)
    print("components (ms/frame):", json.dumps(result["ms_per_frame_one_worker"]), flush=True)
    result["stage"] = []
    for n in args.workers:
        extractors = [fx] + [build_extractor(args.tiny, str(device), args.batch_size, PRECISIONS[args.precision])
                             for _ in range(n - 1)]
        stage_pass(extractors, clips[:n], 1)  # warm-up of each worker's models
        r = stage_pass(extractors, clips, args.rounds)
        result["stage"].append(r)
        print(f"stage, {n} worker(s): {r['frames_per_s']:.1f} frames/s, GPU util {r['gpu_util_mean_pct']}", flush=True)
        del extractors
    result["stage_processes"] = []
    for n in args.procs:
        r = process_pass(n, args, clips)
        result["stage_processes"].append(r)
        print(f"stage, {n} process(es): {r['frames_per_s']:.1f} frames/s, GPU util {r['gpu_util_mean_pct']}", flush=True)
    best = max(result["stage"] + result["stage_processes"], key=lambda r: r["frames_per_s"])
    bare_key = args.precision if args.precision in result["bare_vae_frames_per_s"] else "fp32"
    result["ratio"] = best["frames_per_s"] / result["bare_vae_frames_per_s"][bare_key]
    result["best"] = {k: v for k, v in best.items() if k in ("workers", "processes")}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
