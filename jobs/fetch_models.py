"""Fetch the full-profile model weights once, by name, with checksums.

    python jobs/fetch_models.py --profile full --dir MODELS [--base-url URL] [--only sd-vae dwpose]
    python jobs/fetch_models.py --dir MODELS --register my_scrfd.onnx [more paths ...]

Each file is downloaded to a temporary name beside its destination, its sha256 is checked, and
only then is it renamed into place; files already present with the right checksum are skipped.
``--base-url`` fetches ``URL/<relative path>`` instead of the upstream URL (an internal mirror laid
out like the model directory). The registry lives in ``pipeline/models/registry.py``.

``--register PATH`` (relative to ``--dir``; a file or a directory) records the sha256 of weights you
placed there yourself in ``MODELS/models.lock.json``, so the loaders, which refuse any weights file
without a recorded hash, accept it. Files the registry pins (det_10g.onnx, ...) cannot be registered:
give your own weights another name and point the config at it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models.registry import (FULL_MODELS, PROFILE_MODELS, FetchError, UntrustedModelFile,  # noqa: E402
                                      fetch_models, register_local_files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILE_MODELS), default="full")
    p.add_argument("--dir", required=True, help="model directory (later passed to the pipeline as model_dir)")
    p.add_argument("--base-url", default=None, help="mirror root: files are fetched from BASE_URL/<path>")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"fetch only these models ({', '.join(FULL_MODELS)})")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    p.add_argument("--register", nargs="+", metavar="PATH",
                   help="record the sha256 of your own weights (paths relative to --dir) instead of fetching")
    return p


def main(argv=None, registry=None) -> int:
    """``registry`` replaces the built-in one (tests point it at a local server)."""
    args = build_parser().parse_args(argv)
    if args.register:
        try:
            for rel in args.register:
                register_local_files(args.dir, rel)
        except (UntrustedModelFile, FileNotFoundError, ValueError) as e:
            print(f"fetch_models: {e}", file=sys.stderr)
            return 1
        return 0
    names = args.only or (list(registry) if registry is not None else PROFILE_MODELS[args.profile])
    if not names:
        print(f"profile {args.profile!r} needs no downloaded weights")
        return 0
    try:
        fetch_models(args.dir, names, registry=registry, base_url=args.base_url, timeout=args.timeout)
    except (FetchError, KeyError) as e:
        print(f"fetch_models: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
