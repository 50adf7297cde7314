#!/usr/bin/env python
"""Cluster the kept clips of a curated output into identities (docs/identity.md).

    python jobs/identities.py DIR [--threshold 0.45] [--method auto|exact|hnsw]

Reads the kept clips (manifest.parquet) and their ArcFace embeddings (scores.parquet
identity_embedding), links clips whose cosine similarity is at least the threshold (faiss: exact
below --exact-max clips, HNSW above), takes the connected components as identities and writes
DIR/identities.parquet atomically: key, identity_id, cluster_size, identity_model, with the
threshold and the run's facts in the file metadata. Re-run it after refilter or dedup changes
the kept set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.identity import (DEFAULT_THRESHOLD, EXACT_MAX_CLIPS, HNSW_NEIGHBOURS, METHODS,  # noqa: E402
                               IdentityError, build_identities)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="a curation output directory")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help=f"cosine similarity that links two clips (default {DEFAULT_THRESHOLD}: insightface's "
                         "same-person threshold, docs/identity.md)")
    ap.add_argument("--method", choices=METHODS, default="auto",
                    help="exact (faiss IndexFlatIP range search), hnsw (faiss HNSW k nearest), auto: exact up to "
                         "--exact-max clips")
    ap.add_argument("--exact-max", type=int, default=EXACT_MAX_CLIPS)
    ap.add_argument("--k", type=int, default=HNSW_NEIGHBOURS, help="neighbours per clip on the hnsw path")
    args = ap.parse_args(argv)
    if not Path(args.dir).is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    try:
        facts = build_identities(args.dir, threshold=args.threshold, method=args.method, k=args.k,
                                 exact_max=args.exact_max)
    except (IdentityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"identities {args.dir}: {facts['n_clips']} kept clips -> {facts['n_identities']} identities "
          f"(largest {facts['largest']} clips; {facts['n_without_embedding']} clips without an embedding are their "
          f"own identity) at cosine >= {facts['threshold']} ({facts['method']}, model {facts['identity_model']}); "
          f"wrote {Path(args.dir) / 'identities.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
