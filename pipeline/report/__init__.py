"""Dataset statistics report of one curation output (``jobs/stats.py``).

    build_report(DIR, out=None, compare=None) -> stats dict

writes ``index.html`` (one self-contained page), ``stats.json`` (the same numbers; schema in
``schemas/stats.schema.json``) and ``report.md`` to ``out`` (default ``DIR/report``).
It reads the parquet tables, run.json, index.json and a few samples from the shards only, so its
cost is seconds per million clips, not a pass over the video.

Modules: load (read an output), stats (numbers), compare (two runs), samples (thumbnails),
plots (matplotlib figures), html / markdown (formatting only), synthetic (test/benchmark data),
browser (headless Chromium check used by the tests and the screenshot).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .load import ReportError, RunData, load_run

STATS_VERSION = "1.0"
__all__ = ["ReportError", "RunData", "build_report", "compute_stats", "load_run", "validate_stats", "STATS_VERSION"]


def stats_json_schema() -> dict:
    import schemas

    return json.loads(Path(schemas.__file__).with_name("stats.schema.json").read_text())


def validate_stats(stats: dict) -> None:
    """Raise jsonschema.ValidationError when ``stats`` breaks schemas/stats.schema.json."""
    import jsonschema

    jsonschema.validate(stats, stats_json_schema())


def compute_stats(data: RunData) -> dict:
    """All numbers that come from the tables (no video read)."""
    from . import stats as st
    from .identities import identity_counts

    rules, rule_notes = st.parse_rules(data.run)
    fun = st.funnel(data)
    return {
        "stats_version": STATS_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": st.dataset_facts(data),
        "notes": list(data.notes) + rule_notes,
        "checks": st.checks(data, fun),
        "funnel": fun,
        "kept": st.kept_summary(data),
        "thresholds": st.rule_effects(data, rules),
        "scores": st.score_distributions(data, rules),
        "sources": st.per_source(data),
        "run": st.run_facts(data, fun),
        "models": {},
        "identities": identity_counts(data),
        "duplicates": st.duplicate_groups(data),
    }


def _top_reasons(stats: dict, k: int) -> list[dict]:
    """(stage, reason) pairs with the most rejects, inputs and clips together."""
    counts: dict[tuple, int] = {}
    for r in stats["funnel"]["rejections"]:
        counts[(r["stage"], r["reason"])] = counts.get((r["stage"], r["reason"]), 0) + r["count"]
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [{"stage": s, "reason": r, "count": c} for (s, r), c in top]


def build_report(root: str | Path, out: str | Path | None = None, compare: str | Path | None = None, *,
                 kept_thumbs: int = 6, reject_reasons: int = 4, per_reason: int = 2) -> dict:
    from . import html, markdown, samples
    from .compare import compare as compare_runs

    t = {"start": time.perf_counter()}
    data = load_run(str(root))
    if out is None:
        if not data.is_local:
            raise ReportError(f"{root} is not a local directory: give --out REPORT_DIR")
        out = Path(data.path) / "report"
    out = Path(out)
    t["load"] = time.perf_counter()
    stats = compute_stats(data)
    t["stats"] = time.perf_counter()
    if compare is not None:
        other = load_run(str(compare))
        stats["compare"] = compare_runs(data, stats, other)
    t["compare"] = time.perf_counter()

    kept, models, kept_notes = samples.sample_kept(data, kept_thumbs)
    rejected = samples.sample_rejected(data, _top_reasons(stats, reject_reasons), per_reason)
    stats["models"] = models
    stats["contact_sheet"] = {
        "kept": [{k: v for k, v in x.items() if k != "thumbs"} | {"frames": len(x["thumbs"])} for x in kept],
        "kept_notes": kept_notes,
        "rejected": [{**g, "examples": [{k: v for k, v in e.items() if k != "thumb"} | {"frame": e["thumb"] is not None}
                                        for e in g["examples"]]} for g in rejected],
    }
    t["samples"] = time.perf_counter()
    page = html.render(stats, {"kept": kept, "kept_notes": kept_notes, "rejected": rejected})
    t["html"] = time.perf_counter()
    stats["report_dir"] = str(out.resolve())
    stats["report_seconds"] = {"load": t["load"] - t["start"], "stats": t["stats"] - t["load"],
                               "compare": t["compare"] - t["stats"], "samples": t["samples"] - t["compare"],
                               "plots_html": t["html"] - t["samples"], "total": t["html"] - t["start"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "report.md").write_text(markdown.render(stats), encoding="utf-8")
    # allow_nan=False: a NaN that slipped through would make stats.json invalid JSON for other readers
    (out / "stats.json").write_text(json.dumps(stats, indent=1, allow_nan=False), encoding="utf-8")
    return stats
