#!/usr/bin/env python
"""Two curation outputs of the same inputs side by side, one row per input file: the outcome,
head pose, completeness, padding and SyncNet box of each, old against new.

    python benchmarks/definitions_before_after.py --old OUT_OLD --new OUT_NEW [--out table.md]

Made for definition changes (docs/scoring.md, "Before and after"): curate the same inputs with
the old commit (a `git worktree` of it) and with this one, then compare. Columns a run does not
have (a score added by the change) print as "-".
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import json
import tarfile

import pyarrow.parquet as pq

# (header, scores column, format); the pose rules act on the robust column where a run has it.
COLUMNS = [
    ("yaw max", "yaw_abs_max", "{:.1f}"), ("yaw p95", "yaw_abs_p95", "{:.1f}"),
    ("pitch max", "pitch_abs_max", "{:.1f}"), ("pitch p95", "pitch_abs_p95", "{:.1f}"),
    ("roll max", "roll_abs_max", "{:.1f}"), ("roll p95", "roll_abs_p95", "{:.1f}"),
    ("complete", "complete_frac", "{:.2f}"), ("padding", "pad_frac", "{:.2f}"),
    ("sync box", "sync_box_source", "{}"),
]
# A run from before the SyncNet box was recorded used the face model of the crop stage: BlazeFace.
SYNC_BOX_BEFORE_RECORDED = "blazeface (not recorded)"


def _sync_boxes(out: Path) -> dict[str, str]:
    """Sample key -> the detector whose boxes cut its SyncNet crops (kept clips' meta.json)."""
    boxes = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".meta.json"):
                    meta = json.load(tar.extractfile(member))
                    boxes[meta["key"]] = meta.get("score_details", {}).get("sync_box_source",
                                                                            SYNC_BOX_BEFORE_RECORDED)
    return boxes


def _rows_by_input(out: Path) -> dict[str, list[dict]]:
    """Input file name -> its scored clips (kept or rejected) and video-level rejects."""
    by: dict[str, list[dict]] = defaultdict(list)
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    boxes = _sync_boxes(out)
    for r in scores:
        if r["key"] in boxes:
            r["sync_box_source"] = boxes[r["key"]]
        by[Path(r["uri"]).name].append(r)
    scored = {r["key"] for r in scores}
    for r in pq.read_table(out / "rejects.parquet").to_pylist():
        if r.get("key") not in scored:
            by[Path(r["uri"]).name].append({"status": "rejected", "reject_reason": r["reason"],
                                            "reject_stage": r["stage"], "clip_index": r["clip_index"]})
    return by


def _outcome(rows: list[dict]) -> str:
    kept = sum(r["status"] == "kept" for r in rows)
    reasons = sorted({r["reject_reason"] for r in rows if r["status"] != "kept" and r.get("reject_reason")})
    parts = [f"{kept} kept"] if kept else []
    return ", ".join(parts + reasons) or "-"


def _fmt(rows: list[dict], column: str, fmt: str) -> str:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if isinstance(values[0], (int, float)):
        return fmt.format(max(values)) if "max" in column or "p95" in column else fmt.format(min(values))
    return "/".join(sorted({str(v) for v in values}))


def table(old: Path, new: Path) -> str:
    a, b = _rows_by_input(old), _rows_by_input(new)
    header = ["input", "outcome old", "outcome new"] + [f"{h} old / new" for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(set(a) | set(b)):
        if not name.endswith((".mp4", ".mov", ".mkv", ".webm")):
            continue
        ra, rb = a.get(name, []), b.get(name, [])
        cells = [name, _outcome(ra), _outcome(rb)]
        for _, column, fmt in COLUMNS:
            cells.append(f"{_fmt(ra, column, fmt)} / {_fmt(rb, column, fmt)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="output directory of the old commit's run")
    ap.add_argument("--new", required=True, type=Path, help="output directory of this commit's run")
    ap.add_argument("--out", type=Path, help="write the markdown table here (default: print)")
    args = ap.parse_args(argv)
    text = table(args.old, args.new)
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
