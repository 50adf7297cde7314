#!/usr/bin/env python
"""Dataset statistics report of a curation output.

    python jobs/stats.py DIR [--compare DIR2] [--out REPORT_DIR]

Writes REPORT_DIR (default DIR/report): index.html (one self-contained page: funnel, rejections,
score distributions with thresholds, per-source table, contact sheet, run facts), stats.json
(the same numbers; schema schemas/stats.schema.json) and report.md (a short summary).
With --compare, DIR2 is the baseline: funnel deltas, clips that entered/left the kept set, and
overlaid score histograms.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from pipeline.report import ReportError, build_report  # noqa: E402
from pipeline.report.fmt import hours  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="curation output (index.json, shards/, *.parquet, run.json)")
    ap.add_argument("--compare", default=None, metavar="DIR2", help="a second output to compare against (baseline)")
    ap.add_argument("--out", default=None, metavar="REPORT_DIR", help="where to write the report (default DIR/report)")
    ap.add_argument("--thumbs", type=int, default=6, help="kept clips on the contact sheet")
    args = ap.parse_args(argv)
    try:
        stats = build_report(args.dir, args.out, args.compare, kept_thumbs=args.thumbs)
    except (ReportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    k, lv = stats["kept"], stats["funnel"]["levels"][0]
    print(f"[stats] {lv['inputs']:,} inputs ({hours(lv['input_hours'])} h) -> {k['clips']:,} clips kept "
          f"({hours(k['hours'])} h) in {stats['report_seconds']['total']:.1f} s", file=sys.stderr)
    for c in stats["checks"]:
        if not c["ok"]:
            print(f"[stats] check failed: {c['check']} ({c['detail']})", file=sys.stderr)
    print(f"report: {Path(stats['report_dir']) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
