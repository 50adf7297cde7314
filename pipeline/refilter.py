"""Re-apply filter thresholds to a finished curation output from its stored scores.

No video is decoded and no model runs: the scores table holds every score of every scored
clip, and the shards hold every clip that ever passed. A clip that passes the new rules is
kept when its sample is in a shard; when it is not (it was rejected before the expensive
features were computed), it is listed in ``needs_rerun.parquet`` instead of vanishing. A
kept clip that now fails leaves the manifest (its bytes stay in the shard, unused: the
manifest is the selection the trainer reads) and gets a rejects row with stage "refilter".
Speaking-face decisions are kept as the curation made them.

This module only decides (``select``: journal outcomes and thresholds in, new table rows out);
pipeline/finalize.py reads the output and writes the result, for jobs/refilter.py
(``finalize.refilter``) and for a curation run into an output whose thresholds were refiltered.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa

from schemas import records
from .config import FilterConfig
from .dedup import select_kept
from .filters import evaluate, rule_table, unstored_rules

NEEDS_RERUN_SCHEMA = pa.schema([("key", pa.string()), ("uri", pa.string()), ("video_id", pa.string()),
                                ("clip_index", pa.int32()), ("previous_reason", pa.string())])


REFILTER_STATE = "refilter.json"  # under _journal/: the thresholds a later curate run re-applies


@dataclass
class Selection:
    """What ``filters`` keep of an output: its new tables' rows and the report of what moved."""

    manifest: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)
    needs_rerun: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    duplicates_found: bool = False
    duplicates_rejected: int = 0


def select(shard_entries: list[dict], videos: list[dict], filters: FilterConfig, *, duplicates: list[dict],
           before: set[str]) -> Selection:
    """Apply ``filters`` to the journal's outcomes (``shard_entries``: journaled shards with their
    manifest and scores rows; ``videos``: the latest entry of every input) and ``duplicates``
    (duplicates.parquet rows); ``before``: the keys the output's manifest held until now, for the
    report. Reads and writes nothing: pipeline/finalize.py writes the result."""
    # The journal holds every score as the curation measured it; scores.parquet may already carry
    # an earlier refilter's statuses, so successive refilters always start from the same base.
    # Everything physically in the shards, and the curation's own outcomes.
    present = {r["key"]: r for e in shard_entries for r in e["manifest"]}
    base_rejects = [r for v in videos for r in v["rejects"]]
    scores = [r for e in shard_entries for r in e.get("scores", [])] + [r for v in videos for r in v.get("scores", [])]

    kept, dropped, rerun = [], [], []
    new_scores = []
    evaluated = []
    # An output written before a score existed (an older 2.x minor version) never recorded it:
    # its rule is skipped, not failed by every clip.
    stored_columns = set().union(*(s.keys() for s in scores)) if scores else set()
    for s in scores:
        speaker_loss = s.get("reject_reason") == "not the speaking face"
        failed = [] if not speaker_loss else [{"reason": "not the speaking face", "rule": "speaker.selection",
                                               "column": "sync_conf", "value": None, "op": ""}]
        if s.get("reject_reason") == "clip too short inside audio coverage":
            # the offset fix found no source audio for it: no threshold here can change that
            failed.append({"reason": s["reject_reason"], "rule": "segment.min_clip_s", "column": "duration_s",
                           "value": None, "op": ""})
        failed += evaluate(s, filters, stored_columns)
        evaluated.append((s, failed))
    # near-duplicates (jobs/dedup.py): of each group, the best-ranked clip passing every other rule stays
    evidence_of = {r["key"]: r["evidence"] for r in duplicates}
    duplicate_of = select_kept(duplicates, {s["key"] for s, f in evaluated if not f and s["key"] in present})
    for s, failed in evaluated:
        s = dict(s, duplicate_of=duplicate_of.get(s["key"]))
        if filters.dedup and s["duplicate_of"]:
            failed = failed + [{"reason": f"duplicate of {s['duplicate_of']}", "rule": "filters.dedup",
                                "column": "duplicate_of", "value": s["duplicate_of"], "op": "kept instead:"}]
        if not failed:
            if s["key"] in present:
                kept.append(s["key"])
                s.update(status="kept", reject_stage=None, reject_reason=None, features_computed=True)
            else:
                rerun.append({"key": s["key"], "uri": s["uri"], "video_id": s["video_id"], "clip_index": s["clip_index"],
                              "previous_reason": s.get("reject_reason")})
                s.update(status="rejected", reject_stage=s.get("reject_stage"),
                         reject_reason=f"needs rerun (was: {s.get('reject_reason')})")
        else:
            first = failed[0]
            if s["key"] in present:
                dropped.append((s, first, failed))
            stage = "dedup" if first["rule"] == "filters.dedup" else "refilter"
            s.update(status="rejected", reject_stage=stage if s["key"] in present else s.get("reject_stage"),
                     reject_reason=first["reason"])
        new_scores.append(s)

    kept_set = set(kept)
    rerun_keys = {r["key"] for r in rerun}
    rejects = [r for r in base_rejects if r.get("key") not in kept_set]
    for s, first, failed in dropped:
        value = s.get(first["column"])
        rejects.append(records.clip_reject(
            uri=s["uri"], video_id=s["video_id"], source=s["source"], clip_index=s["clip_index"], key=s["key"],
            stage=s["reject_stage"], reason=first["reason"], rule=first["rule"], retryable=False,
            value=value if isinstance(value, (int, float)) else None,
            threshold=first["value"] if isinstance(first["value"], (int, float)) else None,
            detail="; ".join(f"{f['rule']} ({f['column']} {f['op']} {f['value']})" for f in failed)
            + (f"; evidence: {evidence_of.get(s['key'])}" if first["rule"] == "filters.dedup" else ""),
            duration_s=s["duration_s"]))
    manifest = [present[k] for e in shard_entries for k in e["shard"]["keys"] if k in kept_set]
    video_rows = []
    kept_by_uri: dict[str, int] = {}
    for r in manifest:
        kept_by_uri[r["uri"]] = kept_by_uri.get(r["uri"], 0) + 1
    for v in videos:
        row = dict(v["video"])
        n = kept_by_uri.get(row["uri"], 0)
        if row["status"] == "kept" or n:
            row["n_kept"] = n
            if n:
                row.update(status="kept", stage=None, reason=None)
            else:
                row.update(status="rejected", stage="refilter", reason="all clips rejected by refilter")
        video_rows.append(row)

    report = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "filters": filters.model_dump(mode="json"),
              "kept": len(kept_set), "entered": sorted(kept_set - before), "left": sorted(before - kept_set),
              "needs_rerun": sorted(rerun_keys), "rules_not_applied_unstored": unstored_rules(filters, stored_columns)}
    return Selection(manifest=manifest, rejects=rejects, scores=new_scores, videos=video_rows, needs_rerun=rerun,
                     report=report, duplicates_found=bool(duplicates),
                     duplicates_rejected=sum(1 for _, f, _ in dropped if f["rule"] == "filters.dedup"))


def record_in_run(run: dict, selection: Selection, filters: FilterConfig, *, sync_real: bool) -> None:
    """Note a refilter in ``run`` (run.json): its report, the rules and filters now in effect, dedup."""
    run.setdefault("refilters", []).append(dict(selection.report))
    run["filter_rules"] = rule_table(filters, sync_real=sync_real)
    run["dedup"] = {"applied": bool(filters.dedup and selection.duplicates_found),
                    "duplicates_rejected": selection.duplicates_rejected}
    run["config"]["filters"] = filters.model_dump(mode="json")
