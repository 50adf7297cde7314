"""Filter rules over the per-clip scores: one definition used by the curation job and by
``jobs/refilter.py`` (which re-applies new thresholds to a stored scores table).

A rule names the score column, the comparison and the config field holding its threshold.
Rules are checked in order (cheap, robust signals first) and a clip is rejected by the first
rule it fails; every failing rule is listed in the reject's detail. Sync rules only apply
when the scores came from the published SyncNet weights (``sync_weights == "syncnet_v2"``);
with the random smoke SyncNet they are reported as not applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import FilterConfig


@dataclass(frozen=True)
class Rule:
    field: str  # FilterConfig field with the threshold
    column: str  # scores column
    op: str  # ">=", "<=", "abs<="
    reason: str  # rejects.reason
    needs_real_sync: bool = False


RULES: tuple[Rule, ...] = (
    Rule("loudness_dbfs_min", "loudness_dbfs", ">=", "no speech (silent audio)"),
    Rule("speech_ratio_min", "speech_ratio", ">=", "no speech"),
    Rule("face_size_px_min", "face_size_px", ">=", "face too small"),
    Rule("complete_frac_min", "complete_frac", ">=", "head cut off by the frame"),
    Rule("pad_frac_max", "pad_frac", "<=", "crop padded beyond the picture"),
    # pose: the clip's 95th percentile of |angle|, so a few mis-fitted frames do not reject a clip
    Rule("yaw_abs_max", "yaw_abs_p95", "<=", "extreme rotation (yaw)"),
    Rule("pitch_abs_max", "pitch_abs_p95", "<=", "extreme rotation (pitch)"),
    Rule("roll_abs_max", "roll_abs_p95", "<=", "extreme rotation (roll)"),
    Rule("head_translation_max", "head_translation", "<=", "excessive head movement"),
    Rule("mouth_activity_min", "mouth_activity", ">=", "no mouth activity"),
    # technical quality (pipeline/scoring/quality.py)
    Rule("bpp_min", "bpp", ">=", "source bitrate too low"),
    Rule("blockiness_max", "blockiness", "<=", "blocky compression"),
    Rule("sharpness_min", "sharpness", ">=", "blurred face"),
    Rule("shadow_clip_frac_max", "shadow_clip_frac", "<=", "face underexposed"),
    Rule("highlight_clip_frac_max", "highlight_clip_frac", "<=", "face overexposed"),
    Rule("learned_iqa_min", "learned_iqa", ">=", "low learned quality score"),
    Rule("sync_offset_abs_max", "sync_offset", "abs<=", "large audio-video offset", needs_real_sync=True),
    Rule("sync_conf_min", "sync_conf", ">=", "low lip-sync confidence", needs_real_sync=True),
)

REAL_SYNC_WEIGHTS = "syncnet_v2"


def _passes(value, op: str, threshold: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False  # a score that could not be measured does not pass a rule that needs it
    if op == ">=":
        return value >= threshold
    if op == "<=":
        return value <= threshold
    if op == "abs<=":
        return abs(value) <= threshold
    raise ValueError(f"unknown op {op!r}")


def unstored_rules(filters: FilterConfig, stored_columns: set[str]) -> list[str]:
    """The active rules whose score column an output never recorded (see ``evaluate``)."""
    return [f"filters.{r.field}" for r in RULES
            if getattr(filters, r.field) is not None and r.column not in stored_columns]


def rule_table(filters: FilterConfig, sync_real: bool) -> list[dict]:
    """The active rules, as recorded in run.json["filter_rules"] (the stats report draws them)."""
    out = []
    for r in RULES:
        value = getattr(filters, r.field)
        out.append({"rule": f"filters.{r.field}", "column": r.column, "op": r.op, "value": value,
                    "reason": r.reason, "applied": value is not None and (sync_real or not r.needs_real_sync)})
    if filters.single_face_required:
        out.append({"rule": "filters.single_face_required", "column": "n_faces_max", "op": "<=", "value": 1,
                    "reason": "several faces", "applied": True})
    return out


def evaluate(scores: dict, filters: FilterConfig, stored_columns: set[str] | None = None) -> list[dict]:
    """Failed rules for one clip's scores, in rule order (empty list = the clip passes).

    ``stored_columns``: the score columns the curation that made an output recorded at all
    (refilter of an output written before a score existed); a rule on a column outside it is not
    applied, since a score that was never measured is not a failed measurement.
    """
    sync_real = scores.get("sync_weights") == REAL_SYNC_WEIGHTS
    failed = []
    for rule in rule_table(filters, sync_real):
        if not rule["applied"] or (stored_columns is not None and rule["column"] not in stored_columns):
            continue
        if not _passes(scores.get(rule["column"]), rule["op"], rule["value"]):
            failed.append(rule)
    return failed
