"""Memory of one stage over one input, in process (issue 13's memory goal; docs/benchmarks.md).

    python benchmarks/stage_memory.py --input looped.mp4 --rows /tmp/rows-5min.json --stage crop \
        [--tracemalloc] [--no-malloc-tuning | --mmap-threshold-kb 256] [--out result.json]

Runs ``DetectTrackStage`` (``--stage detect``) or ``CropScoreStage`` (``--stage crop``, on the detect
row cached in ``--rows``) on one input, as its Ray actor would (the actor's ``__init__``, the scoring
thread), and records after every scored clip (crop) and every second: the process's RSS, glibc's
``mallinfo2`` (bytes in use in the heap arenas, free in them, and mmapped blocks) and, with
``--tracemalloc``, what Python's allocator holds (NumPy arrays included). So growth over a long input
can be told apart: Python objects kept (tracemalloc grows), native memory kept (in use grows) or
glibc's free lists not given back (free grows: fragmentation). Prints one line of JSON.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mallinfo() -> dict:
    """glibc's totals over every arena, MB: in use in the heaps, free in the heaps, mmapped blocks."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    mb = 1 / 2**20
    return {"heap_used_mb": round(m.uordblks * mb, 1), "heap_free_mb": round(m.fordblks * mb, 1),
            "mmapped_mb": round(m.hblkhd * mb, 1), "mmapped_blocks": m.hblks}


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm; not psutil: importing Ray for its copy would add to it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler:
    def __init__(self, tracing: bool, interval_s: float = 1.0):
        self.tracing, self.interval_s = tracing, interval_s
        self.samples: list[dict] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def sample(self, label: str | None = None) -> dict:
        import tracemalloc

        rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        s = {"t": round(time.perf_counter() - self.t0, 1), "rss_mb": round(rss / 2**20, 1), **mallinfo()}
        if self.tracing:
            cur, peak = tracemalloc.get_traced_memory()
            s["py_mb"] = round(cur / 2**20, 1)
        if label:
            s["at"] = label
        self.samples.append(s)
        return s

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample("end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--rows", type=Path, required=True, help="the detect row of --input (written by --stage detect)")
    ap.add_argument("--stage", choices=("detect", "crop"), required=True)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="skip malloc.tune_malloc (as before the fix)")
    ap.add_argument("--mmap-threshold-kb", type=int, help="ray.malloc_mmap_threshold_kb (malloc.tune_malloc)")
    ap.add_argument("--top", type=int, default=0, help="with --tracemalloc: print the N largest growths by line")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from pipeline.config import CurateConfig
    from pipeline.stages import CropScoreStage, DetectTrackStage, ProbeStage, new_row

    import pipeline.stages as stages

    if args.no_malloc_tuning:
        stages.tune_malloc = lambda *a: None
    import torch

    torch.set_num_threads(1)  # as in the Ray actor (1 CPU: Ray sets OMP_NUM_THREADS=1)
    config = CurateConfig.model_validate({"ray": {"malloc_mmap_threshold_kb": args.mmap_threshold_kb}}
                                         if args.mmap_threshold_kb is not None else {})
    stage = DetectTrackStage(config) if args.stage == "detect" else CropScoreStage(config)
    if args.stage == "detect":
        row = ProbeStage(config)(new_row("long", str(Path(args.input).resolve()), "bench", "video", {}))
    else:
        row = json.loads(args.rows.read_text())
        for name, v in list(row.items()):  # the blobs (None in the cache) as crop_score_profile.py restores them
            if v is None and name not in ("video_id", "uri", "source", "kind", "payload", "clip_index"):
                row[name] = b""
    import tracemalloc

    if args.tracemalloc:
        tracemalloc.start(8)
    sampler = Sampler(args.tracemalloc)
    per_clip = []
    snap0 = tracemalloc.take_snapshot() if args.tracemalloc and args.top else None
    if args.stage == "crop":
        import pipeline.clip_scores as clip_scores

        finish = clip_scores.ClipObserver.finish

        def logged_finish(self, *a, **k):
            out = finish(self, *a, **k)
            per_clip.append(sampler.sample(f"clip {self.clip.clip_index}"))
            return out

        clip_scores.ClipObserver.finish = logged_finish
    sampler.sample("start")
    import resource

    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0, wall0 = time.process_time(), time.perf_counter()
    load0 = os.getloadavg()
    with sampler:
        if args.stage == "detect":
            out = stage(row)
            args.rows.write_text(json.dumps({k: (v if not isinstance(v, bytes) else None) for k, v in out.items()}))
            n_out = 1
        else:
            n_out = 0
            for _ in stage(row):  # each row dropped at once; RSS as it leaves (what the stage still holds)
                n_out += 1
                per_clip.append(sampler.sample(f"row {n_out}"))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # page faults do not inflate with the machine's load as CPU seconds do: the cost of mmapped buffers
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    result = {"stage": args.stage, "input": args.input, "malloc_tuning": not args.no_malloc_tuning,
              "mmap_threshold_kb": args.mmap_threshold_kb,
              "tracemalloc": args.tracemalloc, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
              "minor_faults": faults, "rows_out": n_out,
              "start_rss_mb": sampler.samples[0]["rss_mb"], "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
              "end": sampler.samples[-1], "load_before": load0, "load_after": os.getloadavg(),
              "per_clip": per_clip, "samples": sampler.samples}
    if snap0 is not None:
        for stat in tracemalloc.take_snapshot().compare_to(snap0, "traceback")[:args.top]:
            print(stat, file=sys.stderr)
            for line in stat.traceback.format()[-6:]:
                print("   ", line, file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "per_clip")}))
    print("per clip:", " ".join(f"{s['rss_mb']:.0f}/{s['heap_used_mb']:.0f}/{s['heap_free_mb']:.0f}/{s['mmapped_mb']:.0f}"
                                + (f"/{s['py_mb']:.0f}" if 'py_mb' in s else "") for s in per_clip))


if __name__ == "__main__":
    main()
