"""Shot-boundary detectors compared on the same decoded frames: our former HSV-histogram threshold
and PySceneDetect's detectors, on the real clips (no cuts) and clips joined from them by a hard
cut, a fade through black, a cross-dissolve, or a hard cut between two shots of the same person,
and one-shot clips with a fast zoom, a fast pan or a brightness step (no cut).

    python benchmarks/shots.py [--real ../shared/data/real] [--out benchmarks/results/shots-cpu.json]

Each clip is decoded once as the pipeline decodes it (pipeline.media.iter_frames at
detect.max_side); every variant gets those frames through pipeline.shots.ShotDetector. Prints
the table that docs/pipeline.md "Shots" quotes: per transition kind, transitions found (hard
within 1 frame, gradual inside the transition), false cuts, mean timing error of hard cuts, and
the detector's cost per analysis frame (downscale included, decode excluded).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from derived_clips import judge_cuts, no_cut_clips, real_clips, transition_clips  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.media import iter_frames  # noqa: E402
from pipeline.shots import ShotDetector, scenedetect_frame  # noqa: E402

# name -> ShotDetector's detectors (threshold = each one's default; "hsv" = our former one)
VARIANTS = {
    "ours: HSV hist 0.45": {"hsv": 0.45},
    "ContentDetector 27": {"content": 27.0},
    "AdaptiveDetector 3": {"adaptive": 3.0},
    "HistogramDetector 0.05": {"histogram": 0.05},
    "HashDetector 0.395": {"hash": 0.395},
    "ThresholdDetector 12": {"threshold": 12.0},
    "HistogramDetector 0.08": {"histogram": 0.08},
    "Content 27 + Histogram 0.05": {"content": 27.0, "histogram": 0.05},
    "Adaptive 3 + Histogram 0.05 (chosen)": {"adaptive": 3.0, "histogram": 0.05},
    "Content 27 + Adaptive 3 + Histogram 0.05": {"content": 27.0, "adaptive": 3.0, "histogram": 0.05},
}
KINDS = ["hard", "fade", "dissolve", "same_person", "no_cut", "none"]


def detect_cuts(frames, detectors: dict[str, float], min_shot_frames: int = 15) -> tuple[list[int], float]:
    """Cut frame indices over a list of RGB analysis frames, and the seconds spent."""
    shots = ShotDetector(detectors, min_shot_frames)
    t0 = time.perf_counter()
    cuts = set()
    for i, img in enumerate(frames):
        cuts.update(shots.process(i, img))
    cuts.update(shots.finish(len(frames) - 1))
    return sorted(c for c in cuts if c > 0), time.perf_counter() - t0


def histogram_margin(frames, clip) -> float:
    """HistogramDetector's score (correlation of consecutive luma histograms; a cut below 0.95 at
    threshold 0.05) at its lowest: inside a dissolve, or anywhere after the first
    min_scene_len frames of a clip without a cut. How close real talking is to a dissolve."""
    import cv2
    from scenedetect.detectors import HistogramDetector

    hists = [HistogramDetector.calculate_histogram(scenedetect_frame(f)) for f in frames]
    corr = [1.0] + [cv2.compareHist(a, b, cv2.HISTCMP_CORREL) for a, b in zip(hists, hists[1:])]
    lo, hi = clip.truth if clip.truth else (15, len(frames) - 1)
    return float(min(corr[lo:hi + 1]))


def compare(real_dir: Path, work: Path, max_side: int) -> dict:
    clips = transition_clips(real_dir, work) + no_cut_clips(real_dir, work) + real_clips(real_dir)
    tally = {v: defaultdict(lambda: {"n": 0, "found": 0, "false": 0, "err": []}) for v in VARIANTS}
    cost = {v: [0.0, 0] for v in VARIANTS}
    per_clip = []
    for clip in clips:
        frames = [img for _, img in iter_frames(str(clip.path), max_side=max_side)]
        row = {"clip": clip.name, "kind": clip.kind, "truth": clip.truth, "frames": len(frames), "cuts": {}}
        if clip.kind in ("dissolve", "no_cut", "none"):
            row["histogram_min_correlation"] = histogram_margin(frames, clip)
        for v, dets in VARIANTS.items():
            cuts, seconds = detect_cuts(frames, dets)
            found, false, err = judge_cuts(cuts, clip)
            t = tally[v][clip.kind]
            t["n"] += 1
            t["found"] += found
            t["false"] += false
            if err is not None:
                t["err"].append(err)
            cost[v][0] += seconds
            cost[v][1] += len(frames)
            row["cuts"][v] = cuts
        per_clip.append(row)
    return {"tally": {v: dict(k) for v, k in tally.items()},
            "ms_per_frame": {v: 1000 * s / max(n, 1) for v, (s, n) in cost.items()},
            "clips": per_clip}


def table(result: dict) -> str:
    tally = result["tally"]
    some = next(iter(tally.values()))
    names = {"none": "real clips", "no_cut": "zoom/pan/exposure"}
    head = ["detector"] + [f"{k} found ({some[k]['n']})" if k not in names else f"{names[k]} ({some[k]['n']})"
                           for k in KINDS] + ["false cuts", "hard-cut error (frames)", "ms / frame"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, kinds in tally.items():
        cells = [v]
        for k in KINDS:
            t = kinds[k]
            cells.append(f"{t['found']}/{t['n']}" if k not in names else f"{t['false']} false cuts")
        cells.append(str(sum(t["false"] for t in kinds.values())))
        errs = [e for k in ("hard", "same_person") for e in kinds[k]["err"]]
        cells.append(f"{sum(errs) / len(errs):.2f}" if errs else "-")
        cells.append(f"{result['ms_per_frame'][v]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures and every clip's cuts as JSON")
    args = ap.parse_args()
    max_side = load_config().detect.max_side
    with tempfile.TemporaryDirectory() as work:
        result = compare(args.real, Path(work), max_side)
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    print(table(result))
    for kind in ("dissolve", "no_cut", "none"):
        lows = {r["clip"]: round(r["histogram_min_correlation"], 3) for r in result["clips"] if r["kind"] == kind}
        print(f"\nHistogramDetector lowest correlation, {kind}: {lows}")
    print(f"\n{result['machine']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result["tally"] = {v: {k: {**t, "err": list(t["err"])} for k, t in kinds.items()} for v, kinds in result["tally"].items()}
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
