#!/usr/bin/env python
"""Re-apply filter thresholds to an existing curation output, from scores.parquet alone.

    python jobs/refilter.py DIR --config FILE

Only the `filters:` and `storage_options:` sections of FILE are used (DIR may be an object-store
URL such as s3://bucket/out, credentials from the environment or storage_options). No video is decoded and no model runs; the
manifest, rejects, videos and scores tables and the index selection are rewritten, and the
clips entering or leaving the kept set are reported. Clips that would now pass but were
rejected before their features were computed are listed in DIR/needs_rerun.parquet.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="a curation output directory")
    ap.add_argument("--config", required=True, help="YAML with the new filters: section")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.finalize import refilter

    try:
        report = refilter(args.dir, config.filters, config.storage_options)  # an s3:// output: its storage_options
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"refilter {args.dir}: {report['kept']} clips kept; {len(report['entered'])} entered, "
          f"{len(report['left'])} left; {len(report['needs_rerun'])} would pass but need a rerun "
          f"(see needs_rerun.parquet)")
    for k in report["entered"]:
        print(f"  + {k}")
    for k in report["left"]:
        print(f"  - {k}")
    for k in report["needs_rerun"]:
        print(f"  ? {k} (needs rerun)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
