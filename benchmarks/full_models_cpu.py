"""CPU cost of each `full`-profile model at its real size, at the rate the pipeline calls it.

    python benchmarks/full_models_cpu.py [--threads 1 2] [--repeats 3] [--only syncnet arcface ...]
        [--out benchmarks/results/full_models-cpu.json]

For sizing CPU nodes (docs/scaling.md): the smoke profile's figures (docs/benchmarks.md) use a
1/16-width SyncNet and stand-in networks; these are the real architectures, randomly initialised
(no model hub here; speed does not depend on the weights). One process; each model is timed with
1 thread and with N threads (torch ``set_num_threads`` / onnxruntime ``intra_op_num_threads``, and
the process pinned to that many CPUs with ``sched_setaffinity`` so that libraries with their own
thread pools, MediaPipe's, are bounded too). Each figure: one warm-up call, then ``--repeats``
timed calls; the median wall and CPU seconds (``time.process_time``: every thread of the process)
and the 1-minute load average before each call are recorded. On a shared machine the CPU seconds
are the figure to plan with; wall seconds stretch with the load.

What each call is, and how often the pipeline makes it (pipeline/stages.py, clip_scores.py):
* ``syncnet``: ``scoring.syncnet.embed`` (MFCC + lip and audio streams, batches of
  ``score.syncnet_batch_size`` = 20) on 45 crops of 224x224 -> 40 windows of 5 frames (0.2 s).
  The scorer embeds one window per output frame: 25 windows per clip-second (crop+score stage).
  Full width, official state-dict layout (``SyncNet()``, syncnet_v2's shapes).
* ``arcface``: IR-ResNet-50 (insightface arcface_torch ``iresnet50``: IBasicBlock layers
  [3, 4, 14, 3], 112x112 in, 512-d out; written below), exported to ONNX with w600k_r50's
  signature (input ``input.1`` [None, 3, 112, 112], one output ``683`` [N, 512]), registered as
  one's own weights are, and run through ``pipeline.faces.arcface.ArcFace``: ``align`` of
  ``score.identity_frames`` = 5 frames + one ``embed`` of the 5 crops, once per scored clip.
* ``mediapipe``: the crop+score stage's ``MediaPipeFaceDetector(ranges="short", landmarks=True)``
  (BlazeFace short-range + FaceMesh 478 with iris refinement, the wheel's own models) on every
  512x512 output frame: 25 calls per clip-second, both profiles. ``mediapipe_detect_only`` is the
  same without FaceMesh, to split the two. Frames: a real talking head (../shared/data/real).
* ``vae``: SD 1.5 VAE encoder (diffusers ``AutoencoderKL`` with ``SD15_VAE_CONFIG``) through
  ``features.vae.encode_frames`` on 512x512 frames: 25 frames per kept clip-second (feature stage,
  CPU-only users; the pipeline batches 16 frames, ``--vae-batch`` here).
* ``wav2vec2``: wav2vec2-base (transformers ``Wav2Vec2Config()`` defaults: 12 x 768) through
  ``features.wav2vec.encode_audio`` on one clip's audio (``--audio-seconds``), all 13 hidden
  states: once per kept clip, cost ~ proportional to its length.
Not built: SCRFD det_10g (its architecture is not reproducible quickly), insightface 1k3d68 (our code
builds only stand-ins with its signature), DWPose dw-ll_ucoco_384 (RTMPose-l, no real-size SimCC here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import loadavg, machine  # noqa: E402

REAL_CLIP = ROOT.parent / "shared" / "data" / "real" / "wda_aoc_000.mp4"
FPS = 25
SYNC_FRAMES = 45  # -> 40 windows (embed leaves the last one out), two batches of 20
MEDIAPIPE_FRAMES = 10  # frames per timed mediapipe call


# ---------------------------------------------------------------------------------------- timing

def pinned(n_threads: int, cpus: list[int]):
    """Context: the process on the first ``n_threads`` CPUs, torch with that many threads."""
    class _Pin:
        def __enter__(self):
            self.before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, set(cpus[:n_threads]))
            torch.set_num_threads(n_threads)

        def __exit__(self, *exc):
            os.sched_setaffinity(0, self.before)

    return _Pin()


def measure(fn, repeats: int) -> dict:
    """One warm-up call, then ``repeats`` timed calls: medians of wall and process CPU seconds."""
    fn()
    runs = []
    for _ in range(repeats):
        load = loadavg()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                     "loadavg_1min": load[0] if load else None})
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs), "runs": runs}


def gflops(model_call) -> float:
    """Multiply-add FLOPs (2 per MAC) of one call, from torch's FlopCounterMode (convs, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model_call()
    return counter.get_total_flops() / 1e9


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- IR-ResNet-50

class IRBlock(nn.Module):
    """insightface's IBasicBlock: BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride here) -> BN, plus
    the shortcut (a strided 1x1 conv + BN where the shape changes). No activation after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
            nn.PReLU(c_out), nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet50(nn.Module):
    """arcface_torch ``iresnet50``: 3x3 stem (64, stride 1) + BN + PReLU, four stages of IRBlocks
    [3, 4, 14, 3] with widths 64-128-256-512, each starting with stride 2 (112 -> 7), then BN,
    flatten (512 x 7 x 7), dropout (identity at inference), a linear layer to 512 and BatchNorm1d."""

    def __init__(self, layers=(3, 4, 14, 3), widths=(64, 128, 256, 512), embedding: int = 512):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks, c_in = [], 64
        for n, c_out in zip(layers, widths):
            blocks += [IRBlock(c_in, c_out, 2)] + [IRBlock(c_out, c_out, 1) for _ in range(n - 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in * 7 * 7, embedding)
        self.features = nn.BatchNorm1d(embedding)

    def forward(self, x):
        x = self.head_bn(self.blocks(self.stem(x)))
        return self.features(self.fc(torch.flatten(x, 1)))


def export_arcface_onnx(model: nn.Module, directory: Path) -> Path:
    """ONNX with w600k_r50.onnx's signature (what ArcFace._check_signature expects), registered in
    ``directory/models.lock.json`` like one's own weights (w600k_r50.onnx itself is pinned)."""
    import onnx

    from pipeline.models.registry import register_local_files

    import io

    path = directory / "iresnet50_random.onnx"
    exported = io.BytesIO()  # built in memory: no weights file is opened before it is registered
    torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), exported, input_names=["input.1"],
                      output_names=["fc1"], dynamic_axes={"input.1": {0: "None"}}, dynamo=False)
    graph = onnx.load_from_string(exported.getvalue())
    for node in graph.graph.node:  # insightface's export names the output "683" (torch refuses numeric names)
        node.output[:] = ["683" if o == "fc1" else o for o in node.output]
    graph.graph.output[0].name = "683"
    onnx.save(graph, str(path))
    register_local_files(directory, path.name, log=lambda *_: None)
    return path


# ---------------------------------------------------------------------------------------- inputs

def real_frames(n: int) -> np.ndarray:
    """``n`` consecutive 512x512 RGB frames of a real talking head; the synthetic demo head when the
    real clips are absent (then say so in the results)."""
    if REAL_CLIP.is_file():
        import av

        with av.open(str(REAL_CLIP)) as c:
            frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(n), c.decode(video=0))]
        return np.stack(frames)
    from pipeline.demo import make_talking_head

    with tempfile.TemporaryDirectory() as d:
        path = make_talking_head(Path(d) / "head.mp4", duration_s=max(1.0, n / FPS), size=512)
        import av

        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(n), c.decode(video=0))])


# ---------------------------------------------------------------------------------------- models

def bench_syncnet(threads, cpus, repeats, rng) -> dict:
    from pipeline.scoring import syncnet as sync

    model = sync.SyncNet().eval()  # full width, 224 input, 1024-d: syncnet_v2's state-dict shapes
    crops = rng.integers(0, 256, (SYNC_FRAMES, 224, 224, 3), dtype=np.uint8)
    audio = rng.normal(0, 0.1, SYNC_FRAMES * 640).astype(np.float32)
    windows = SYNC_FRAMES - sync.VIDEO_WINDOW
    lip = torch.zeros(1, 3, sync.VIDEO_WINDOW, 224, 224)
    aud = torch.zeros(1, 1, 13, sync.MFCC_WINDOW)
    out = {"what": f"embed() on {SYNC_FRAMES} 224x224 crops = {windows} windows, batch 20 (MFCC included)",
           "windows_per_call": windows, "calls_per_clip_second": FPS / windows, "params": n_params(model),
           "gflop_per_window": gflops(lambda: (model.forward_lip(lip), model.forward_aud(aud))), "threads": {}}
    for n in threads:
        with pinned(n, cpus):
            out["threads"][n] = measure(lambda: sync.embed(model, crops, audio, batch_size=20), repeats)
    return out


def bench_arcface(threads, cpus, repeats, rng, frames) -> dict:
    from pipeline.faces.arcface import ARCFACE_DST, ArcFace

    torch.manual_seed(0)
    model = IResNet50().eval()
    flops = gflops(lambda: model(torch.zeros(1, 3, 112, 112)))
    # the 5 keypoints of a face ~200 px wide in the 512 crop: the template scaled and moved, a little jitter
    kps = [(ARCFACE_DST * 2.0 + 144 + rng.normal(0, 1.5, (5, 2))).astype(np.float32) for _ in range(5)]
    picks = frames[np.linspace(0, len(frames) - 1, 5).round().astype(int)]
    out = {"what": "ArcFace.align on 5 frames + ArcFace.embed of the 5 crops (onnxruntime CPU)",
           "calls_per_clip": 1, "params": n_params(model), "gflop_per_face": flops, "threads": {}}
    with tempfile.TemporaryDirectory() as d:
        path = export_arcface_onnx(model, Path(d))
        out["onnx_mb"] = round(path.stat().st_size / 2**20, 1)
        for n in threads:
            face = ArcFace(path, providers=["CPUExecutionProvider"], intra_op_num_threads=n)
            emb = face.embed([face.align(f, k) for f, k in zip(picks, kps)])
            assert emb.shape == (5, 512) and np.isfinite(emb).all(), emb.shape
            out["signature"] = {"input": face.input_name, "input_size": face.input_size, "output": face.output_names}
            with pinned(n, cpus):
                out["threads"][n] = measure(lambda: face.embed([face.align(f, k) for f, k in zip(picks, kps)]),
                                            repeats)
    return out


def bench_mediapipe(threads, cpus, repeats, frames, landmarks: bool) -> dict:
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector

    sample = frames[:MEDIAPIPE_FRAMES]
    out = {"what": f"MediaPipeFaceDetector(ranges='short', landmarks={landmarks}).detect on {len(sample)} "
                   f"512x512 frames", "frames_per_call": len(sample), "calls_per_clip_second": FPS / len(sample),
           "threads": {}}
    for n in threads:
        with pinned(n, cpus):
            # built inside the pin: MediaPipe sizes its thread pool when the graph starts
            det = MediaPipeFaceDetector(min_confidence=0.5, landmarks=landmarks, ranges="short")
            found = [det.detect(f) for f in sample]
            out["faces_found"] = sum(bool(f) for f in found)
            out["landmarks_found"] = sum(bool(f) and f[0].landmarks is not None for f in found)
            if not out["faces_found"] or (landmarks and not out["landmarks_found"]):  # else FaceMesh never ran
                raise RuntimeError(f"no face or landmarks found in the benchmark frames: {out}")
            out["threads"][n] = measure(lambda: [det.detect(f) for f in sample], repeats)
    return out


def bench_vae(threads, cpus, repeats, frames, batch: int) -> dict:
    from diffusers import AutoencoderKL

    from pipeline.features import vae as vae_mod

    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_mod.SD15_VAE_CONFIG).eval()
    x = np.ascontiguousarray(frames[:batch])
    out = {"what": f"features.vae.encode_frames on {batch} 512x512 frames (fp32)", "frames_per_call": batch,
           "calls_per_clip_second": FPS / batch, "params_encoder": n_params(vae.encoder) + n_params(vae.quant_conv),
           "gflop_per_frame": gflops(lambda: vae.encode(torch.zeros(1, 3, 512, 512))), "threads": {}}
    for n in threads:
        with pinned(n, cpus):
            out["threads"][n] = measure(lambda: vae_mod.encode_frames(vae, x, batch_size=batch), repeats)
    return out


def bench_wav2vec2(threads, cpus, repeats, rng, seconds: float) -> dict:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from pipeline.features import wav2vec as w2v

    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config()).eval()  # wav2vec2-base: 12 layers x 768
    n_frames = int(round(seconds * FPS))
    audio = rng.normal(0, 0.1, n_frames * w2v.SAMPLES_PER_FRAME).astype(np.float32)
    x = torch.from_numpy(w2v.frame_aligned_input(audio, n_frames))[None]
    out = {"what": f"features.wav2vec.encode_audio on one {seconds:g} s clip (all 13 hidden states, fp32)",
           "clip_seconds": seconds, "calls_per_clip_second": 1 / seconds, "params": n_params(model),
           "gflop_per_call": gflops(lambda: model(x, output_hidden_states=True)), "threads": {}}
    for n in threads:
        with pinned(n, cpus):
            out["threads"][n] = measure(lambda: w2v.encode_audio(model, audio, n_frames), repeats)
    return out


# ---------------------------------------------------------------------------------------- report

def per_clip_second(entry: dict) -> None:
    """Add CPU and wall seconds per clip-second (per clip for ArcFace) next to each thread count."""
    rate = entry.get("calls_per_clip_second")
    for t in entry["threads"].values():
        if rate is not None:
            t["cpu_s_per_clip_second"] = t["cpu_s"] * rate
            t["wall_s_per_clip_second"] = t["wall_s"] * rate
        else:
            t["cpu_s_per_clip"] = t["cpu_s"] * entry["calls_per_clip"]
            t["wall_s_per_clip"] = t["wall_s"] * entry["calls_per_clip"]


MODELS = ("syncnet", "arcface", "mediapipe", "mediapipe_detect_only", "vae", "wav2vec2")


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, len(cpus)}))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--vae-batch", type=int, default=1, help="frames per VAE call (the pipeline uses 16)")
    ap.add_argument("--audio-seconds", type=float, default=5.0, help="clip length for wav2vec2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "full_models-cpu.json"))
    args = ap.parse_args()
    if max(args.threads) > len(cpus):
        ap.error(f"--threads {max(args.threads)} > {len(cpus)} usable CPUs")

    rng = np.random.default_rng(0)
    frames = real_frames(max(MEDIAPIPE_FRAMES, args.vae_batch, 5))
    results = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "repeats": args.repeats,
               "frames_source": str(REAL_CLIP.name) if REAL_CLIP.is_file() else "pipeline.demo.make_talking_head",
               "not_built": {
                   "scrfd_det_10g": "architecture not reproducible quickly; runs at detect_fps (5/s of source) in "
                                    "detect and on every output frame (25/s) in crop+score as the box detector",
                   "insightface_1k3d68": "our code builds only stand-ins with its signature; runs on every output "
                                         "frame (25/s) in crop+score",
                   "dwpose_dw-ll_ucoco_384": "RTMPose-l; no real-size SimCC here; 25 frames/s of kept clips"},
               "models": {}}
    t_start = time.perf_counter()
    for name in args.only:
        print(f"[full_models_cpu] {name} ...", flush=True)
        t0 = time.perf_counter()
        if name == "syncnet":
            entry = bench_syncnet(args.threads, cpus, args.repeats, rng)
        elif name == "arcface":
            entry = bench_arcface(args.threads, cpus, args.repeats, rng, frames)
        elif name.startswith("mediapipe"):
            entry = bench_mediapipe(args.threads, cpus, args.repeats, frames, landmarks=name == "mediapipe")
        elif name == "vae":
            entry = bench_vae(args.threads, cpus, args.repeats, frames, args.vae_batch)
        else:
            entry = bench_wav2vec2(args.threads, cpus, args.repeats, rng, args.audio_seconds)
        per_clip_second(entry)
        entry["bench_wall_s"] = time.perf_counter() - t0
        results["models"][name] = entry
        for n, t in entry["threads"].items():
            per = {k: round(v, 4) for k, v in t.items() if k.endswith(("per_clip_second", "per_clip"))}
            print(f"  {n} thread(s): wall {t['wall_s']:.3f} s, cpu {t['cpu_s']:.3f} s per call; {per}", flush=True)
    results["total_wall_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    os.replace(tmp, out)  # atomic: a killed run leaves the old results
    print(f"[full_models_cpu] wrote {out}")


if __name__ == "__main__":
    main()
