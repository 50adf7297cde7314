"""report.md: the short summary that pastes into an issue or a paper appendix (GitHub markdown)."""
from __future__ import annotations

from . import fmt
from .stats import LEVEL_LABELS


# The scores worth a line in a summary (the page and stats.json have all of them).
KEY_SCORES = ("duration_s", "sync_conf", "sync_dist", "sync_offset", "speech_ratio", "yaw_abs_p95", "pitch_abs_p95",
              "head_translation", "face_size_px", "head_motion_var_mean", "expression_var_mean",
              "sharpness", "blockiness", "bpp", "highlight_clip_frac")


def _table(head: list[str], rows: list[list[str]], text_cols: int = 1) -> list[str]:
    """The first ``text_cols`` columns left-aligned, the numbers right-aligned."""
    align = ["---" if i < text_cols else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def _signed(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def render(s: dict, top_reasons: int = 10) -> str:
    d, k, f, r = s["dataset"], s["kept"], s["funnel"], s["run"]
    lv = f["levels"]
    out = [f"# Dataset report: {d['name'] or d['path']}", "",
           f"`{d['path']}` · profile `{d['profile']}` · schema {d['schema_version']} · pipeline "
           f"{d['pipeline_version']} · created {d['created']}", "",
           f"**Kept {fmt.n(k['clips'])} clips, {fmt.hours(k['hours'])} h** (median clip "
           f"{fmt.num(k['clip_seconds_median'])} s) from {fmt.n(k['inputs'])} of {fmt.n(lv[0]['inputs'])} inputs "
           f"({fmt.hours(lv[0]['input_hours'])} h of source video): {fmt.pct(k['hours'], lv[0]['input_hours'])} "
           f"of the input hours. {fmt.n(d['shards'])} shards, {d['shard_bytes'] / 2**30:.2f} GiB.", ""]
    out += [f"> {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
    out += ["## Funnel", ""]
    out += _table(["level", "inputs", "input hours", "clips", "clip hours"],
                  [[x["label"], fmt.n(x["inputs"]), fmt.hours(x["input_hours"]), fmt.n(x["clips"]),
                    fmt.hours(x["clip_hours"])] for x in lv])
    rej = sorted(f["rejections"], key=lambda x: -x["count"])[:top_reasons]
    if rej:
        out += ["## Top rejection reasons", ""]
        out += _table(["stage", "reason", "unit", "did not reach", "count", "hours"],
                      [[x["stage"], x["reason"], x["unit"], LEVEL_LABELS[x["step"]], fmt.n(x["count"]),
                        fmt.hours(x["hours"])] for x in rej], text_cols=4)
    if s["thresholds"]:
        out += ["## Thresholds", ""]
        out += _table(["rule", "keep when", "applied", "scored", "fail"],
                      [[x["rule"], f"`{fmt.rule(x)}`", "yes" if x["applied"] else "no", fmt.n(x["evaluated"]),
                        fmt.n(x["fail"])] for x in s["thresholds"]], text_cols=3)
    cols = {k: v for k, v in s["scores"]["columns"].items() if k in KEY_SCORES}
    if cols:
        out += [f"## Scores of kept clips (from {s['scores']['table']})", ""]
        out += _table(["score", "n", "p5", "median", "p95"],
                      [[c["label"], fmt.n(c["kept"]["n"]), fmt.num(c["kept"]["p05"]), fmt.num(c["kept"]["p50"]),
                        fmt.num(c["kept"]["p95"])] for c in cols.values()])
    from .identities import markdown_lines

    out += markdown_lines(s)
    dup = s.get("duplicates")
    if dup:
        out += ["## Duplicate groups", "",
                f"{fmt.n(dup['groups'])} groups hold {fmt.n(dup['clips_in_groups'])} clips; "
                f"{fmt.n(dup['duplicates'])} are duplicates of a better-ranked member (jobs/dedup.py).", ""]
        out += _table(["group", "clip", "rank", "status", "signals", "audio BER", "phash bits"],
                      [[g["group_id"], m["key"], str(m["rank"]), m["status"] or "", "+".join(m["signals"]),
                        fmt.num(m["audio_ber"]), fmt.num(m["phash_bits"])]
                       for g in dup["listed"] for m in g["members"]], text_cols=5)
    if r["stages"]:
        out += ["## Run", "",
                f"Wall time {fmt.seconds(r['wall_s'])} on {fmt.n(r['nodes_used'])} Ray node(s), "
                f"{fmt.num(r['video_hours_per_wall_hour'])} h of video per wall hour.", ""]
        out += _table(["stage", "task time", "share", "video s per s"],
                      [[x["stage"], fmt.seconds(x["seconds"]), fmt.pct(x["share"], 1), fmt.num(x["video_s_per_s"])]
                       for x in r["stages"]])
    if s["models"]:
        out += ["Models: " + ", ".join(f"{k} = `{'`, `'.join(v)}`" for k, v in s["models"].items()), ""]
    c = s.get("compare")
    if c:
        kc = c["kept"]
        out += [f"## Compared with `{c['other_path']}`", ""]
        out += _table(["level", "inputs Δ", "clips Δ", "clip hours Δ"],
                      [[x["label"], f"{x['inputs_delta']:+,}", _signed(x["clips_delta"], "+,"),
                        _signed(x["clip_hours_delta"], "+.3f")] for x in c["funnel"]])
        out += [f"Kept in both {fmt.n(kc['both'])}; entered {fmt.n(kc['entered'])} clips "
                f"({fmt.hours(kc['entered_hours'])} h); left {fmt.n(kc['left'])} clips "
                f"({fmt.hours(kc['left_hours'])} h).", ""]
        if kc["left_reasons"]:
            out += ["Why clips left: " + "; ".join(f"{x['stage']}: {x['reason']} ({fmt.n(x['count'])})"
                                                 for x in kc["left_reasons"][:5]), ""]
    return "\n".join(out)
