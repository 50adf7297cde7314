#!/usr/bin/env python
"""Find near-duplicate clips across a curation output and keep the best of each group.

    python jobs/dedup.py DIR|URL [--config FILE] [--ray-address ADDR]

Reads the stored signatures in DIR/scores.parquet (perceptual hashes, audio fingerprint, identity
embedding when present) on Ray Data, writes DIR/duplicates.parquet (every member of every group,
ranked, with the evidence), then re-applies the output's filters with ``filters.dedup: true``:
the other members leave the manifest with a rejects row "duplicate of <key>". Undo with
``jobs/refilter.py DIR --config FILE`` where FILE sets ``filters: {dedup: false}``.
Only the `dedup:` and `storage_options:` sections of FILE are used here (thresholds: docs/dedup.md).
An object-store output (s3://bucket/prefix) works the same, with credentials from the AWS_* environment.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="a curation output (directory or s3:// URL)")
    ap.add_argument("--config", default=None, help="YAML with a dedup: section (default thresholds otherwise)")
    ap.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, **{"ray.address": args.ray_address})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jobs._ray import start_ray
    from pipeline.dedup import dedup_output
    from pipeline.journal import OutputLocked

    try:
        if "://" not in args.dir and not (Path(args.dir) / "index.json").exists():  # before starting Ray for nothing
            raise FileNotFoundError(f"{args.dir}/index.json is missing: not a finished curation output")
        start_ray(config)
        report = dedup_output(args.dir, config)
    except (FileNotFoundError, ValueError, OutputLocked) as e:  # OutputLocked: a curation or refilter writes it now
        print(f"error: {e}", file=sys.stderr)
        return 2
    found, applied = report["found"], report["refilter"]
    print(f"dedup {args.dir}: {found['clips']} clips, {found['candidate_pairs']} candidate pairs verified, "
          f"{found['groups']} duplicate groups, {found['duplicates']} duplicates; "
          f"{applied['kept']} clips kept, {len(applied['left'])} left")
    for k in applied["left"]:
        print(f"  - {k}")
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
