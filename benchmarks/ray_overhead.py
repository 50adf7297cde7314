"""CPU seconds of an embedded Ray's own processes (issue 13): Ray started, one Ray Data map of 8
rows, then idle, by process name (psutil over this process's tree).

    python benchmarks/ray_overhead.py plain|ours [--idle-s 30]

``plain``: ``ray.init`` as jobs/_ray.py called it before (no dashboard UI, no log-to-driver);
``ours``: ``jobs._ray.start_ray`` (also no metrics collection, no usage stats, idle workers kept).
Run the two back to back: CPU seconds grow with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("plain", "ours"))
    ap.add_argument("--idle-s", type=int, default=30)
    args = ap.parse_args()
    import ray
    import ray.data

    import psutil  # Ray's own copy (ray/thirdparty_files) once ray is imported

    me = psutil.Process()
    t0 = me.cpu_times()
    start = time.perf_counter()
    if args.mode == "plain":
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    else:
        from jobs._ray import start_ray
        from pipeline.config import load_config

        start_ray(load_config(None, **{"features.enabled": False, "ray.num_cpus": 2}))
    ray.data.range(8, override_num_blocks=8).map(lambda r: r).take_all()
    seen: dict[int, tuple[str, float]] = {}
    for _ in range(args.idle_s + 1):
        for p in [me] + me.children(recursive=True):
            try:
                cmd = p.cmdline()
                t = p.cpu_times()
            except psutil.Error:
                continue
            name = "driver" if p.pid == me.pid else (cmd[0] if cmd and cmd[0].startswith("ray::")
                                                     else Path(cmd[0] if cmd else p.name()).name)
            seen[p.pid] = (name, t.user + t.system - (t0.user + t0.system if p.pid == me.pid else 0.0))
        time.sleep(1)
    by_name: dict[str, float] = {}
    for name, cpu in seen.values():
        by_name[name] = round(by_name.get(name, 0.0) + cpu, 2)
    ray.shutdown()
    print(json.dumps({"mode": args.mode, "cpu_s": round(sum(by_name.values()), 2),
                      "wall_s": round(time.perf_counter() - start, 1),
                      "by_process": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}))


if __name__ == "__main__":
    main()
