"""The numbers of the report, computed from the tables only (vectorised: 1M rows in seconds).

Everything here returns plain dicts/lists of JSON types; ``stats.json`` is their union and the
HTML page and report.md only format them, so the three never disagree.
"""
from __future__ import annotations

import json

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .load import RunData

# The funnel of the design's stage table. An input's level is the last one it reached; the
# rejects of a stage are the inputs/clips that fell between two levels.
LEVELS = ("inputs", "probed_ok", "face_tracks", "candidate_clips", "kept")
LEVEL_LABELS = {"inputs": "inputs", "probed_ok": "probed OK", "face_tracks": "face tracks",
                "candidate_clips": "candidate clips", "kept": "kept"}
# Known stage names in pipeline order, for sorting; stages added later sort after them by name.
STAGE_ORDER = ("probe", "detect", "segment", "crop", "score", "speech", "sync", "scoring", "filter", "refilter",
               "dedup", "features", "write")
# videos.parquet marks an input whose candidates were all rejected with this pseudo-stage.
ALL_CLIPS_REJECTED = "clips"

# scores.parquet columns that identify a clip rather than measure it.
ID_COLUMNS = frozenset({"key", "video_id", "clip_index", "uri", "source", "track_id", "start_s", "status",
                        "reject_stage", "reject_reason", "features_computed", "sync_weights"})
SCORE_LABELS = {
    "sync_conf": "Sync-C (SyncNet confidence)", "sync_dist": "Sync-D (SyncNet min distance)",
    "sync_offset": "AV offset (frames)", "sync_conf_frame_mean": "Sync-C per-frame mean",
    "sync_conf_frame_p10": "Sync-C per-frame p10", "audio_shift_s": "audio shift (s)",
    "speech_ratio": "speech ratio", "loudness_dbfs": "loudness (dBFS)", "mouth_activity": "mouth activity",
    "yaw_mean": "yaw mean (deg)", "pitch_mean": "pitch mean (deg)", "roll_mean": "roll mean (deg)",
    "yaw_abs_max": "|yaw| max (deg)", "pitch_abs_max": "|pitch| max (deg)", "roll_abs_max": "|roll| max (deg)",
    "yaw_abs_p95": "|yaw| p95 (deg)", "pitch_abs_p95": "|pitch| p95 (deg)", "roll_abs_p95": "|roll| p95 (deg)",
    "yaw_range": "yaw range (deg)", "pitch_range": "pitch range (deg)", "roll_range": "roll range (deg)",
    "head_translation": "head movement", "head_scale_change": "head scale change",
    "complete_frac": "face completeness", "face_size_px": "face size (px)", "n_faces_max": "faces per frame (max)",
    "head_motion_var_mean": "head-motion variance (Loopy 3.5)",
    "expression_var_mean": "expression variance (Loopy 3.5)", "duration_s": "clip length (s)",
    "sharpness": "face sharpness (Laplacian var. at 128 px)", "blockiness": "8x8 blockiness (B/A, source grid)",
    "wsb_quality": "JPEG quality (Wang-Sheikh-Bovik)", "bpp": "source bits per pixel per frame",
    "shadow_clip_frac": "face share clipped dark", "highlight_clip_frac": "face share clipped bright",
    "learned_iqa": "learned quality (CNNIQA)",
}
OPS = (">=", "<=", "abs<=")
N_BINS = 40
INT_BINS_MAX = 80  # integer columns with at most this many distinct values get one bin per value


def _mask(arr) -> np.ndarray:
    """A boolean pyarrow result as numpy, nulls as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _floats(arr) -> np.ndarray:
    """A numeric column as float64 numpy, nulls as NaN."""
    return np.asarray(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _hours(seconds: np.ndarray) -> float:
    return float(np.nansum(seconds)) / 3600.0 if len(seconds) else 0.0


def _num(x):
    """JSON has no NaN/inf: those become null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def stage_rank(stage: str | None) -> tuple:
    if stage in STAGE_ORDER:
        return (0, STAGE_ORDER.index(stage), "")
    return (1, 0, stage or "")


# ---- funnel ------------------------------------------------------------------------------

def input_levels(videos: pa.Table) -> np.ndarray:
    """Index into LEVELS of the last level each input reached.

    An input with candidate clips reached the candidate level whatever its stage label says
    (the curation writes "clips" when all were rejected, jobs/refilter.py writes "refilter").
    """
    status, stage = videos["status"], videos["stage"]
    level = np.full(videos.num_rows, 2, dtype=np.int8)  # video-level reject after detect (segment, crop, ...)
    level[_mask(pc.equal(stage, "probe"))] = 0
    level[_mask(pc.equal(stage, "detect"))] = 1
    level[_mask(pc.equal(stage, ALL_CLIPS_REJECTED)) | _mask(pc.greater(videos["n_candidates"], 0))] = 3
    level[_mask(pc.equal(status, "kept"))] = 4
    return level


def funnel(data: RunData) -> dict:
    v, m, r = data.videos, data.manifest, data.rejects
    level = input_levels(v)
    vdur = _floats(v["duration_s"])
    clip_rej = _mask(pc.greater_equal(r["clip_index"], 0))
    rdur = _floats(r["duration_s"])
    kept_dur = _floats(m["duration_s"])
    n_kept = m.num_rows
    n_clip_rej = int(clip_rej.sum())
    rows = []
    for i, name in enumerate(LEVELS):
        reached = level >= i
        row = {"level": name, "label": LEVEL_LABELS[name], "inputs": int(reached.sum()),
               "input_hours": _hours(vdur[reached]), "inputs_unknown_duration": int(np.isnan(vdur[reached]).sum()),
               "clips": None, "clip_hours": None}
        if name == "candidate_clips":
            row["clips"] = n_kept + n_clip_rej
            row["clip_hours"] = _hours(kept_dur) + _hours(rdur[clip_rej])
        elif name == "kept":
            row["clips"] = n_kept
            row["clip_hours"] = _hours(kept_dur)
        rows.append(row)
    all_rejected = level == 3
    return {
        "levels": rows,
        "rejections": rejections(r),
        "inputs_all_clips_rejected": {"inputs": int(all_rejected.sum()), "input_hours": _hours(vdur[all_rejected])},
        "candidates_from_videos": int(pc.sum(v["n_candidates"]).as_py() or 0),
    }


def _step_of(stage: str, unit: str) -> str:
    """The funnel level a reject failed to reach."""
    if unit == "clip":
        return "kept"
    return {"probe": "probed_ok", "detect": "face_tracks"}.get(stage, "candidate_clips")


def rejections(rejects: pa.Table) -> list[dict]:
    """One row per (stage, reason, unit): counts and hours (source hours for inputs, clip hours for clips)."""
    unit = pc.if_else(pc.fill_null(pc.greater_equal(rejects["clip_index"], 0), False), "clip", "input")
    t = pa.table({"stage": pc.fill_null(rejects["stage"], "?"), "reason": pc.fill_null(rejects["reason"], "?"),
                  "unit": unit, "duration_s": rejects["duration_s"]})
    g = t.group_by(["stage", "reason", "unit"]).aggregate([([], "count_all"), ("duration_s", "sum"),
                                                            ("duration_s", "count")])
    out = []
    for row in g.to_pylist():
        out.append({"stage": row["stage"], "reason": row["reason"], "unit": row["unit"],
                    "step": _step_of(row["stage"], row["unit"]), "count": int(row["count_all"]),
                    "hours": (row["duration_s_sum"] or 0.0) / 3600.0,
                    "unknown_duration": int(row["count_all"] - row["duration_s_count"])})
    out.sort(key=lambda x: (stage_rank(x["stage"]), x["unit"] != "input", -x["count"], x["reason"]))
    return out


def kept_summary(data: RunData) -> dict:
    m = data.manifest
    dur = _floats(m["duration_s"])
    n = m.num_rows
    sizes = _floats(m["sample_bytes"])
    return {"clips": n, "hours": _hours(dur),
            "inputs": int(_mask(pc.equal(data.videos["status"], "kept")).sum()),
            "clip_seconds_mean": _num(np.nanmean(dur)) if n else None,
            "clip_seconds_median": _num(np.nanmedian(dur)) if n else None,
            "sample_bytes": int(np.nansum(sizes)) if n else 0,
            "profiles": {str(k): int(c) for k, c in _value_counts(m["profile"])}}


def _value_counts(col) -> list[tuple]:
    if not len(col):
        return []
    return [(x["values"], x["counts"]) for x in pc.value_counts(pc.fill_null(col, "?")).to_pylist()]


def dataset_facts(data: RunData) -> dict:
    idx = data.index or {}
    shards = idx.get("shardlist", [])
    return {"path": data.root, "name": idx.get("name"), "profile": idx.get("profile"),
            "schema_version": idx.get("schema_version") or data.run.get("schema_version"),
            "pipeline_version": idx.get("pipeline_version") or data.run.get("pipeline_version"),
            "created": idx.get("created") or data.run.get("finished"),
            "nsamples": idx.get("nsamples"), "shards": len(shards),
            "shard_bytes": int(sum(s.get("filesize", 0) for s in shards)),
            "members": idx.get("members", []), "scores_table": data.scores is not None}


def checks(data: RunData, fun: dict) -> list[dict]:
    """Invariants of the data contract; a failure means the output (or this report) is wrong."""
    v, r = data.videos, data.rejects
    out = []

    def add(name, ok, detail):
        out.append({"check": name, "ok": bool(ok), "detail": detail})

    n_uri = pc.count_distinct(v["uri"]).as_py() if v.num_rows else 0
    add("every input appears once in videos.parquet", n_uri == v.num_rows, f"{v.num_rows} rows, {n_uri} distinct uris")
    level = input_levels(v)
    video_rej_videos = int((level < 3).sum())
    video_rej_rows = int(_mask(pc.less(r["clip_index"], 0)).sum())
    add("input-level rejects match between videos and rejects", video_rej_videos == video_rej_rows,
        f"videos.parquet {video_rej_videos}, rejects.parquet {video_rej_rows}")
    cand = fun["levels"][3]["clips"]
    add("candidate clips = kept + rejected clips = sum of n_candidates", cand == fun["candidates_from_videos"],
        f"{cand} vs {fun['candidates_from_videos']}")
    if data.index is not None:
        # after jobs/refilter.py the shards hold more samples than the selection the manifest is
        selected = (data.index.get("selection") or {}).get("nsamples", data.index.get("nsamples"))
        add("index.json selection = manifest rows", selected == data.manifest.num_rows,
            f"{selected} vs {data.manifest.num_rows}")
    if data.scores is not None:
        add("scores.parquet has one row per candidate clip", data.scores.num_rows == cand,
            f"{data.scores.num_rows} rows vs {cand} candidates")
    return out


# ---- per source ---------------------------------------------------------------------------

def per_source(data: RunData, top_reasons: int = 3, max_sources: int = 1000) -> dict:
    v, m, r = data.videos, data.manifest, data.rejects
    src = pc.fill_null(v["source"], "?")
    kept_flag = pc.cast(pc.fill_null(pc.equal(v["status"], "kept"), False), pa.int64())
    gv = pa.table({"source": src, "duration_s": v["duration_s"], "kept": kept_flag}).group_by("source").aggregate(
        [([], "count_all"), ("duration_s", "sum"), ("kept", "sum")])
    gm = pa.table({"source": pc.fill_null(m["source"], "?"), "duration_s": m["duration_s"]}).group_by(
        "source").aggregate([([], "count_all"), ("duration_s", "sum")])
    gr = pa.table({"source": pc.fill_null(r["source"], "?"), "stage": pc.fill_null(r["stage"], "?"),
                   "reason": pc.fill_null(r["reason"], "?")}).group_by(["source", "stage", "reason"]).aggregate(
        [([], "count_all")])
    kept = {row["source"]: row for row in gm.to_pylist()}
    reasons: dict[str, list] = {}
    for row in gr.to_pylist():
        reasons.setdefault(row["source"], []).append(
            {"stage": row["stage"], "reason": row["reason"], "count": int(row["count_all"])})
    rows = []
    for row in gv.to_pylist():
        s = row["source"]
        k = kept.get(s, {})
        rs = sorted(reasons.get(s, []), key=lambda x: (-x["count"], x["stage"], x["reason"]))
        rows.append({"source": s, "inputs": int(row["count_all"]), "input_hours": (row["duration_s_sum"] or 0) / 3600,
                     "inputs_kept": int(row["kept_sum"] or 0), "clips_kept": int(k.get("count_all", 0)),
                     "kept_hours": (k.get("duration_s_sum") or 0) / 3600, "rejects": sum(x["count"] for x in rs),
                     "top_reject_reasons": rs[:top_reasons]})
    rows.sort(key=lambda x: (-x["inputs"], x["source"]))
    return {"n_sources": len(rows), "truncated": len(rows) > max_sources, "sources": rows[:max_sources]}


# ---- score distributions -----------------------------------------------------------------

def parse_rules(run: dict) -> tuple[list[dict], list[str]]:
    """run.json["filter_rules"], keeping well-formed entries; returns (rules, notes)."""
    raw = run.get("filter_rules")
    if raw is None:
        return [], []
    rules, notes = [], []
    for i, rule in enumerate(raw if isinstance(raw, list) else []):
        if isinstance(rule, dict) and "value" in rule and rule["value"] is None:
            continue  # a rule switched off (threshold None, pipeline/filters.py): nothing to draw
        try:
            ok = rule["op"] in OPS and isinstance(rule["column"], str) and math.isfinite(float(rule["value"]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            notes.append(f"filter_rules[{i}] is malformed and was ignored: {rule!r}")
            continue
        rules.append({"rule": str(rule.get("rule") or rule["column"]), "column": rule["column"], "op": rule["op"],
                      "value": float(rule["value"]), "applied": bool(rule.get("applied", True)),
                      "reason": rule.get("reason")})
    if not isinstance(raw, list):
        notes.append("run.json filter_rules is not a list; no thresholds drawn")
    return rules, notes


def rule_passes(x: np.ndarray, op: str, value: float) -> np.ndarray:
    """Vectorised rule test; NaN (score not computed) neither passes nor fails: callers mask it."""
    with np.errstate(invalid="ignore"):
        if op == ">=":
            return x >= value
        if op == "<=":
            return x <= value
        return np.abs(x) <= value


def score_table(data: RunData) -> tuple[pa.Table | None, str | None]:
    """The per-clip table to plot: scores.parquet, or (older outputs) what manifest + rejects hold."""
    if data.scores is not None:
        return data.scores, "scores.parquet"
    m, r = data.manifest, data.rejects
    clip_rej = r.filter(pc.fill_null(pc.greater_equal(r["clip_index"], 0), False))
    if m.num_rows + clip_rej.num_rows == 0:
        return None, None
    kept = pa.table({"key": m["key"], "status": pa.array(["kept"] * m.num_rows, pa.string()),
                     "duration_s": pc.cast(m["duration_s"], pa.float64()),
                     "face_size_px": pc.cast(m["face_size_px"], pa.float64())})
    rej = pa.table({"key": clip_rej["key"], "status": pa.array(["rejected"] * clip_rej.num_rows, pa.string()),
                    "duration_s": pc.cast(clip_rej["duration_s"], pa.float64()),
                    "face_size_px": pa.nulls(clip_rej.num_rows, pa.float64())})
    return pa.concat_tables([kept, rej]), "manifest.parquet + rejects.parquet"


def score_columns(table: pa.Table) -> list[str]:
    return [f.name for f in table.schema
            if f.name not in ID_COLUMNS and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]


def _quantiles(x: np.ndarray) -> dict:
    if not len(x):
        return {"n": 0, "mean": None, "std": None, "min": None, "p05": None, "p50": None, "p95": None, "max": None}
    q = np.percentile(x, [0, 5, 50, 95, 100])
    return {"n": int(len(x)), "mean": _num(x.mean()), "std": _num(x.std()), "min": _num(q[0]), "p05": _num(q[1]),
            "p50": _num(q[2]), "p95": _num(q[3]), "max": _num(q[4])}


def bin_edges(x: np.ndarray, is_int: bool, extra: list[float]) -> np.ndarray:
    """Bins over the bulk of the data (0.1..99.9 %), widened to show every threshold."""
    if len(x) > 1000:
        lo, hi = np.percentile(x, [0.1, 99.9])
    else:
        lo, hi = float(x.min()), float(x.max())
    lo, hi = min([lo] + extra), max([hi] + extra)
    if is_int and hi - lo <= INT_BINS_MAX:
        return np.arange(math.floor(lo) - 0.5, math.ceil(hi) + 1.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    # a few values spread over 40 bins is a comb; about 2 sqrt(n) bins reads as a distribution
    return np.linspace(lo, hi, int(np.clip(2 * np.sqrt(len(x)), 8, N_BINS)) + 1)


def histogram(x: np.ndarray, edges: np.ndarray) -> dict:
    """Counts with values outside the edges folded into the end bins (and counted)."""
    below, above = int((x < edges[0]).sum()), int((x > edges[-1]).sum())
    counts, _ = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)
    return {"counts": counts.astype(int).tolist(), "below": below, "above": above}


def score_distributions(data: RunData, rules: list[dict]) -> dict:
    table, source = score_table(data)
    out = {"table": source, "columns": {}, "skipped_all_null": []}
    if table is None:
        return out
    kept = _mask(pc.equal(table["status"], "kept"))
    for name in score_columns(table):
        x = _floats(table[name])
        finite = np.isfinite(x)
        if not finite.any():
            out["skipped_all_null"].append(name)
            continue
        col_rules = [r for r in rules if r["column"] == name]
        extra = [v for r in col_rules for v in ((-r["value"], r["value"]) if r["op"] == "abs<=" else (r["value"],))]
        edges = bin_edges(x[finite], pa.types.is_integer(table.schema.field(name).type), extra)
        xk, xr = x[kept & finite], x[~kept & finite]
        out["columns"][name] = {
            "label": SCORE_LABELS.get(name, name), "edges": [float(e) for e in edges],
            "kept": {**_quantiles(xk), "null": int((kept & ~finite).sum()), "hist": histogram(xk, edges)},
            "rejected": {**_quantiles(xr), "null": int((~kept & ~finite).sum()), "hist": histogram(xr, edges)},
            "thresholds": col_rules,
        }
    return out


def rule_effects(data: RunData, rules: list[dict]) -> list[dict]:
    """For each threshold: how many scored clips it would pass/fail (what-if for retuning)."""
    table, _ = score_table(data)
    out = []
    for r in rules:
        row = {**r, "evaluated": 0, "pass": 0, "fail": 0, "fail_hours": 0.0, "column_present": False}
        if table is not None and r["column"] in table.column_names:
            x = _floats(table[r["column"]])
            finite = np.isfinite(x)
            passed = rule_passes(x, r["op"], r["value"]) & finite
            failed = finite & ~passed
            dur = _floats(table["duration_s"]) if "duration_s" in table.column_names else np.zeros(len(x))
            row.update(evaluated=int(finite.sum()), column_present=True, fail=int(failed.sum()),
                       fail_hours=_hours(dur[failed]))
            row["pass"] = row["evaluated"] - row["fail"]
        out.append(row)
    return out


# ---- run facts ----------------------------------------------------------------------------

# The funnel level whose inputs enter each stage (throughput = their video seconds / stage seconds).
STAGE_INPUT_LEVEL = {"probe": 0, "detect": 1, "segment": 2, "crop": 2}


def run_facts(data: RunData, fun: dict) -> dict:
    run = data.run
    timings = run.get("timings") or {}
    summary = run.get("summary") or {}
    stage_s = timings.get("stage_cpu_s") or {}
    total = sum(stage_s.values()) or None
    stages = []
    for stage in sorted(stage_s, key=stage_rank):
        lvl = fun["levels"][STAGE_INPUT_LEVEL.get(stage, 3)]
        secs = float(stage_s[stage])
        hours_in = lvl["input_hours"] if stage in STAGE_INPUT_LEVEL else lvl["clip_hours"]
        stages.append({"stage": stage, "seconds": secs, "share": secs / total if total else None,
                       "inputs_in": lvl["inputs"], "hours_in": hours_in,
                       "inputs_per_s": lvl["inputs"] / secs if secs > 0 else None,
                       "video_s_per_s": hours_in * 3600 / secs if secs > 0 else None})
    wall = timings.get("wall_s")
    in_hours = fun["levels"][0]["input_hours"]
    resumed = summary.get("inputs_this_run") not in (None, summary.get("inputs"))
    return {"wall_s": _num(wall), "inputs_per_s": _num(timings.get("inputs_per_s")),
            "video_hours_per_wall_hour": in_hours * 3600 / wall if wall else None,
            "stages": stages, "resumed": resumed, "inputs_this_run": summary.get("inputs_this_run"),
            "nodes_used": len(run.get("nodes_used") or []), "finished": run.get("finished"),
            "pipeline_version": run.get("pipeline_version"), "argv": run.get("argv"),
            "config": run.get("config"), "config_fingerprint": run.get("config_fingerprint"),
            "versions": run.get("versions") or {}, "profile": (run.get("config") or {}).get("profile")}


# ---- near-duplicates ------------------------------------------------------------------------

def duplicate_groups(data: RunData, max_groups: int = 50) -> dict | None:
    """The groups of duplicates.parquet (jobs/dedup.py): how many, their sizes, the largest ones
    with each member's status and the signals that tied it to the group. None when dedup never ran."""
    d = data.duplicates
    if d is None:
        return None
    rows = d.to_pylist()
    status = {}
    if data.scores is not None and "duplicate_of" in data.scores.column_names:
        for k, st, dup in zip(data.scores["key"].to_pylist(), data.scores["status"].to_pylist(),
                              data.scores["duplicate_of"].to_pylist()):
            status[k] = (st, dup)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    sizes = [len(g) for g in groups.values()]
    hist: dict[str, int] = {}
    for n in sizes:
        hist[str(n)] = hist.get(str(n), 0) + 1
    listed = []
    for gid, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_groups]:
        out = []
        for m in sorted(members, key=lambda m: m["rank"]):
            edges = json.loads(m["evidence"] or "[]")
            st, dup = status.get(m["key"], (None, None))
            out.append({"key": m["key"], "rank": m["rank"], "status": st, "duplicate_of": dup,
                        "signals": sorted({s for e in edges for s in e.get("signals", [])}),
                        "audio_ber": min((e["audio_ber"] for e in edges if e.get("audio_ber") is not None),
                                         default=None),
                        "phash_bits": min((e["phash_bits"] for e in edges if e.get("phash_bits") is not None),
                                          default=None)})
        listed.append({"group_id": gid, "size": len(members), "members": out})
    return {"groups": len(groups), "clips_in_groups": len(rows), "duplicates": len(rows) - len(groups),
            "size_histogram": hist, "listed": listed}
