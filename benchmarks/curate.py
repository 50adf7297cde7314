"""End-to-end curation throughput against a decode-only baseline, in the same run.

    python benchmarks/curate.py [--input DIR] [--features] [--out benchmarks/results/curate.json]

Baseline: decoding every video frame of the same inputs once with PyAV (what any pipeline pays
at minimum). The job decodes each kept input twice (analysis at reduced size, then the crop at
full size) plus detection, encoding and scoring, so the ratio says how much of the job's time is
the unavoidable decode. Default input: ../shared/data/real (else the demo's synthetic clips).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.inputs import expand_inputs  # noqa: E402
from pipeline.media import MediaError, iter_frames, probe  # noqa: E402


def decode_all(items) -> tuple[float, float]:
    t = time.perf_counter()
    seconds = 0.0
    for it in items:
        try:
            facts = probe(it.uri)
            for _ in iter_frames(it.uri, rotation=facts.rotation):
                pass
            seconds += facts.duration_s
        except MediaError:
            pass
    return time.perf_counter() - t, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--features", action="store_true", help="include the feature stage (smoke models)")
    ap.add_argument("--out", default="benchmarks/results/curate.json")
    args = ap.parse_args()
    src = Path(args.input)
    if not src.exists():
        from pipeline.demo import make_talking_head

        src = Path(tempfile.mkdtemp(prefix="bench-in-"))
        for i in range(4):
            make_talking_head(src / f"talk_{i}.mp4", duration_s=6.0, seed=i)
    items = expand_inputs([str(src)])
    decode_s, video_s = decode_all(items)
    from jobs._ray import start_ray
    from pipeline.runner import run_curation

    config = load_config(None, **{"features.enabled": args.features})
    with tempfile.TemporaryDirectory(prefix="bench-out-") as out:
        t = time.perf_counter()
        start_ray(config)  # timed, as the job's own start-up (the figures in docs/benchmarks.md include it)
        summary = run_curation(items, out, config, progress_every_s=60)
        job_s = time.perf_counter() - t
        run = json.loads((Path(out) / "run.json").read_text())
    result = {"inputs": len(items), "video_seconds": video_s, "decode_only_s": decode_s, "job_s": job_s,
              "job_video_seconds_per_s": video_s / job_s, "decode_video_seconds_per_s": video_s / decode_s,
              "decode_share_of_job": decode_s / job_s, "features": args.features,
              "clips_kept": summary["clips_kept"], "stage_seconds": run["timings"]["stage_cpu_s"],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
