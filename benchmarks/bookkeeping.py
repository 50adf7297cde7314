"""Scale of the curation driver's bookkeeping at 100,000 inputs (issue 12), without video.

    python benchmarks/bookkeeping.py [--inputs 100000] [--part resume|drive|ray|all] [--work DIR]
                                     [--ray-inputs 2000] [--out benchmarks/results/bookkeeping-cpu.json]

resume: journals N finished inputs through the Journal API (tests/journal_rows.py: realistic
videos rows, rejects, scores with identity embedding and audio fingerprint, ~1 kept clip per
input, shard entries with manifest rows), then, each in a fresh process: (1) a resume with one
new input, timed from the call to run_curation until the driver asks for its first row (config
check, orphan cleanup, journal reads, todo computation): "resume start"; (2) a resume with
nothing left to do (resume start + final tables + index.json): its time minus (1) is the final
tables' time. Peak RSS of each process is recorded.

drive: runs the real driver (run_curation) over N tiny inputs with the Ray Data pipeline
replaced by the rows its stages would emit (``row_source``: summary, clip with a 2 KB mp4 and
its meta.json, rejects with scores rows), so shards, journal and tables are really written; the
driver's RSS and the time per 10,000 inputs are sampled as the rows are consumed. What this does
not cover: Ray Data's own driver-side memory (blocks, task state), which ``ray`` measures.

ray (not in ``all``: minutes per thousand inputs): the real job (jobs/curate.py, embedded Ray,
features off) over ``--ray-inputs`` zero-byte files (each a one-block input that becomes an
"unreadable file" reject), the driver process's RSS polled from /proc/PID/status; sampled at
every tenth of the inputs (from the job's ``[curate] inputs k/N`` progress lines), plus its
value at Ray start (first progress line) and its peak.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SAMPLES_PER_SHARD = 100  # ~ a 512 MB shard of 5 MB samples (features on)
SAMPLE_BYTES = 8500  # one synthetic sample in a tar: 2 KB mp4 + meta.json + headers


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_config():
    from pipeline.config import load_config

    return load_config(None, **{"features.enabled": False,
                                "write.shard_max_bytes": SAMPLES_PER_SHARD * SAMPLE_BYTES})


def build(work: Path, n: int) -> dict:
    from journal_rows import build_journal, synthetic_items
    from pipeline.journal import Journal, config_fingerprint

    out = work / "resume_out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = bench_config().model_dump(mode="json")
    journal = Journal(out)
    journal.check_config(config_fingerprint(cfg), cfg)
    t = time.perf_counter()
    counts = build_journal(journal, synthetic_items(n), clips_per_shard=SAMPLES_PER_SHARD)
    counts["build_s"] = time.perf_counter() - t
    files = [p for p in (out / "_journal").rglob("*") if p.is_file()]
    counts["journal_files"] = len(files)
    counts["journal_bytes"] = sum(p.stat().st_size for p in files)
    return counts


class _FirstRow(Exception):
    pass


def measure_resume(work: Path, n: int, mode: str) -> dict:
    """One measurement in this (fresh) process."""
    from journal_rows import synthetic_items
    from pipeline.runner import run_curation

    items = synthetic_items(n)
    config = bench_config()
    out = work / "resume_out"
    rss0 = rss_mb()
    if mode == "start":
        extra = synthetic_items(1, root="/data/new")
        t, c = time.perf_counter(), time.process_time()
        asked = {}

        def first_row(todo):
            asked["s"] = time.perf_counter() - t
            asked["cpu_s"] = time.process_time() - c
            asked["todo"] = len(todo)
            raise _FirstRow
            yield  # a generator: raises when the driver asks for its first row

        try:
            run_curation(items + extra, out, config, progress_every_s=3600, row_source=first_row)
        except _FirstRow:
            pass
        return {"resume_start_s": asked["s"], "resume_start_cpu_s": asked["cpu_s"], "todo": asked["todo"],
                "rss_before_mb": rss0,
                "peak_rss_mb": peak_rss_mb()}
    t, c = time.perf_counter(), time.process_time()
    summary = run_curation(items, out, config, progress_every_s=3600)
    return {"nothing_to_do_s": time.perf_counter() - t, "nothing_to_do_cpu_s": time.process_time() - c,
            "summary": summary, "rss_before_mb": rss0,
            "peak_rss_mb": peak_rss_mb()}


def drive(work: Path, n: int, every: int) -> dict:
    """The real driver over ``n`` tiny inputs, its rows from tests/journal_rows.outcome_rows."""
    from journal_rows import outcome_rows, synthetic_items
    from pipeline.runner import run_curation

    out = work / "drive_out"
    shutil.rmtree(out, ignore_errors=True)
    items = synthetic_items(n)
    samples = []
    t0 = time.perf_counter()
    marks = {}

    def sample(i, last):
        now, cpu = time.perf_counter(), time.process_time()
        samples.append({"inputs": i, "rss_mb": round(rss_mb(), 1), "s_per_10k": (now - last[0]) * 10_000 / every,
                        "cpu_s_per_10k": (cpu - last[1]) * 10_000 / every})
        return now, cpu

    def rows(todo):
        last = time.perf_counter(), time.process_time()
        for i, item in enumerate(todo):
            if i and i % every == 0:
                last = sample(i, last)
            yield from outcome_rows(i, item)
        sample(len(todo), last)
        marks["rows_done"] = time.perf_counter(), time.process_time()

    rss0 = rss_mb()
    summary = run_curation(items, out, bench_config(), progress_every_s=3600, row_source=rows)
    end, end_cpu = time.perf_counter(), time.process_time()
    return {"rss_before_mb": round(rss0, 1), "samples": samples, "rss_after_mb": round(rss_mb(), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rows_s": marks["rows_done"][0] - t0,
            "final_tables_s": end - marks["rows_done"][0], "final_tables_cpu_s": end_cpu - marks["rows_done"][1],
            "summary": summary}


def _proc_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def ray_run(work: Path, n: int, inputs_per_dataset: int | None = None) -> dict:
    """The real job over ``n`` zero-byte files; the driver's RSS at every tenth of the inputs."""
    import re
    import threading

    src, out = work / "ray_inputs", work / "ray_out"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    src.mkdir(parents=True)
    for i in range(n):
        (src / f"empty_{i:06d}.mp4").touch()
    cfg = work / "ray_config.yaml"
    lines = ["features:", "  enabled: false"]
    if inputs_per_dataset:
        lines += ["ray:", f"  inputs_per_dataset: {inputs_per_dataset}"]
    cfg.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, str(ROOT / "jobs" / "curate.py"), "--input", str(src), "--output", str(out),
           "--config", str(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    rss = {"now": 0.0, "peak": 0.0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            v = _proc_rss_mb(proc.pid)
            if v is not None:
                rss["now"], rss["peak"] = v, max(rss["peak"], v)
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    progress, tail = [], []
    step = max(1, n // 10)
    next_mark = step
    samples = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        m = re.search(r"\[curate\] inputs (\d+)/(\d+)", line)
        if not m:
            continue
        k = int(m.group(1))
        progress.append({"inputs": k, "s": round(time.perf_counter() - t0, 1), "rss_mb": round(rss["now"], 1)})
        if k >= next_mark:  # the first progress line at or past each tenth of the inputs
            samples.append(progress[-1])
            while next_mark <= k:
                next_mark += step
    rc = proc.wait()
    done.set()
    poller.join()
    if rc != 0:
        raise RuntimeError(f"curate exited {rc}: {''.join(tail)}")
    run = json.loads((out / "run.json").read_text())
    from machine import loadavg

    return {"inputs": n, "inputs_per_dataset": inputs_per_dataset, "wall_s": round(time.perf_counter() - t0, 1),
            "loadavg_end": loadavg(),
            "rss_at_first_progress_mb": progress[0]["rss_mb"] if progress else None,
            "samples": samples, "peak_rss_mb": round(rss["peak"], 1),
            "kb_per_input_first_to_last_sample": (round((samples[-1]["rss_mb"] - samples[0]["rss_mb"]) * 1024
                                                        / max(1, samples[-1]["inputs"] - samples[0]["inputs"]), 1)
                                                  if len(samples) > 1 else None),
            "run_summary": {k: run["summary"].get(k) for k in ("inputs", "inputs_rejected", "inputs_rejected_by_reason")}}


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{args}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--part", choices=["resume", "drive", "ray", "all"], default="all")
    ap.add_argument("--ray-inputs", type=int, default=2000, help="ray: zero-byte files through the real job")
    ap.add_argument("--inputs-per-dataset", type=int, default=None,
                    help="ray: override ray.inputs_per_dataset (default: the config's)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--keep-journal", action="store_true", help="reuse WORK/resume_out when it exists")
    ap.add_argument("--every", type=int, default=10_000, help="drive: sample RSS every this many inputs")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/bookkeeping-cpu.json (ray: bookkeeping-ray-cpu.json)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, work, n = args.child[0], Path(args.child[1]), int(args.child[2])
        if what == "drive":
            res = drive(work, n, int(args.child[3]))
        else:
            res = measure_resume(work, n, what)
        print(json.dumps(res))
        return

    from machine import machine

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bookkeeping-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"inputs": args.inputs, "samples_per_shard": SAMPLES_PER_SHARD, "machine": machine()}
    try:
        if args.part in ("resume", "all"):
            if args.keep_journal and (work / "resume_out" / "_journal").is_dir():
                result["journal"] = {"reused": str(work / "resume_out")}
            else:
                result["journal"] = build(work, args.inputs)
            print(f"journal: {result['journal']}", file=sys.stderr)
            start = _child(["start", str(work), str(args.inputs)])
            print(f"resume start: {start}", file=sys.stderr)
            full = _child(["nothing", str(work), str(args.inputs)])
            full["final_tables_s"] = full["nothing_to_do_s"] - start["resume_start_s"]
            full["final_tables_cpu_s"] = full["nothing_to_do_cpu_s"] - start["resume_start_cpu_s"]
            print(f"nothing to do: {full}", file=sys.stderr)
            result["resume"] = {"start": start, "nothing_to_do": full}
        if args.part in ("drive", "all"):
            result["drive"] = _child(["drive", str(work), str(args.inputs), str(args.every)])
            print(f"drive: {result['drive']}", file=sys.stderr)
        if args.part == "ray":
            result["ray"] = ray_run(work, args.ray_inputs, args.inputs_per_dataset)
            print(f"ray: {result['ray']}", file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    args.out = args.out or f"benchmarks/results/bookkeeping{'-ray' if args.part == 'ray' else ''}-cpu.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
