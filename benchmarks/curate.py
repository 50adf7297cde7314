"""End-to-end curation throughput against the ffmpeg decode floor, in the same run (issue 13).

    python benchmarks/curate.py [--input DIR] [--scale 1|2|4] [--min-video-s 300] [--features]
                                [--config YAML] [--long-minutes M] [--out benchmarks/results/curate-cpu.json]

Inputs: the real clips in ../shared/data/real, linked into a temporary directory under distinct
names and repeated until they hold at least ``--min-video-s`` seconds of video, times ``--scale``
(``--input`` takes any other directory or file; it is repeated the same way).

Floor: ``ffmpeg -threads N -i X -vf scale=512:-2,fps=25 -f null -`` summed over the inputs
(N = the CPUs the job may use; the binary from imageio_ffmpeg), i.e. decoding every input once and
scaling it to the output's size and rate, timed once before the job and once after it; ``floor_s``
is the mean of the two (the same command varied by ~25% from one run to the next on a quiet
2-core machine, so one timing moved the ratio as much as a real change would). The job is
``run_curation`` with an embedded Ray on the same inputs and cores. Also measured: the job's CPU
seconds (user+sys of the whole process tree: driver, Ray's daemons and workers, less the CPU of
this script's own sampling thread, which is reported apart as ``sampler_cpu_s``), the peak RSS of
the driver and of each Ray worker (psutil, sampled every 0.25 s), and a PyAV decode of every frame
(``--pyav-baseline``).

``--long-minutes M``: instead, one input made by looping a real clip (stream copy, no re-encode)
to M minutes, against that clip alone: the peak memory of the workers should not grow with it.

The last line printed is the result as one line of JSON, with ``ratio = floor_s / job_s``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import psutil
except ImportError:  # not a declared dependency; importing Ray puts its own copy (ray/thirdparty_files) on the path
    import importlib

    importlib.import_module("ray")
    import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.inputs import expand_inputs  # noqa: E402
from pipeline.media import MediaError, iter_frames, probe  # noqa: E402

REAL_DIR = ROOT.parent / "shared" / "data" / "real"


def video_seconds(path: str) -> float:
    """Seconds of video in a file, 0 for anything the probe cannot read (a wav, a README)."""
    try:
        facts = probe(path)
    except MediaError:
        return 0.0
    return facts.duration_s if facts.video_codec else 0.0


def repeated_inputs(src: Path, min_video_s: float, scale: int, workdir: Path) -> tuple[list[Path], float]:
    """Symlinks to every file of ``src`` (distinct names, so distinct video ids), whole rounds of
    them until the round count reaches ``min_video_s`` seconds of video, times ``scale``."""
    files = sorted(p for p in (src.rglob("*") if src.is_dir() else [src]) if p.is_file() and not p.name.startswith("."))
    per_round = {p: video_seconds(str(p)) for p in files}
    round_s = sum(per_round.values())
    if round_s <= 0:
        raise SystemExit(f"{src}: no readable video")
    rounds = max(1, int(-(-min_video_s // round_s))) * scale
    links = []
    for r in range(rounds):
        for p in files:
            link = workdir / f"r{r:03d}_{p.name}"
            link.symlink_to(p.resolve())
            links.append(link)
    return links, round_s * rounds


def looped_video(src: str, minutes: float, dest: Path) -> Path:
    """``src`` repeated (packets copied with shifted timestamps, no re-encode) to ``minutes``.

    Every loop is shifted by the same period, the longest stream's span (first dts to the end of
    its last packet), so dts keep rising in every stream and audio stays with its picture."""
    import av

    with av.open(src) as c:
        keep = [s for s in c.streams if s.type in ("video", "audio")]
        first: dict[int, int] = {}
        end: dict[int, int] = {}
        for packet in c.demux(keep):
            if packet.dts is None:
                continue
            i = packet.stream.index
            first.setdefault(i, packet.dts)
            end[i] = max(end.get(i, packet.dts), packet.dts + (packet.duration or 0))
        period = max((end[s.index] - first[s.index]) * s.time_base for s in keep if s.index in end)
    loops = max(1, math.ceil(minutes * 60 / float(period)))
    with av.open(str(dest), "w") as out:
        with av.open(src) as c:
            streams = {s.index: out.add_stream_from_template(s) for s in c.streams if s.type in ("video", "audio")}
        for k in range(loops):
            with av.open(src) as c:
                for packet in c.demux([s for s in c.streams if s.index in streams]):
                    if packet.dts is None:
                        continue
                    shift = int(round(k * period / packet.time_base))
                    packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                    packet.stream = streams[packet.stream.index]
                    out.mux(packet)
    return dest


def ffmpeg_floor(paths: list[Path], threads: int) -> dict:
    """Wall and CPU seconds of ffmpeg decoding and scaling every input (the issue's floor)."""
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    before = os.times()
    t = time.perf_counter()
    failed = 0
    for p in paths:
        r = subprocess.run([exe, "-nostdin", "-v", "error", "-threads", str(threads), "-i", str(p),
                            "-vf", "scale=512:-2,fps=25", "-f", "null", "-"], capture_output=True)
        failed += r.returncode != 0  # the wav and README fail fast, as they do in the job
    wall = time.perf_counter() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"floor_s": wall, "floor_cpu_s": cpu, "ffmpeg": exe.rsplit("/", 1)[-1], "ffmpeg_threads": threads,
            "ffmpeg_failed_inputs": failed}


def pyav_decode(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        try:
            facts = probe(str(p))
            for _ in iter_frames(str(p), rotation=facts.rotation):
                pass
        except MediaError:
            pass
    return time.perf_counter() - t


def rss_breakdown(pid: int) -> dict:
    """RSS of a process in MB by kind of mapping (/proc/PID/smaps): the main malloc heap ([heap]),
    other anonymous memory (thread arenas, mmapped blocks, stacks), shared memory (Ray's object
    store) and files (libraries)."""
    kinds = {"heap_mb": 0, "anon_mb": 0, "shm_mb": 0, "file_mb": 0}
    kind = "anon_mb"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 6)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                    name = head[5].strip() if len(head) > 5 else ""
                    kind = ("heap_mb" if name == "[heap]" else "shm_mb" if name.startswith("/dev/shm") or "plasma" in name
                            else "file_mb" if name.startswith("/") else "anon_mb")
                elif head[0] == "Rss:":
                    kinds[kind] += int(head[1])
    except OSError:
        pass
    return {k: round(v / 1024, 1) for k, v in kinds.items()}


class TreeSampler:
    """Peak RSS per process and CPU seconds of this process and all its descendants (Ray's gcs,
    raylet and workers are children of an embedded Ray's driver), sampled from a thread."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.me = psutil.Process()
        self.peak: dict[int, int] = {}
        self.peak_private: dict[int, int] = {}  # RSS less its shared pages (the object store's mapped blocks)
        self.names: dict[int, str] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sampler_cpu_s = 0.0
        # every `timeline_every_s`, each Ray worker's RSS by kind of mapping (`rss_breakdown`): where a
        # worker's memory grows over a long input
        self.timeline: dict[int, list[dict]] = {}
        self.timeline_every_s, self._next_timeline, self._t0 = 10.0, 0.0, time.monotonic()
        # CPU the tree had already used (the driver's imports, Ray workers left by an earlier job
        # in the same process) is not this job's
        self._cpu0: dict[int, float] = {}
        for p in [self.me] + self.me.children(recursive=True):
            try:
                self._cpu0[p.pid] = self._cpu_of(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    @staticmethod
    def _cpu_of(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _sample(self) -> None:
        now = time.monotonic() - self._t0
        timeline = now >= self._next_timeline
        if timeline:
            self._next_timeline = now + self.timeline_every_s
        for p in [self.me] + self.me.children(recursive=True):
            try:
                with p.oneshot():
                    mem = p.memory_info()
                    rss, private = mem.rss, mem.rss - getattr(mem, "shared", 0)
                    cpu = self._cpu_of(p)
                    cmd = p.cmdline()
                    name = " ".join(cmd)[:100] if cmd else p.name()
                    # a Ray worker starts as python, then takes its actor's name ("ray::MapWorker(...)");
                    # keep the last actor name it had (it shows "ray::IDLE" between tasks)
                    if name.startswith("ray::") and not name.startswith("ray::IDLE") or p.pid not in self.names:
                        self.names[p.pid] = name
                    elif name.startswith("ray::") and not self.names[p.pid].startswith("ray::"):
                        self.names[p.pid] = name
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
            if timeline and (p.pid == self.me.pid or self.names.get(p.pid, "").startswith("ray::")):
                self.timeline.setdefault(p.pid, []).append({"t": round(now), **rss_breakdown(p.pid)})
            self.peak_private[p.pid] = max(self.peak_private.get(p.pid, 0), private)
            self.cpu[p.pid] = cpu

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            # this thread's own CPU (reading /proc of every process 4 times a second, and smaps every
            # 10 s) is the measurement's, not the job's: 40-50% of the driver's CPU (docs/benchmarks.md, third pass)
            self.sampler_cpu_s = time.thread_time()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._sample()
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        mb = 1 / 2**20
        cpu = {pid: c - self._cpu0.get(pid, 0.0) for pid, c in self.cpu.items()}
        workers = [{"pid": pid, "name": self.names.get(pid, ""), "peak_rss_mb": round(rss * mb, 1),
                    "peak_private_mb": round(self.peak_private.get(pid, 0) * mb, 1), "cpu_s": round(cpu.get(pid, 0.0), 2),
                    "timeline": self.timeline.get(pid, [])}
                   for pid, rss in self.peak.items() if pid != self.me.pid and self.names.get(pid, "").startswith("ray::")]
        workers.sort(key=lambda w: -w["peak_rss_mb"])
        others = [{"pid": pid, "name": self.names.get(pid, ""), "peak_rss_mb": round(rss * mb, 1),
                   "cpu_s": round(cpu.get(pid, 0.0), 2)}
                  for pid, rss in self.peak.items() if pid != self.me.pid and not self.names.get(pid, "").startswith("ray::")]
        total = sum(cpu.values())
        return {"job_cpu_s": round(total - self.sampler_cpu_s, 2), "sampler_cpu_s": round(self.sampler_cpu_s, 2),
                "job_cpu_s_with_sampler": round(total, 2),  # what job_cpu_s meant before 2026-12-01 07:00 UTC
                "driver_cpu_s": round(cpu.get(self.me.pid, 0.0) - self.sampler_cpu_s, 2),
                "driver_peak_rss_mb": round(self.peak.get(self.me.pid, 0) * mb, 1),
                "driver_peak_private_mb": round(self.peak_private.get(self.me.pid, 0) * mb, 1),
                "driver_timeline": self.timeline.get(self.me.pid, []),
                "worker_peak_rss_mb_max": max((w["peak_rss_mb"] for w in workers), default=None),
                "workers": workers, "other_processes": others,
                "tree_processes_seen": len(self.peak)}


def start_ray(config) -> None:
    """Start the embedded Ray as jobs/curate.py does (jobs/_ray.py); where that module does not
    exist yet, run_curation starts it itself."""
    try:
        from jobs._ray import start_ray as start
    except ImportError:
        return
    start(config)


def run_job(paths: list[Path], config, workdir: Path) -> dict:
    import ray

    from pipeline.runner import run_curation

    items = expand_inputs([str(p) for p in paths])
    out = workdir / "out"
    load0 = os.getloadavg()
    with TreeSampler() as sampler:
        t = time.perf_counter()
        start_ray(config)  # timed, as the job's own start-up
        summary = run_curation(items, out, config, progress_every_s=60)
        job_s = time.perf_counter() - t
    ray.shutdown()  # the next job (--long-minutes) starts its own Ray, as a new run would
    run = json.loads((out / "run.json").read_text())
    return {"inputs": len(items), "job_s": job_s, "clips_kept": summary["clips_kept"],
            "stage_seconds": run["timings"]["stage_cpu_s"], "load_avg_start": load0, "load_avg_end": os.getloadavg(),
            **sampler.report(), "scores_parquet": str(out / "scores.parquet")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(REAL_DIR))
    ap.add_argument("--scale", type=int, default=1, choices=(1, 2, 4), help="1x, 2x or 4x the input")
    ap.add_argument("--min-video-s", type=float, default=300.0, help="repeat the input to at least this much video")
    ap.add_argument("--features", action="store_true", help="include the feature stage (smoke models)")
    ap.add_argument("--config", help="YAML of config overrides (pipeline/config.py)")
    ap.add_argument("--pyav-baseline", action="store_true", help="also time a PyAV decode of every frame")
    ap.add_argument("--long-minutes", type=float, help="one looped input of this length vs the clip alone")
    ap.add_argument("--long-source", default=str(REAL_DIR / "edtalk_obama.mp4"))
    ap.add_argument("--short-minutes", type=float, help="with --long-minutes: loop the clip to this length for the "
                    "short job too (0.5: a 30-second input, whose clips reach segment.max_clip_s as the long one's do)")
    ap.add_argument("--long-only", choices=("short", "long"), help="with --long-minutes: run only this job (one "
                    "job per process, so the driver's peak is its own)")
    ap.add_argument("--keep-scores", help="copy the job's scores.parquet here (to compare runs)")
    ap.add_argument("--out", default="benchmarks/results/curate-cpu.json")
    args = ap.parse_args()
    config = load_config(args.config, **{"features.enabled": args.features})
    threads = config.ray.num_cpus or os.cpu_count()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        work = Path(tmp)
        if args.long_minutes:
            result = {"mode": "long input", "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            for label, minutes in (("short", args.short_minutes), ("long", args.long_minutes)):
                if args.long_only and label != args.long_only:
                    continue
                d = work / label
                d.mkdir()
                if minutes is None:
                    (d / "clip.mp4").symlink_to(Path(args.long_source).resolve())
                else:
                    looped_video(args.long_source, minutes, d / "looped.mp4")
                paths = sorted(d.iterdir())
                job = run_job(paths, config, d)
                job["video_seconds"] = sum(video_seconds(str(p)) for p in paths)
                result[label] = {k: v for k, v in job.items() if k != "scores_parquet"}
                print(json.dumps({label: result[label]}), flush=True)
        else:
            src = Path(args.input)
            links_dir = work / "in"
            links_dir.mkdir()
            paths, video_s = repeated_inputs(src, args.min_video_s, args.scale, links_dir)
            floor_before = ffmpeg_floor(paths, threads)
            print(json.dumps({"floor_before": floor_before}), flush=True)
            job = run_job(paths, config, work)
            floor_after = ffmpeg_floor(paths, threads)
            print(json.dumps({"floor_after": floor_after}), flush=True)
            floor = {**floor_before, "floor_s": (floor_before["floor_s"] + floor_after["floor_s"]) / 2,
                     "floor_cpu_s": (floor_before["floor_cpu_s"] + floor_after["floor_cpu_s"]) / 2,
                     "floor_s_before_job": floor_before["floor_s"], "floor_s_after_job": floor_after["floor_s"]}
            if args.keep_scores:
                import shutil

                shutil.copy(job["scores_parquet"], args.keep_scores)
            job.pop("scores_parquet")
            result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "input": str(src),
                      "scale": args.scale, "video_seconds": video_s, "features": args.features,
                      "config": args.config, **floor, **job,
                      "job_video_seconds_per_s": video_s / job["job_s"],
                      "job_cpu_per_video_s": job["job_cpu_s"] / video_s, "machine": machine}
            if args.pyav_baseline:
                result["pyav_decode_s"] = pyav_decode(paths)
            result["ratio"] = floor["floor_s"] / job["job_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
