"""Time the dataset statistics report on a synthetic million-clip output.

    python benchmarks/stats_report.py                          # 1,000,000 candidate clips
    python benchmarks/stats_report.py --clips 200000 --dir /tmp/x --keep
    python benchmarks/stats_report.py --screenshot docs/report-screenshot.png

Generates an output with ``--clips`` rows in scores.parquet (and the matching manifest, rejects
and videos tables, run.json with filter_rules, index.json, one small real shard) using
pipeline.report.synthetic, then times ``jobs/stats.py DIR`` end to end in a fresh process
(interpreter start and imports included: what a user waits for) and the same with ``--compare``
against a copy whose manifest lost 1 % of its rows. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.report.synthetic import make_output  # noqa: E402


def run_stats(args: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "jobs" / "stats.py"), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    out = Path(args[args.index("--out") + 1])
    return wall, json.loads((out / "stats.json").read_text())


def drop_manifest_rows(src: Path, dst: Path, every: int = 100) -> None:
    """A copy of ``src`` whose manifest lost every ``every``-th row (the compare case)."""
    import numpy as np
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    m = pq.read_table(dst / "manifest.parquet")
    pq.write_table(m.filter(np.arange(m.num_rows) % every != 0), dst / "manifest.parquet")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1_000_000, help="candidate clips (rows of scores.parquet)")
    ap.add_argument("--dir", default=None, help="where to build the output (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated output")
    ap.add_argument("--screenshot", default=None, help="save a PNG of the top of the report here (needs chromium)")
    args = ap.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="stats-bench-"))
    out, other = base / "output", base / "output_minus_1pct"
    for p in (out, other):
        shutil.rmtree(p, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        counts = make_output(out, n_clips=args.clips)
        gen_s = time.perf_counter() - t0
        wall, stats = run_stats([str(out), "--out", str(base / "report")])
        drop_manifest_rows(out, other)
        wall_cmp, stats_cmp = run_stats([str(other), "--compare", str(out), "--out", str(base / "report_compare")])
        result = {
            "machine": f"{os.cpu_count()}-core CPU, {platform.processor() or platform.machine()}, "
                       f"Python {platform.python_version()}",
            "rows": {"scores": counts["clips"], "manifest": counts["kept"], "rejects": counts["rejects"],
                     "videos": counts["videos"]},
            "generate_s": round(gen_s, 2),
            "report_wall_s": round(wall, 2),
            "report_phases_s": {k: round(v, 2) for k, v in stats["report_seconds"].items()},
            "compare_wall_s": round(wall_cmp, 2),
            "compare_phases_s": {k: round(v, 2) for k, v in stats_cmp["report_seconds"].items()},
            "compare_left": stats_cmp["compare"]["kept"]["left"],
            "html_bytes": (base / "report" / "index.html").stat().st_size,
        }
        if args.screenshot:
            result["screenshot"] = save_screenshot(base / "report" / "index.html", Path(args.screenshot))
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def save_screenshot(page: Path, dest: Path, top_px: int = 2200, scale: float = 0.6) -> dict:
    """The top of the page (header, funnel, rejections, first score plots), shrunk and palettised
    so the README image stays small."""
    from PIL import Image

    from pipeline.report.browser import check_pages

    res = check_pages([page], full_page=True)[0]
    if res.errors or res.broken_images:
        raise RuntimeError(f"report page has errors: {res.errors}, broken images {res.broken_images}")
    import io

    img = Image.open(io.BytesIO(res.png)).convert("RGB")
    img = img.crop((0, 0, img.width, min(img.height, top_px)))
    img = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
    img = img.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.save(dest, optimize=True)
    return {"path": str(dest), "bytes": dest.stat().st_size, "size": list(img.size)}


if __name__ == "__main__":
    sys.exit(main())
