"""Training step throughput of the real trainer (loopy_model.train.Trainer), read from metrics.csv.

    python benchmarks/train_step.py                                  # CPU, tiny preset, workers 0 vs 2
    python benchmarks/train_step.py --data demo_output --allow-smoke # a real curated dataset instead
    python benchmarks/train_step.py --device cuda --preset paper --out benchmarks/results/train_step-gpu.json

Each run builds a fresh Trainer (random init) and trains ``--steps`` steps; each configuration
runs ``--repeats`` times, round-robin with the others (so a change in the machine's load hits
every configuration alike). The per-step rows of RUN_DIR/metrics.csv, the first ``--warmup``
steps of each run excluded (worker start-up, allocator and kernel warm-up), give, pooled:
  steps/s = timed steps / the sum of their step_time_s (data wait included), and the median
  step time (robust to other processes taking the cores for a while);
  data-wait fraction = mean of data_wait_frac (the share of a step spent waiting for the loader).
Checkpoints are not written (``save`` is a no-op here: it runs only after the last step, and
a stage-2 paper-preset checkpoint holds 2.4 B fp32 parameters plus two AdamW moments, ~28 GB).
The gpu suite's synthetic data (~14 MB per 160-frame clip at 64x64) goes under $TMPDIR.

Suites (``--suite``, default: ``cpu`` with ``--device cpu``, ``gpu`` with ``--device cuda``):
- cpu: stages 1 and 2, loader workers 0 (the baseline: windows built in the training process)
  and 2 (worker processes), same synthetic dataset (tests/loader_fixtures.make_dataset) in the
  same run; ratios = workers-N over workers-0, per stage, of steps/s and of 1 / median step
  time. fp32 by default (``--precision``), as the CPU tests run.
- gpu: synthetic shards with the preset's shapes (latent.npy [T,4,S,S] fp16 with S the preset's
  latent size, 64 for ``paper`` = 512x512; audio.npy [T,13,768] fp16), random init, bf16 autocast:
  stage 2 at batch ``--stage2-batch`` (1) with gradient checkpointing -- step time and peak
  memory (torch.cuda.max_memory_allocated); stage 1 at batch ``--stage1-batch`` (16) without
  checkpointing -- samples/s and peak memory. Goals (issue 9): stage-2 step <= 2.0 s on an
  H100-class GPU, peak <= 70 GB, stage 1 >= 8 samples/s. The code path runs on CPU with the tiny
  preset: ``--suite gpu --device cpu --preset tiny --frames 40 --steps 3 --warmup 1``.

The results JSON (``--out``) records the machine (CPU model, cores, load average before and
after, torch version, GPU name); the last line printed is the same JSON on one line.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import loadavg, machine  # noqa: E402  (benchmarks/machine.py)
from loopy_model.presets import preset  # noqa: E402
from loopy_model.train import TrainConfig  # noqa: E402
from loopy_model.train.loop import Trainer  # noqa: E402
from loopy_model.train.setup import World  # noqa: E402
from pipeline.shards import ShardWriter, build_index, npy_bytes, write_index  # noqa: E402

GB, GIB = 1e9, 2**30
GOALS = {"data_wait_frac_max": 0.05, "stage2_step_s_max": 2.0, "peak_gb_max": 70.0, "stage1_samples_per_s_min": 8.0}
MEMBERS = ["latent.npy", "audio.npy", "kps.npy", "motion.npy", "meta.json", "video.mp4"]


class BenchTrainer(Trainer):
    """The real trainer, without writing checkpoints (only ever called after the timed steps)."""

    def save(self) -> None:
        pass


# ---------------------------------------------------------------------------- machine


# ---------------------------------------------------------------------------- data
def build_shaped(root: Path, clips: int, frames: int, hw: int, layers: int, dim: int) -> Path:
    """Synthetic shards with the contract's shapes (schema 2.0): latent [T,4,hw,hw] fp16 (posterior mean),
    audio [T,layers,dim] fp16, kps [T,68,3] f32 (pixels of the 512 crop), motion [T-11,4] f32.

    The values do not change the step's cost, so one random clip's members are written under
    every key (building 100s of MB of normals per clip would dominate the benchmark's set-up).
    """
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((frames, 4, hw, hw), dtype=np.float32)
    members = {
        "latent.npy": npy_bytes(latent.astype(np.float16)),
        "audio.npy": npy_bytes(rng.standard_normal((frames, layers, dim), dtype=np.float32).astype(np.float16)),
        "kps.npy": npy_bytes(rng.random((frames, 68, 3), dtype=np.float32) * 512),
        "motion.npy": npy_bytes(rng.random((max(frames - 11, 0), 4), dtype=np.float32) * 10),
        "video.mp4": bytes(256),
    }
    writer = ShardWriter(root, max_bytes=1 << 30)
    for c in range(clips):
        key = f"bench{c:05d}_0000"
        writer.write(key, {**members, "meta.json": json.dumps({"key": key, "profile": "full"}).encode()})
    writer.close()
    write_index(root, build_index(writer.closed_shards, profile="full", name="train-step-bench", members=MEMBERS,
                                  pipeline_version="bench"))
    return root


def build_fixture(root: Path, clips: int) -> Path:
    """tests/loader_fixtures.make_dataset: tiny members (latent [T,4,4,4]), 20-160 frames per clip."""
    from loader_fixtures import make_dataset

    per_shard = 16
    sizes = [per_shard] * (clips // per_shard) + ([clips % per_shard] if clips % per_shard else [])
    return make_dataset(root, sizes)


# ---------------------------------------------------------------------------- one run
def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def run_config(data: str, work: Path, name: str, args, device: torch.device, *, stage: int, workers: int,
               batch: int, checkpointing: bool, precision: str) -> dict:
    """One fresh Trainer, ``--steps`` steps: its per-step rows and what the run cost around them."""
    cfg = TrainConfig(data=data, out=str(work / name), stage=stage, preset=args.preset, allow_smoke=args.allow_smoke,
                      max_steps=args.steps, global_batch_size=batch, seed=args.seed, mixed_precision=precision,
                      gradient_checkpointing=checkpointing, num_workers=workers, progress=False,
                      checkpoint_every=10**9)
    world = World(rank=0, size=1, local_rank=device.index or 0, device=device, owns_process_group=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer = BenchTrainer(cfg, world)
    t1 = time.perf_counter()
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    out = {"params": sum(p.numel() for p in trainer.model.parameters()),
           "trainable_params": sum(p.numel() for p in trainer.params),
           "rows": read_metrics(work / name), "setup_s": t1 - t0, "run_s": t2 - t1}
    del trainer
    gc.collect()
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


def summarize(name: str, runs: list[dict], args, **settings) -> dict:
    """Figures over the timed steps (after ``--warmup``) of every repeat of one configuration, pooled."""
    timed = [[r for r in run["rows"] if r["step"] > args.warmup] for run in runs]
    if not all(timed):
        raise SystemExit(f"{name}: no steps after the {args.warmup} warm-up steps; raise --steps")
    rows = [r for t in timed for r in t]
    st = [r["step_time_s"] for r in rows]
    wait = [r["data_wait_frac"] for r in rows]
    samples = sum(round(r["samples_per_s"] * r["step_time_s"]) for r in rows)  # windows in the timed steps
    out = {**settings, "params": runs[0]["params"], "trainable_params": runs[0]["trainable_params"],
           "repeats": len(runs), "steps": args.steps, "warmup_steps": args.warmup, "timed_steps": len(rows),
           "epochs": sorted({int(r["epoch"]) for run in runs for r in run["rows"]}),
           "steps_per_s": len(rows) / sum(st), "samples_per_s": samples / sum(st),
           "median_steps_per_s": 1 / statistics.median(st),
           "step_time_s_mean": statistics.fmean(st), "step_time_s_median": statistics.median(st),
           "step_time_s_min": min(st), "step_time_s_max": max(st),
           "data_wait_frac_mean": statistics.fmean(wait), "data_wait_frac_max": max(wait),
           "data_wait_s_mean": statistics.fmean(w * s for w, s in zip(wait, st)),
           "per_repeat_steps_per_s": [len(t) / sum(r["step_time_s"] for r in t) for t in timed],
           "per_repeat_median_step_s": [statistics.median(r["step_time_s"] for r in t) for t in timed],
           "warmup_step_times_s": [[r["step_time_s"] for r in run["rows"] if r["step"] <= args.warmup] for run in runs],
           "setup_s": [run["setup_s"] for run in runs], "run_s": [run["run_s"] for run in runs],
           "final_loss": [run["rows"][-1]["loss"] for run in runs]}
    if "peak_allocated_bytes" in runs[0]:
        peak = max(run["peak_allocated_bytes"] for run in runs)
        out.update(peak_allocated_gib=peak / GIB, peak_allocated_gb=peak / GB,
                   peak_reserved_gib=max(run["peak_reserved_bytes"] for run in runs) / GIB)
    print(f"{name}: {out['steps_per_s']:.3f} steps/s ({out['median_steps_per_s']:.3f} from the median step), "
          f"{out['samples_per_s']:.2f} samples/s, data wait {out['data_wait_frac_mean']:.1%}"
          + (f", peak {out['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in out else ""), flush=True)
    return out


def run_suite(data: str, work: Path, args, device: torch.device, configs: dict[str, dict]) -> dict:
    """Every configuration ``--repeats`` times, round-robin (so drift in the machine's load hits all alike)."""
    raw = {name: [] for name in configs}
    for rep in range(args.repeats):
        for name, c in configs.items():
            raw[name].append(run_config(data, work, f"{name}_rep{rep}", args, device, **c))
    return {name: summarize(name, raw[name], args, **configs[name]) for name in configs}


# ---------------------------------------------------------------------------- suites
def cpu_suite(data: str, work: Path, args, device: torch.device) -> dict:
    precision = args.precision or "no"
    configs = {f"stage{stage}_workers{w}": dict(stage=stage, workers=w, batch=args.batch,
                                                checkpointing=args.gradient_checkpointing, precision=precision)
               for stage in args.stages for w in args.workers}
    runs, ratios = run_suite(data, work, args, device, configs), {}
    for stage in args.stages:
        base = runs[f"stage{stage}_workers{args.workers[0]}"]
        for w in args.workers[1:]:
            r = runs[f"stage{stage}_workers{w}"]
            ratios[f"stage{stage}_workers{w}_over_workers{args.workers[0]}"] = {
                "steps_per_s": r["steps_per_s"] / base["steps_per_s"],
                "median_steps_per_s": r["median_steps_per_s"] / base["median_steps_per_s"],
                "data_wait_frac": [base["data_wait_frac_mean"], r["data_wait_frac_mean"]]}
    worst_wait = max(r["data_wait_frac_mean"] for r in runs.values())
    return {"runs": runs, "ratios": ratios, "baseline": f"loader workers {args.workers[0]} (same run)",
            "data_wait_frac_worst": worst_wait, "meets_data_wait_goal": worst_wait < GOALS["data_wait_frac_max"]}


def gpu_suite(data: str, work: Path, args, device: torch.device) -> dict:
    precision = args.precision or "bf16"
    w = args.workers[-1]
    configs = {}
    if 2 in args.stages:
        configs["stage2"] = dict(stage=2, workers=w, batch=args.stage2_batch, checkpointing=True, precision=precision)
    if 1 in args.stages:
        configs["stage1"] = dict(stage=1, workers=w, batch=args.stage1_batch, checkpointing=False, precision=precision)
    runs = run_suite(data, work, args, device, configs)
    out = {"runs": runs}
    if "stage2" in runs:
        r = runs["stage2"]
        out["stage2_step_s"] = 1 / r["steps_per_s"]
        out["stage2_step_s_median"] = r["step_time_s_median"]
        out["meets_stage2_step_goal"] = out["stage2_step_s"] <= GOALS["stage2_step_s_max"]
        if "peak_allocated_gb" in r:
            out["stage2_peak_gb"] = r["peak_allocated_gb"]
            out["meets_peak_goal"] = r["peak_allocated_gb"] <= GOALS["peak_gb_max"]
    if "stage1" in runs:
        out["stage1_samples_per_s"] = runs["stage1"]["samples_per_s"]
        out["meets_stage1_goal"] = out["stage1_samples_per_s"] >= GOALS["stage1_samples_per_s_min"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="curated dataset (index.json); default: build a synthetic one")
    p.add_argument("--allow-smoke", action="store_true", help="with --data: train on smoke-profile shards")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--suite", choices=("auto", "cpu", "gpu"), default="auto",
                   help="cpu: loader workers compared; gpu: step time, samples/s and peak memory (auto: by --device)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stages", default="1,2", help="comma-separated stages")
    p.add_argument("--workers", default=None,
                   help="comma-separated loader worker counts, the first is the baseline (cpu: 0,2; gpu: 2)")
    p.add_argument("--steps", type=int, default=0, help="training steps per run (0: cpu 40, gpu 20)")
    p.add_argument("--warmup", type=int, default=-1, help="first steps of each run left out (-1: cpu 5, gpu 3)")
    p.add_argument("--repeats", type=int, default=0, help="runs per configuration, round-robin (0: cpu 2, gpu 1)")
    p.add_argument("--batch", type=int, default=1, help="cpu suite: global batch (clips per step)")
    p.add_argument("--stage1-batch", type=int, default=16, help="gpu suite: stage-1 batch")
    p.add_argument("--stage2-batch", type=int, default=1, help="gpu suite: stage-2 batch")
    p.add_argument("--precision", choices=("bf16", "no"), help="default: no (fp32) for cpu, bf16 for gpu")
    p.add_argument("--gradient-checkpointing", action="store_true", help="cpu suite (the gpu suite sets its own)")
    p.add_argument("--clips", type=int, default=0, help="synthetic clips (default: enough for one epoch)")
    p.add_argument("--frames", type=int, default=160, help="gpu suite synthetic data: frames per clip")
    p.add_argument("--audio-layers", type=int, default=13)
    p.add_argument("--audio-dim", type=int, default=768)
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in the training process (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    suite = args.suite if args.suite != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    args.stages = [int(s) for s in args.stages.split(",")]
    args.workers = [int(w) for w in (args.workers or ("0,2" if suite == "cpu" else "2")).split(",")]
    args.repeats = args.repeats or (2 if suite == "cpu" else 1)
    args.steps = args.steps or (40 if suite == "cpu" else 20)
    args.warmup = args.warmup if args.warmup >= 0 else (5 if suite == "cpu" else 3)
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")

    result = {"suite": suite, "preset": args.preset, "device": str(device), "machine": machine(device),
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as tmp:
        work = Path(tmp)
        if args.data:
            data = args.data
            result["dataset"] = str(Path(args.data).resolve()) if "://" not in args.data else args.data
        else:
            batch = max((args.batch, args.stage1_batch, args.stage2_batch) if suite == "gpu" else (args.batch,))
            clips = args.clips or batch * (args.steps + 1)  # every configuration stays in its first epoch
            t = time.perf_counter()
            if suite == "cpu":
                data = str(build_fixture(work / "data", clips))
                result["dataset"] = f"synthetic: tests/loader_fixtures.make_dataset, {clips} clips"
            else:
                hw = preset(args.preset)["data"]["latent_size"]
                data = str(build_shaped(work / "data", clips, args.frames, hw, args.audio_layers, args.audio_dim))
                result["dataset"] = (f"synthetic: {clips} clips x {args.frames} frames, latent [T,4,{hw},{hw}] fp16, "
                                     f"audio [T,{args.audio_layers},{args.audio_dim}] fp16")
            result["dataset_build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result.update((cpu_suite if suite == "cpu" else gpu_suite)(data, work, args, device))
        result["total_s"] = time.perf_counter() - t
    result["machine"]["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
