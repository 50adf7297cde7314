"""CPU profile of the crop & score stage alone, in process (docs/benchmarks.md, issue 13).

    python benchmarks/crop_score_profile.py --input ../shared/data/real --rows /tmp/detect-rows.json \
        --out /tmp/crop-before [--profile /tmp/crop-before.prof] [--set score.landmarks_every=2 ...]

The detect stage's rows are computed once and cached in ``--rows`` (JSON), so before/after runs
crop and score exactly the same candidate clips. Writes ``--out``/scores.json (every clip's scores,
kept or rejected, and its status) and ``--out``/<video_id>-<clip>.mp4, and prints the stage's CPU
seconds (``time.process_time``: every thread of this process) with the load average.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import CurateConfig  # noqa: E402
from pipeline.stages import CropScoreStage, DetectTrackStage, new_row  # noqa: E402


def detect_rows(input_dir: Path, cache: Path, config: CurateConfig) -> list[dict]:
    if cache.exists():
        return json.loads(cache.read_text())
    stage = DetectTrackStage(config)
    rows = []
    for path in sorted(input_dir.iterdir()):
        if path.suffix.lower() not in (".mp4", ".mov", ".mkv", ".webm"):
            continue
        r = stage(new_row(path.stem, str(path), "bench", "video", {}))
        rows.append({k: (v if not isinstance(v, bytes) else None) for k, v in r.items()})
    cache.write_text(json.dumps(rows))
    return rows


class InlineObserver:
    """``clip_scores.ObserverThread`` without the thread (profiling only): same calls, same order."""

    def submit(self, fn, *args) -> None:
        fn(*args)

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/real")
    ap.add_argument("--rows", type=Path, required=True, help="cache of the detect stage's rows (JSON)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", type=Path, default=None, help="write cProfile stats here")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override, e.g. score.landmarks_every=2 (YAML value)")
    args = ap.parse_args()
    config = CurateConfig()
    if args.set:
        import yaml

        overrides: dict = {}
        for item in args.set:
            key, value = item.split("=", 1)
            section, field = key.split(".", 1)
            overrides.setdefault(section, {})[field] = yaml.safe_load(value)
        config = CurateConfig.model_validate({**config.model_dump(), **{
            k: {**config.model_dump()[k], **v} for k, v in overrides.items()}})
    import torch

    torch.set_num_threads(1)  # as in the Ray actor (1 CPU: Ray sets OMP_NUM_THREADS=1)
    rows = [r for r in detect_rows(args.input, args.rows, config) if r["kind"] == "video"]
    for r in rows:
        for name, v in list(r.items()):
            if v is None and name not in ("video_id", "uri", "source", "kind", "payload", "clip_index"):
                r[name] = b""
    if args.profile:
        # cProfile sees one thread: run the stage's work (the deadline thread, the observer thread) in this one
        import pipeline.clip_scores as clip_scores
        import pipeline.stages as stages

        stages.run_with_deadline = lambda fn, **kw: fn()
        clip_scores.ObserverThread = InlineObserver
    stage = CropScoreStage(config)
    args.out.mkdir(parents=True, exist_ok=True)
    # CPU seconds of the whole process per call (MediaPipe's graph, FFmpeg's and x264's threads work while
    # this thread waits for them), not wall time: the machine is shared
    prof = cProfile.Profile(time.process_time) if args.profile else None
    load0 = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = {}
    if prof:
        prof.enable()
    for row in rows:
        for r in stage(row):
            p = json.loads(r["payload"])
            if r["kind"] == "clip":
                results[f"{r['video_id']}-{r['clip_index']}"] = {"status": "kept", "scores": p["scores"]}
                (args.out / f"{r['video_id']}-{r['clip_index']}.mp4").write_bytes(r["mp4"])
            elif r["kind"] == "reject" and "scores" in p:
                results[f"{r['video_id']}-{r['clip_index']}"] = {"status": "rejected", "reason": p.get("reason"),
                                                                 "scores": p["scores"]}
    if prof:
        prof.disable()
        prof.dump_stats(str(args.profile))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    (args.out / "scores.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    print(json.dumps({"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "clips": len(results),
                      "kept": sum(v["status"] == "kept" for v in results.values()),
                      "load_before": load0, "load_after": os.getloadavg()}))
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
