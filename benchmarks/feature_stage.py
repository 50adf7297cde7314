"""Feature stage inside the Ray Data pipeline vs the bare extractor, same clips, same batch size.

    python benchmarks/feature_stage.py [--clips 4] [--frames 48] [--out benchmarks/results/feature_stage.json]

Both sides start from the same encoded clips (video.mp4 + 16 kHz audio), so the pipeline side
pays exactly what the curation job pays on top of the models: mp4 decode, Arrow blocks, object
store transfers and actor scheduling. On a GPU machine the ratio says how busy the pipeline
keeps the GPU compared with calling the model directly (the goal: >= 0.8).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.media import encode_clip, read_clip  # noqa: E402
from pipeline.shards import load_npy, npy_bytes  # noqa: E402
from pipeline.stages import FeatureStage, new_row  # noqa: E402


def make_rows(n_clips: int, n_frames: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_clips):
        frames = rng.integers(0, 255, (n_frames, 512, 512, 3), dtype=np.uint8)
        audio = (rng.standard_normal(n_frames * 640) * 0.1).astype(np.float32)
        meta = {"key": f"bench_{i:04d}", "models": {}, "members": ["video.mp4", "meta.json"], "scores": {},
                "clip": {"n_frames": n_frames, "fps": 25, "track_id": 0, "start_s": 0.0}}
        rows.append(new_row(f"bench{i}", f"bench://{i}", "bench", "clip", meta, clip_index=0,
                            mp4=encode_clip(frames, audio), audio16k=npy_bytes(audio)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/feature_stage.json")
    args = ap.parse_args()
    import ray
    import torch

    config = load_config(None, **{"features.batch_size": args.batch_size,
                                  "features.num_gpus": 1.0 if torch.cuda.is_available() else 0.0})
    rows = make_rows(args.clips, args.frames)
    total = args.clips * args.frames

    stage = FeatureStage(config)  # bare: the same extractor object, called directly
    stage.extractor(read_clip(bytes(rows[0]["mp4"]))[0], load_npy(bytes(rows[0]["audio16k"])))  # warm-up
    t = time.perf_counter()
    for r in rows:
        frames, _, _ = read_clip(bytes(r["mp4"]))
        stage.extractor(frames, load_npy(bytes(r["audio16k"])))
    bare = total / (time.perf_counter() - t)

    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    f = config.features
    kwargs = {"num_gpus": f.num_gpus} if f.num_gpus else {}
    # The timed run includes starting the actor and loading its models once, as a real run does;
    # more clips amortise it.
    t = time.perf_counter()
    out = ds.map_batches(FeatureStage, fn_constructor_args=(config,), batch_size=1, batch_format="numpy",
                         compute=ActorPoolStrategy(size=1), num_cpus=f.num_cpus, **kwargs).take_all()
    piped = total / (time.perf_counter() - t)
    assert all(len(r["latent"]) for r in out)
    result = {"frames": total, "batch_size": args.batch_size, "device": str(stage.extractor.device),
              "dtype": str(stage.extractor.dtype), "bare_extractor_frames_per_s": bare,
              "pipeline_frames_per_s": piped, "ratio": piped / bare,
              "note": "pipeline time includes starting one actor and loading its models",
              "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
