"""One evaluation run: inputs -> scores.parquet, summary.json, FID/FVD statistics, report.

    evaluate(["gen/"], "eval/gen", EvalConfig(profile="full", model_dir="MODELS"), compare="eval/gt")

Every input gets exactly one row: ``status`` "ok" with all scores, or "error" with ``error`` (a
short reason such as "unreadable container", "no video stream", "empty file") and ``error_detail``.
A run where no input could be scored raises ``EvalRunError`` (and writes nothing).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__ as pipeline_version

from .score import EvalConfig, EvalInputError, Scorer, probe_input

EVAL_VERSION = "1.0"
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".ts"}

_F, _I, _S, _B = pa.float64(), pa.int32(), pa.string(), pa.bool_()
EVAL_SCHEMA = pa.schema([
    ("video", _S), ("path", _S), ("status", _S), ("error", _S), ("error_detail", _S), ("notes", _S),
    ("profile", _S), ("crop_mode", _S),
    # models that made the numbers (smoke models make numbers without meaning)
    ("sync_weights", _S), ("model_face", _S), ("model_pose", _S), ("model_keypoints", _S),
    # the input and what was scored (25 fps frames of the 512 crop; crop in source pixels)
    ("src_width", _I), ("src_height", _I), ("src_fps", _F), ("src_vfr", _B), ("src_rotation", _I), ("has_audio", _B),
    ("start_s", _F), ("n_frames", _I), ("duration_s", _F), ("crop_x0", _F), ("crop_y0", _F), ("crop_size", _F),
    ("crop_candidates", _I),  # --crop face: candidate clips the detect & segment stages found (longest scored)
    # lip sync (joonson/syncnet_python definitions, pipeline/scoring/syncnet.py)
    ("sync_conf", _F), ("sync_dist", _F), ("sync_offset", _I), ("sync_conf_frame_mean", _F),
    ("sync_conf_frame_p10", _F),
    # speech and mouth
    ("speech_ratio", _F), ("loudness_dbfs", _F), ("mouth_activity", _F),
    # head pose (degrees) and movement
    ("yaw_mean", _F), ("pitch_mean", _F), ("roll_mean", _F), ("yaw_abs_max", _F), ("pitch_abs_max", _F),
    ("roll_abs_max", _F), ("yaw_abs_p95", _F), ("pitch_abs_p95", _F), ("roll_abs_p95", _F),
    ("yaw_range", _F), ("pitch_range", _F), ("roll_range", _F),
    ("head_translation", _F), ("head_scale_change", _F),
    # face size, faces and completeness
    ("face_size_px", _F), ("face_size_out_px", _F), ("face_detected_frac", _F), ("n_faces_max", _I),
    ("other_faces", _B), ("complete_frac", _F),
    # Loopy 3.5 motion statistics ("Glo" / "Exp"): mean over 12-frame windows, px^2 of the 512 crop
    ("head_motion_var_mean", _F), ("expression_var_mean", _F), ("motion_windows", _I),
    # would the curation job keep it (its default thresholds; sync rules need syncnet_v2)
    ("curation_pass", _B), ("curation_failed_rules", _S),
    ("seconds", _F),
])

# Numeric scores summarised and compared, with the labels the report prints.
SCORE_LABELS = {
    "sync_conf": "Sync-C", "sync_dist": "Sync-D", "sync_offset": "AV offset (frames)",
    "sync_conf_frame_mean": "Sync-C per frame, mean", "speech_ratio": "speech ratio",
    "loudness_dbfs": "loudness (dBFS)", "mouth_activity": "mouth activity (face sizes/s)",
    "head_motion_var_mean": "Glo: head-motion variance (px²)", "expression_var_mean": "Exp: expression variance (px²)",
    "yaw_mean": "yaw mean (°)", "pitch_mean": "pitch mean (°)", "roll_mean": "roll mean (°)",
    "yaw_abs_max": "|yaw| max (°)", "pitch_abs_max": "|pitch| max (°)", "roll_abs_max": "|roll| max (°)",
    "yaw_abs_p95": "|yaw| p95 (°)", "pitch_abs_p95": "|pitch| p95 (°)", "roll_abs_p95": "|roll| p95 (°)",
    "head_translation": "head translation (face sizes)", "head_scale_change": "head scale change",
    "face_size_px": "face size (source px)", "face_size_out_px": "face size (512 crop px)",
    "face_detected_frac": "frames with a face", "complete_frac": "complete frames", "n_faces_max": "faces (max)",
    "duration_s": "duration (s)",
}


class EvalRunError(RuntimeError):
    """Nothing could be evaluated (every input failed: ``rows`` holds their error rows), or
    ``--compare`` is not an eval dir."""

    def __init__(self, message: str, rows: list[dict] | None = None):
        super().__init__(message)
        self.rows = rows or []


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given (in order), directories -> their video files (recursive, sorted)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTS)
            if not found:
                raise EvalInputError("no videos", f"{item} holds no video files ({', '.join(sorted(VIDEO_EXTS))})")
            out += found
        elif p.exists():
            out.append(str(p))
        else:
            raise EvalInputError("not found", item)
    return out


def _error_row(path: str, cfg: EvalConfig, e: Exception) -> dict:
    if isinstance(e, EvalInputError):
        reason, detail = e.reason, e.detail
    else:
        reason, detail = "internal error", f"{type(e).__name__}: {e}"
    for prefix in (f"{path}: ", f"{path} "):  # the row names the file already
        detail = detail[len(prefix):] if detail.startswith(prefix) else detail
    return {"video": Path(path).name, "path": path, "status": "error", "error": reason, "error_detail": detail[:2000],
            "profile": cfg.curate.profile, "crop_mode": cfg.crop}


def error_line(row: dict) -> str:
    """One line naming the file, the reason and the detail."""
    return f"{row['path']}: {row['error']}" + (f" ({row['error_detail']})" if row.get("error_detail") else "")


def _all_failed(rows: list[dict]) -> str:
    if len(rows) == 1:
        return error_line(rows[0])
    return f"none of the {len(rows)} inputs could be scored"


def _frechet_setup(cfg: EvalConfig):
    """(sink factory or None, {"fid": stats | reason, "fvd": ...}) for the weights given."""
    from pipeline.features.extractor import resolve_device

    from . import frechet as fr

    device = resolve_device(cfg.device)
    state: dict = {}
    makers = []
    if cfg.fid_weights:
        model, mid = fr.load_inception(cfg.fid_weights, device)
        stats = fr.RunningStats(fr.FID_DIM, mid)
        state["fid"] = stats
        makers.append(lambda: fr.FIDSink(model, stats, stride=cfg.fid_stride, batch=cfg.batch_size))
    else:
        state["fid"] = "no --fid-weights given (pytorch-fid pt_inception-2015-12-05 Inception weights)"
    if cfg.fvd_weights:
        i3d, iid = fr.load_i3d(cfg.fvd_weights, device)
        vstats = fr.RunningStats(fr.FVD_DIM, iid)
        state["fvd"] = vstats
        makers.append(lambda: fr.FVDSink(i3d, vstats, device=device))
    else:
        state["fvd"] = "no --fvd-weights given (StyleGAN-V i3d_torchscript.pt)"
    return (lambda: [m() for m in makers]) if makers else None, state


def _reference_stats(reference: str | None, name: str) -> tuple[dict | None, str | None]:
    from .frechet import load_stats

    if not reference:
        return None, "no --reference given (an eval dir of the real videos, or a pytorch-fid stats .npz)"
    p = Path(reference)
    if p.is_dir():
        f = p / f"{name}_stats.npz"
        if not f.exists():
            return None, f"reference {p} has no {f.name} (evaluate it with --{name}-weights)"
        return load_stats(f), None
    if name == "fid" and p.suffix == ".npz":
        return load_stats(p), None
    return None, f"reference {p} is not an eval dir" + (" or a .npz" if name == "fid" else "")


def _frechet_result(name: str, stats, cfg: EvalConfig, out: Path) -> dict:
    if isinstance(stats, str):
        return {"value": None, "reason": stats, "model": None, "n": 0}
    res = {"value": None, "reason": None, "model": stats.model, "n": stats.n}
    if stats.n < 2:
        res["reason"] = f"{stats.n} feature rows ({'frames' if name == 'fid' else '16-frame clips'}): need >= 2"
        return res
    stats.save(out / f"{name}_stats.npz")
    res["stats_file"] = f"{name}_stats.npz"
    res.update(frechet_vs_reference(out / f"{name}_stats.npz", cfg.reference, name))
    return res


def frechet_vs_reference(stats_file: str | Path, reference: str | Path | None, name: str = "fid") -> dict:
    """{"value": FID/FVD of a stats file against ``reference`` or None, "reason": why not, ...}."""
    from .frechet import frechet_distance, load_stats

    this = load_stats(stats_file)
    ref, why = _reference_stats(str(reference) if reference else None, name)
    if ref is None:
        return {"value": None, "reason": why}
    if ref.get("model") and ref["model"] != this["model"]:
        return {"value": None, "reason": f"reference statistics come from {ref['model']}, these from {this['model']}"}
    return {"value": frechet_distance(this["mu"], this["sigma"], ref["mu"], ref["sigma"]), "reason": None,
            "reference": str(reference), "reference_n": ref.get("n")}


def summarise(rows: list[dict]) -> dict:
    """Per score over the scored videos: n, mean, median, std, min, max (nulls left out)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = {}
    for col in SCORE_LABELS:
        v = np.array([r[col] for r in ok if r.get(col) is not None and math.isfinite(float(r[col]))], np.float64)
        out[col] = {"label": SCORE_LABELS[col], "n": int(len(v)),
                    **({"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
                        "min": float(v.min()), "max": float(v.max())} if len(v) else
                       {"mean": None, "median": None, "std": None, "min": None, "max": None})}
    offsets = [abs(r["sync_offset"]) for r in ok if r.get("sync_offset") is not None]
    out["sync_offset"]["abs_mean"] = float(np.mean(offsets)) if offsets else None
    return out


def load_eval(path: str | Path) -> tuple[list[dict], dict]:
    """(rows, summary) of an eval dir."""
    p = Path(path)
    if not (p / "scores.parquet").is_file() or not (p / "summary.json").is_file():
        raise EvalRunError(f"{p} is not an evaluation output (scores.parquet and summary.json missing)")
    return pq.read_table(p / "scores.parquet").to_pylist(), json.loads((p / "summary.json").read_text())


def compare_runs(this: dict, other: dict, other_path: str) -> dict:
    """Per score: mean/median of both runs and this - other; FID/FVD of both."""
    rows = []
    for col, a in this["scores"].items():
        b = other["scores"].get(col)
        if b is None:
            continue
        d = {k: (a[k] - b[k]) if a.get(k) is not None and b.get(k) is not None else None for k in ("mean", "median")}
        rows.append({"column": col, "label": a["label"], "n_this": a["n"], "n_other": b["n"],
                     "mean_this": a["mean"], "mean_other": b["mean"], "mean_delta": d["mean"],
                     "median_this": a["median"], "median_other": b["median"], "median_delta": d["median"]})
    return {"other_path": other_path, "other_name": other.get("name"), "other_models": other.get("models"),
            "other_profile": other.get("profile"), "scores": rows,
            "frechet": {k: {"this": this[k]["value"], "other": other.get(k, {}).get("value")} for k in ("fid", "fvd")},
            "videos": {"this": this["videos"]["scored"], "other": other["videos"]["scored"]}}


def evaluate(inputs: list[str], out: str | Path, cfg: EvalConfig, *, compare: str | Path | None = None,
             name: str | None = None, log=None) -> dict:
    """Score every input, write ``out``/{scores.parquet, summary.json, report.html, report.md} and
    the FID/FVD statistics; returns the summary. Raises EvalInputError for inputs that name no
    file, EvalRunError when nothing could be scored or ``compare`` is not an eval dir."""
    from . import report

    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    paths = expand_inputs(inputs)
    other = load_eval(compare) if compare is not None else None  # fail early on a bad --compare
    # Probe first (cheap): inputs that are no video at all fail before any model loads.
    rows: list[dict | None] = []
    for path in paths:
        try:
            probe_input(path)
            rows.append(None)
        except EvalInputError as e:
            rows.append(_error_row(path, cfg, e))
    if all(r is not None for r in rows):
        raise EvalRunError(_all_failed(rows), rows)
    factory, frechet_state = _frechet_setup(cfg)
    scorer = Scorer(cfg, frame_sinks_factory=factory)
    for i, path in enumerate(paths):
        if rows[i] is not None:
            continue
        try:
            row = scorer.score(path)
            log(f"[{i + 1}/{len(paths)}] {Path(path).name}: Sync-C {_f(row.get('sync_conf'))}, offset "
                f"{row.get('sync_offset')}, {row['n_frames']} frames in {row['seconds']:.1f} s")
        except Exception as e:  # noqa: BLE001 - one bad input is one error row, never the end of the run
            row = _error_row(path, cfg, e)
            log(f"[{i + 1}/{len(paths)}] {error_line(row)}")
        rows[i] = row
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise EvalRunError(_all_failed(rows), rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({f.name: [r.get(f.name) for r in rows] for f in EVAL_SCHEMA}, schema=EVAL_SCHEMA)
    pq.write_table(table, out / "scores.parquet")
    summary = {
        "eval_version": EVAL_VERSION, "pipeline_version": pipeline_version, "name": name or out.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "out": str(out.resolve()),
        "profile": cfg.curate.profile, "crop": cfg.crop, "models": dict(scorer.models),
        "videos": {"inputs": len(rows), "scored": len(ok), "errors": len(rows) - len(ok),
                   "error_list": [{"video": r["video"], "path": r["path"], "error": r["error"], "detail": r["error_detail"]}
                                  for r in rows if r["status"] != "ok"]},
        "curation_pass": {"n": sum(bool(r.get("curation_pass")) for r in ok), "of": len(ok)},
        "scores": summarise(rows),
        "fid": _frechet_result("fid", frechet_state["fid"], cfg, out),
        "fvd": _frechet_result("fvd", frechet_state["fvd"], cfg, out),
        "seconds": None,
    }
    if cfg.fid_weights:
        summary["models"]["fid"] = summary["fid"]["model"]
    if cfg.fvd_weights:
        summary["models"]["fvd"] = summary["fvd"]["model"]
    if other is not None:
        summary["compare"] = compare_runs(summary, other[1], str(compare))
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False), encoding="utf-8")
    report.write(out, rows, summary, other_rows=other[0] if other else None)
    return summary


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"
