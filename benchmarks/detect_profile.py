"""CPU seconds of the detect & track stage by part, in process, over the real clips (issue 13).

    python benchmarks/detect_profile.py [--real ../shared/data/real] [--rounds 1]
        [--save OUT.json] [--compare BEFORE.json]

Runs ``stages.DetectTrackStage`` (probe + detect, the smoke profile's MediaPipe models) on every
file of ``--real`` under cProfile with the calling thread's CPU clock (``time.thread_time``; the CPU
of FFmpeg's decoder threads and of the probe's watchdog thread is the process's CPU time minus
that), after one warm-up input, and prints CPU seconds per part. ``--save`` writes every output of the stage
(rejects rows, cut times, frame and detection counts, clips) so that ``--compare`` can check a later
version gives the same outputs. A file saved before 2026-12-01 also holds the per-clip detection arrays
of the stage's former ``analysis`` blob (boxes, scores, FaceMesh landmarks); they are left out of the
comparison, as the stage no longer writes them.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.stages import DetectTrackStage, new_row  # noqa: E402

# part -> functions (file suffix, function name) whose cumulative time it is; the order matters:
# a part's time is its functions' cumulative time minus the parts listed after it that run inside.
PARTS = {
    "face detection (BlazeFace)": [("faces/mediapipe_backend.py", "detect")],
    "shot detection": [("pipeline/shots.py", "process"), ("pipeline/shots.py", "finish")],
    "letterbox bars": [("pipeline/geometry.py", "add"), ("pipeline/geometry.py", "add_luma")],
    "swscale: resize + RGB conversion": [("~", "<method 'to_ndarray' of 'av.video.frame.VideoFrame' objects>"),
                                         ("~", "<method 'reformat' of 'av.video.frame.VideoFrame' objects>"),
                                         ("~", "<method 'reformat' of 'av.video.reformatter.VideoReformatter' objects>")],
    "audio decode (coverage)": [("pipeline/media.py", "decode_audio_track")],
        "segment_tracks": [("pipeline/segment.py", "segment_tracks")],
}


def _cum(stats: pstats.Stats, suffix: str, name: str) -> float:
    total = 0.0
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        if func == name and fname.endswith(suffix):
            total += ct
    return total


def _decode_time(stats: pstats.Stats) -> float:
    """Time inside FFmpeg's decoding calls (packet.decode / container.decode's generator)."""
    total = 0.0
    for (fname, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        if fname == "~" and ("decode" in func or "demux" in func) and "av." in func:
            total += tt
    return total


class ThreadCPU:
    """CPU seconds per thread of this process by name (/proc/self/task/*/stat, sampled every 20 ms
    while running, so a thread that exits loses at most its last 20 ms)."""

    def __init__(self):
        self.cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            self.cpu[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / self._tick)

    def _loop(self) -> None:
        self.tid = threading.get_native_id()
        while not self._stop.wait(0.02):
            self._sample()
        self.own_cpu = time.thread_time()  # the sampler's own CPU, left out of the totals

    def __enter__(self):
        self._sample()
        self.start = dict(self.cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_prefix(self, prefix: str) -> float:
        return sum(c - self.start.get(tid, (n, 0.0))[1] for tid, (n, c) in self.cpu.items() if n.startswith(prefix))


def run(real: Path, rounds: int, top: int = 0, profile: bool = True) -> tuple[dict, dict, float]:
    cfg = load_config(None, **{"features.enabled": False})
    stage = DetectTrackStage(cfg)
    files = sorted(p for p in real.iterdir() if p.is_file())
    import ray  # noqa: F401 - imported by the stage's timing on first use; in a Ray actor it is already loaded

    stage(new_row("warmup", str(files[0]), "bench", "video", {}))  # model graphs built, caches warm
    outputs = {}
    prof = cProfile.Profile(time.thread_time)
    threads = ThreadCPU()
    c0, m0 = time.process_time(), time.thread_time()
    with threads:
        for r in range(rounds):
            for p in files:
                if profile:
                    prof.enable()
                row = stage.probe(new_row(p.name, str(p), "bench", "video", {}))
                if row["kind"] == "video":  # what DetectTrackStage.__call__ runs, minus its watchdog thread
                    row = stage._detect(row)
                if profile:
                    prof.disable()
                if r == 0:
                    outputs[p.name] = _outputs(row)
    total, main = time.process_time() - c0 - threads.own_cpu, time.thread_time() - m0
    if not profile:
        return {}, outputs, total
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    parts = {name: sum(_cum(stats, suf, fn) for suf, fn in funcs) for name, funcs in PARTS.items()}
    parts["FFmpeg decode + demux, this thread"] = _decode_time(stats)
    mediapipe = threads.by_prefix("mediapipe/")
    parts["face detection: MediaPipe's threads"] = mediapipe
    parts["other (this thread)"] = main - sum(parts.values()) + mediapipe
    # FFmpeg's decoder threads (av:<codec>:df<n>, exited by now), the probe's watchdog thread
    parts["other threads (FFmpeg decoder threads, probe)"] = total - main - mediapipe
    if top:
        names = sorted({n for n, _ in threads.cpu.values()})
        print("threads by name:", {n: round(threads.by_prefix(n), 2) for n in names})
        busy = {tid: (n, round(c - threads.start.get(tid, (n, 0.0))[1], 2)) for tid, (n, c) in threads.cpu.items()}
        print(f"busy threads (main {threading.get_native_id()}, sampler {threads.tid}):",
              {tid: v for tid, v in busy.items() if v[1] >= 0.05})
        stats.sort_stats("tottime").print_stats(top)
        print(s.getvalue())
    return parts, outputs, total


def _outputs(row: dict) -> dict:
    payload = json.loads(row["payload"])
    out = {"kind": row["kind"], "reason": payload.get("reason"), "detail": payload.get("detail")}
    if row["kind"] != "video":
        return out
    out["analysis"] = payload["analysis"]
    out["clips"] = payload["clips"]
    out["short_segments"] = payload["short_segments"]
    return out


def _without_former_arrays(outputs: dict) -> dict:
    """Outputs saved by a version with the ``analysis`` blob, without its arrays (see the docstring)."""
    return {name: {k: v for k, v in out.items() if k != "arrays"} for name, out in outputs.items()}


def _max_diff(a, b, path="") -> list[tuple[str, float | str]]:
    """Paths where two JSON-like values differ: numeric differences with their size."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                diffs.append((f"{path}/{k}", "missing on one side"))
            else:
                diffs += _max_diff(a[k], b[k], f"{path}/{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, f"length {len(a)} vs {len(b)}")]
        if a and all(isinstance(x, (int, float)) or x is None for x in a + b) and None not in a + b:
            d = float(np.nanmax(np.abs(np.asarray(a, float) - np.asarray(b, float)))) if a else 0.0
            same_nan = np.array_equal(np.isnan(np.asarray(a, float)), np.isnan(np.asarray(b, float)))
            return [] if d == 0 and same_nan else [(path, d if same_nan else "NaN pattern differs")]
        diffs = []
        for i, (x, y) in enumerate(zip(a, b)):
            diffs += _max_diff(x, y, f"{path}[{i}]")
        return diffs
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if a == b or (a != a and b != b) else [(path, abs(a - b))]
    return [] if a == b else [(path, f"{a!r} vs {b!r}")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--no-profile", action="store_true", help="total CPU only, without cProfile's overhead")
    ap.add_argument("--cv2-threads", type=int, help="cv2.setNumThreads first (default: OpenCV's own)")
    ap.add_argument("--top", type=int, default=0, help="also print the N functions with the most own time")
    args = ap.parse_args()
    if args.cv2_threads is not None:
        import cv2

        cv2.setNumThreads(args.cv2_threads)
    load0 = os.getloadavg()
    parts, outputs, total = run(args.real, args.rounds, args.top, profile=not args.no_profile)
    load1 = os.getloadavg()
    print(f"detect stage over {args.rounds} round(s) of {args.real}: {total:.2f} CPU s "
          f"(load avg {load0[0]:.2f} -> {load1[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    for name, sec in parts.items():
        print(f"  {name:42s} {sec:7.2f}")
    if args.save:
        args.save.write_text(json.dumps({"parts": parts, "total": total, "outputs": outputs}))
    if args.compare:
        before = _without_former_arrays(json.loads(args.compare.read_text())["outputs"])
        diffs = _max_diff(before, outputs)
        print(f"outputs against {args.compare}: {'identical' if not diffs else f'{len(diffs)} differences'}")
        for path, d in diffs[:40]:
            print(f"  {path}: {d}")


if __name__ == "__main__":
    main()
