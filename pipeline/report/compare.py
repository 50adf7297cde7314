"""Two runs side by side: funnel deltas, clips that entered/left the kept set, overlaid histograms.

"This" run is the one the report is about (DIR), "other" is the baseline (--compare DIR2):
a clip *entered* when it is kept here and not there, *left* when it was kept there and not here.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .load import RunData
from .stats import _floats, _hours, _mask, funnel, histogram, score_table, stage_rank

N_EXAMPLES = 20


def _delta(a, b):
    return None if a is None or b is None else a - b


def funnel_deltas(this: dict, other: dict) -> list[dict]:
    rows = []
    for a, b in zip(this["levels"], other["levels"]):
        rows.append({"level": a["level"], "label": a["label"],
                     **{f"{k}_{side}": lv[k] for k in ("inputs", "input_hours", "clips", "clip_hours")
                        for side, lv in (("this", a), ("other", b))},
                     **{f"{k}_delta": _delta(a[k], b[k]) for k in ("inputs", "input_hours", "clips", "clip_hours")}})
    return rows


def rejection_deltas(this: list[dict], other: list[dict]) -> list[dict]:
    def by_key(rows):
        return {(r["stage"], r["reason"], r["unit"]): r for r in rows}

    a, b = by_key(this), by_key(other)
    out = []
    for k in set(a) | set(b):
        ca, cb = a.get(k, {}).get("count", 0), b.get(k, {}).get("count", 0)
        out.append({"stage": k[0], "reason": k[1], "unit": k[2], "count_this": ca, "count_other": cb,
                    "count_delta": ca - cb})
    out.sort(key=lambda r: (stage_rank(r["stage"]), -abs(r["count_delta"]), r["reason"]))
    return out


def _why_not_kept(run: RunData, missing: pa.Table) -> list[dict]:
    """Group clips (key, video_id) that ``run`` did not keep by what ``run`` did with them."""
    if missing.num_rows == 0:
        return []
    r = run.rejects
    clip_rej = r.filter(_mask(pc.greater_equal(r["clip_index"], 0))).select(["key", "stage", "reason"])
    vids = run.videos.select(["video_id", "status", "stage", "reason"]).rename_columns(
        ["video_id", "v_status", "v_stage", "v_reason"])
    j = missing.select(["key", "video_id"]).join(clip_rej, keys="key", join_type="left outer")
    j = j.join(vids, keys="video_id", join_type="left outer")
    g = j.group_by(["stage", "reason", "v_status", "v_stage", "v_reason"], use_threads=False).aggregate(
        [([], "count_all")])
    counts: dict[tuple, int] = {}
    for row in g.to_pylist():
        if row["stage"] is not None:
            k = (row["stage"], row["reason"])  # a clip-level reject of this clip
        elif row["v_status"] is None:
            k = ("-", "not an input of this run")
        elif row["v_status"] == "kept" or row["v_stage"] == "clips":
            k = ("-", "input processed, but this clip has no outcome here (segmented differently?)")
        else:
            k = (row["v_stage"], f"input rejected: {row['v_reason']}")
        counts[k] = counts.get(k, 0) + int(row["count_all"])
    return [{"stage": s, "reason": rsn, "count": c}
            for (s, rsn), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def kept_changes(this: RunData, other: RunData) -> dict:
    a, b = this.manifest, other.manifest
    in_b = _mask(pc.is_in(a["key"], value_set=b["key"].combine_chunks()))
    in_a = _mask(pc.is_in(b["key"], value_set=a["key"].combine_chunks()))
    entered, left = a.filter(pa.array(~in_b)), b.filter(pa.array(~in_a))
    both = int(in_b.sum())
    return {
        "both": both, "both_hours": _hours(_floats(a["duration_s"])[in_b]),
        "entered": entered.num_rows, "entered_hours": _hours(_floats(entered["duration_s"])),
        "left": left.num_rows, "left_hours": _hours(_floats(left["duration_s"])),
        "entered_examples": sorted(entered["key"].to_pylist())[:N_EXAMPLES] if entered.num_rows < 100_000
        else entered["key"].slice(0, N_EXAMPLES).to_pylist(),
        "left_examples": sorted(left["key"].to_pylist())[:N_EXAMPLES] if left.num_rows < 100_000
        else left["key"].slice(0, N_EXAMPLES).to_pylist(),
        # why the clips that left were not kept in this run, and why those that entered were not kept there
        "left_reasons": _why_not_kept(this, left),
        "entered_reasons_in_other": _why_not_kept(other, entered),
    }


def overlaid_scores(this_scores: dict, other: RunData) -> dict:
    """The other run's kept histogram on this run's bins, for every column both runs have."""
    table, _ = score_table(other)
    out = {}
    if table is None:
        return out
    kept = _mask(pc.equal(table["status"], "kept"))
    for name, col in this_scores["columns"].items():
        if name not in table.column_names:
            continue
        x = _floats(table[name])
        xk = x[kept & np.isfinite(x)]
        h = histogram(xk, np.asarray(col["edges"]))
        out[name] = {"label": col["label"], "edges": col["edges"],
                     "this": {"n": col["kept"]["n"], "counts": col["kept"]["hist"]["counts"]},
                     "other": {"n": int(len(xk)), "counts": h["counts"]}}
    return out


def compare(this: RunData, this_stats: dict, other: RunData) -> dict:
    other_funnel = funnel(other)  # the only statistics of the other run the comparison needs
    return {"other_path": other.root,
            "funnel": funnel_deltas(this_stats["funnel"], other_funnel),
            "rejections": rejection_deltas(this_stats["funnel"]["rejections"], other_funnel["rejections"]),
            "kept": kept_changes(this, other),
            "scores": overlaid_scores(this_stats["scores"], other)}
