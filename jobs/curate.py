#!/usr/bin/env python
"""Curate raw talking-head video into 512x512 25 fps WebDataset shards.

    python jobs/curate.py --input PATH... --output DIR [--profile smoke|full] [--config FILE]
    python jobs/curate.py --demo --output DIR          # built-in synthetic sample, no data needed
    python jobs/curate.py --input PATH... --output DIR --dry-run   # count inputs, check weights/storage/lock
    python jobs/curate.py --input PATH... --output DIR --limit 20  # a trial run on the first 20 inputs
    ray job submit --working-dir . -- python jobs/curate.py --input s3://bucket/raw --output s3://bucket/curated

With no Ray cluster (no RAY_ADDRESS, no --ray-address) an embedded Ray starts on this machine.
Object storage (inputs, --output): credentials and endpoint from the standard AWS_* environment.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.inputs import InputError, expand_inputs  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=[], help="directories, globs, .txt URI lists or .parquet with a uri column")
    ap.add_argument("--output", required=True, help="output directory or object-store URL (s3://bucket/prefix): "
                    "shards/, index.json, *.parquet, run.json")
    ap.add_argument("--profile", choices=["smoke", "full"], default=None, help="model profile (default: config or smoke)")
    ap.add_argument("--config", default=None, help="YAML file overriding any config field")
    ap.add_argument("--model-dir", default=None, help="weights directory of the full profile")
    ap.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    ap.add_argument("--demo", action="store_true", help="generate the built-in synthetic sample and curate it")
    ap.add_argument("--force-resume", action="store_true", help="resume into an output made with another config")
    ap.add_argument("--no-retry-failed", action="store_true",
                    help="do not reprocess inputs whose earlier outcome was a crash or an internal error")
    ap.add_argument("--limit", type=int, default=None, metavar="N",
                    help="curate only the first N inputs (in the order they are listed): a trial run")
    ap.add_argument("--verbose", action="store_true",
                    help="also show the Ray workers' output and Ray's INFO lines (silenced by default)")
    ap.add_argument("--dry-run", action="store_true",
                    help="expand and count the inputs, check weights, storage access, the output and its lock; "
                         "start nothing, write nothing")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, profile=args.profile, model_dir=args.model_dir,
                             **{"ray.address": args.ray_address})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inputs = list(args.input)
    if args.demo and args.dry_run:
        print("error: --demo writes its sample into the output; --dry-run writes nothing: use one", file=sys.stderr)
        return 2
    if args.demo and "://" in args.output and not args.output.startswith("file://"):
        print(f"error: --demo writes its sample inputs into a local --output; with --output {args.output} "
              "give --input (upload the inputs to object storage too)", file=sys.stderr)
        return 2
    if args.demo:
        from pipeline.demo import make_talking_head

        sample_dir = Path(args.output) / "_demo_input"
        for i, (vfr, dur) in enumerate([(False, 6.0), (True, 5.0)]):
            p = sample_dir / f"synthetic_talking_head_{i}.mp4"
            if not p.exists():
                make_talking_head(p, duration_s=dur, vfr=vfr, seed=i, markers_s=(1.0, 3.0))
        inputs.append(str(sample_dir))
    if not inputs:
        print("error: give --input PATH... (or --demo)", file=sys.stderr)
        return 2
    try:
        input_stats: dict = {}
        items = expand_inputs(inputs, input_stats)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        if args.limit < 1:
            print(f"error: --limit {args.limit}: give a positive number of inputs", file=sys.stderr)
            return 2
        print(f"[curate] --limit {args.limit}: the first {min(args.limit, len(items))} of {len(items)} inputs",
              file=sys.stderr)
        items = items[:args.limit]
    if config.profile == "full" and not config.model_dir:
        print("error: the full profile needs --model-dir (see jobs/fetch_models.py)", file=sys.stderr)
        return 2
    if args.dry_run:
        from pipeline.dryrun import dry_run

        report = dry_run(items, args.output, config, force_resume=args.force_resume,
                         retry_failed=not args.no_retry_failed)
        print("\n".join(report.lines()))
        return 0 if report.ok else 2
    from jobs._ray import start_ray
    from pipeline.journal import ConfigMismatch, OutputLocked
    from pipeline.runner import OutputFullError, refuse_if_locked, run_curation

    try:
        refuse_if_locked(args.output, config)  # a second run is refused before Ray starts
    except (OutputLocked, ValueError, OSError) as e:  # held; or an output URL or store that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    start_ray(config, verbose=args.verbose)
    try:
        run_curation(items, args.output, config, force_resume=args.force_resume, argv=sys.argv,
                     retry_failed=not args.no_retry_failed, input_stats=input_stats)
    except (FileNotFoundError, ConfigMismatch, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputFullError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    where = args.output if "://" in args.output else os.path.abspath(args.output)  # an object-store URL as given
    print(f"output: {where}  (index.json, shards/, manifest.parquet, rejects.parquet, run.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
