"""index.html: one self-contained page (inline CSS, PNG/JPEG as data: URIs, no script, no links out).

No JavaScript at all: the page must open from a laptop, a CI artifact or an air-gapped cluster
and show the same thing, and there is then nothing that can fail at view time.
"""
from __future__ import annotations

import json
from html import escape

from . import fmt, plots
from .stats import LEVEL_LABELS

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}.sub{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px;background:#fff}
th,td{border:1px solid #e2e2e2;padding:3px 8px;text-align:left;vertical-align:top}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px 14px;min-width:130px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:8px}
.grid figure{margin:0;background:#fff;border:1px solid #eee;padding:4px}
img.plot{max-width:100%}
.warn{background:#fff4e5;border:1px solid #f0c36d;padding:6px 10px;margin:6px 0;border-radius:4px}
.bad{background:#fde8e8;border-color:#e8a0a0}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
.thumb{background:#fff;border:1px solid #e2e2e2;padding:6px;font-size:11px;max-width:310px;word-break:break-all}
.thumb img{width:144px;height:auto;margin-right:2px}
pre{background:#fff;border:1px solid #e2e2e2;padding:8px;overflow:auto;font-size:12px;max-height:420px}
.pos{color:#1a7f37}.neg{color:#b42318}
"""


def _img(b64: str | None, alt: str, cls: str = "plot", mime: str = "image/png") -> str:
    if not b64:
        return ""
    return f'<img class="{cls}" alt="{escape(alt)}" src="data:{mime};base64,{b64}">'


def _table(head: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    th = "".join(f'<th class="r">{escape(h)}</th>' if i in right else f"<th>{escape(h)}</th>"
                 for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="r">{c}</td>' if i in right else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _signed(x, f=fmt.n) -> str:
    if x is None:
        return "–"
    cls = "pos" if x > 0 else "neg" if x < 0 else ""
    return f'<span class="{cls}">{"+" if x > 0 else ""}{f(x) if x >= 0 else "-" + f(-x)}</span>'


def _header(s: dict) -> str:
    d, k, lv = s["dataset"], s["kept"], s["funnel"]["levels"]
    title = d["name"] or "curation output"
    out = [f"<h1>Dataset report: {escape(title)}</h1>",
           f'<div class="sub">{escape(d["path"])} · profile {escape(str(d["profile"]))} · schema '
           f'{escape(str(d["schema_version"]))} · pipeline {escape(str(d["pipeline_version"]))} · created '
           f'{escape(str(d["created"]))} · report {escape(s["generated"])}</div>']
    if d["profile"] == "smoke":
        out.append('<div class="warn">smoke profile: tiny random models made these scores and features; '
                   "they are not meaningful and the trainer refuses these shards unless told.</div>")
    for note in s["notes"]:
        out.append(f'<div class="warn">{escape(note)}</div>')
    for c in s["checks"]:
        if not c["ok"]:
            out.append(f'<div class="warn bad">check failed: {escape(c["check"])} ({escape(c["detail"])})</div>')
    cards = [("kept clips", fmt.n(k["clips"])), ("kept hours", fmt.hours(k["hours"])),
             ("inputs", fmt.n(lv[0]["inputs"])), ("input hours", fmt.hours(lv[0]["input_hours"])),
             ("yield (hours kept / in)", fmt.pct(k["hours"], lv[0]["input_hours"])),
             ("inputs kept", f'{fmt.n(k["inputs"])} ({fmt.pct(k["inputs"], lv[0]["inputs"])})'),
             ("shards", f'{fmt.n(d["shards"])} · {d["shard_bytes"] / 2**30:.2f} GiB')]
    out.append('<div class="cards">' + "".join(f"<div class=card><b>{v}</b><span>{escape(t)}</span></div>"
                                               for t, v in cards) + "</div>")
    return "\n".join(out)


def _funnel(s: dict) -> str:
    f = s["funnel"]
    lv = f["levels"]
    rows = [[escape(x["label"]), fmt.n(x["inputs"]), fmt.hours(x["input_hours"]),
             fmt.pct(x["input_hours"], lv[0]["input_hours"]), fmt.n(x["clips"]), fmt.hours(x["clip_hours"])]
            for x in lv]
    out = ["<h2>Funnel</h2>", _img(plots.funnel_figure(lv), "funnel"),
           _table(["level", "inputs", "input hours", "% of input hours", "clips", "clip hours"], rows, {1, 2, 3, 4, 5})]
    a = f["inputs_all_clips_rejected"]
    out.append(f'<div class="sub">{fmt.n(a["inputs"])} inputs ({fmt.hours(a["input_hours"])} h) had candidate '
               "clips but every one was rejected. Input hours are the source durations; inputs whose duration "
               "could not be read count as 0 h (column <i>unknown</i> below).</div>")
    out.append("<h3>Rejections by stage and reason</h3>")
    out.append(_img(plots.rejections_figure(f["rejections"]), "rejections"))
    rows = [[escape(r["stage"]), escape(r["reason"]), r["unit"], escape(LEVEL_LABELS[r["step"]]), fmt.n(r["count"]),
             fmt.hours(r["hours"]), fmt.n(r["unknown_duration"])] for r in f["rejections"]]
    out.append(_table(["stage", "reason", "unit", "did not reach", "count", "hours", "unknown duration"], rows,
                      {4, 5, 6}) if rows else "<p>No rejections.</p>")
    return "\n".join(out)


def _scores(s: dict) -> str:
    sc = s["scores"]
    out = ["<h2>Score distributions: kept vs rejected clips</h2>"]
    if not sc["table"]:
        return out[0] + "<p>No scored clips.</p>"
    out.append(f'<div class="sub">From {escape(sc["table"])}. Each curve is the share of its group per bin; '
               "values beyond the end bins are folded into them. Solid black lines: thresholds applied in this "
               "run; dashed grey: configured but not applied.</div>")
    if s["thresholds"]:
        rows = [[escape(r["rule"]), escape(fmt.rule(r)), "yes" if r["applied"] else "no", escape(r.get("reason") or ""),
                 fmt.n(r["evaluated"]), fmt.n(r["pass"]), fmt.n(r["fail"]), fmt.hours(r["fail_hours"])]
                for r in s["thresholds"]]
        out.append("<h3>Thresholds (run.json filter_rules)</h3>")
        out.append('<div class="sub">pass / fail: what each rule alone says about every clip that has the '
                   "score, applied or not (a what-if for retuning; a clip can fail several rules).</div>")
        out.append(_table(["rule", "keep when", "applied", "reject reason", "clips scored", "pass", "fail",
                           "fail hours"], rows, {4, 5, 6, 7}))
    else:
        out.append('<div class="sub">run.json has no filter_rules: no thresholds drawn.</div>')
    figs = [f"<figure>{_img(plots.histogram_figure(name, col), name)}</figure>" for name, col in sc["columns"].items()]
    out.append('<div class="grid">' + "".join(figs) + "</div>")
    if sc["skipped_all_null"]:
        out.append(f'<div class="sub">All null, not plotted: {escape(", ".join(sc["skipped_all_null"]))}</div>')
    rows = []
    for name, col in sc["columns"].items():
        k, r = col["kept"], col["rejected"]
        rows.append([escape(name), fmt.n(k["n"]), fmt.num(k["p05"]), fmt.num(k["p50"]), fmt.num(k["p95"]),
                     fmt.n(k["null"]), fmt.n(r["n"]), fmt.num(r["p05"]), fmt.num(r["p50"]), fmt.num(r["p95"]),
                     fmt.n(r["null"])])
    out.append("<details><summary>Quantiles</summary>" + _table(
        ["column", "kept n", "p5", "p50", "p95", "null", "rejected n", "p5", "p50", "p95", "null"], rows,
        set(range(1, 11))) + "</details>")
    return "\n".join(out)


def _sources(s: dict) -> str:
    src = s["sources"]
    out = [f"<h2>Per source ({fmt.n(src['n_sources'])})</h2>", _img(plots.sources_figure(src["sources"]), "sources")]
    rows = []
    for r in src["sources"][:200]:
        reasons = "<br>".join(f"{escape(x['stage'])}: {escape(x['reason'])} ({fmt.n(x['count'])})"
                              for x in r["top_reject_reasons"])
        rows.append([escape(r["source"]), fmt.n(r["inputs"]), fmt.hours(r["input_hours"]), fmt.n(r["inputs_kept"]),
                     fmt.n(r["clips_kept"]), fmt.hours(r["kept_hours"]), fmt.pct(r["kept_hours"], r["input_hours"]),
                     reasons])
    out.append(_table(["source", "inputs", "hours in", "inputs kept", "clips kept", "hours kept", "yield",
                       "top reject reasons"], rows, {1, 2, 3, 4, 5, 6}))
    if src["n_sources"] > len(rows):
        out.append(f'<div class="sub">{fmt.n(src["n_sources"] - len(rows))} more sources in stats.json.</div>')
    return "\n".join(out)


def _contact(s: dict, thumbs: dict) -> str:
    out = ["<h2>Contact sheet</h2>", "<h3>Kept clips (first and middle frame)</h3>"]
    items = []
    for t in thumbs["kept"]:
        imgs = "".join(_img(b, t["key"], "", "image/jpeg") for b in t["thumbs"])
        note = f'<br><i>{escape(t["note"])}</i>' if t["note"] else ""
        items.append(f'<div class="thumb">{imgs}<br>{escape(t["key"])} · {fmt.num(t["duration_s"])} s{note}</div>')
    out.append('<div class="thumbs">' + ("".join(items) or "<p>No kept clips could be read.</p>") + "</div>")
    for note in thumbs["kept_notes"]:
        out.append(f'<div class="sub">{escape(note)}</div>')
    out.append("<h3>Rejected inputs, top reasons</h3>")
    for grp in thumbs["rejected"]:
        items = []
        for ex in grp["examples"]:
            body = _img(ex["thumb"], ex["uri"], "", "image/jpeg") if ex["thumb"] else f'<i>{escape(ex["note"])}</i>'
            items.append(f'<div class="thumb">{body}<br>{escape(ex["uri"])}</div>')
        out.append(f'<div><b>{escape(grp["stage"])}: {escape(grp["reason"])}</b> ({fmt.n(grp["count"])})</div>'
                   f'<div class="thumbs">{"".join(items)}</div>')
    if not thumbs["rejected"]:
        out.append("<p>No rejections.</p>")
    return "\n".join(out)


def _run(s: dict) -> str:
    r = s["run"]
    out = ["<h2>Run</h2>"]
    facts = [("wall time", fmt.seconds(r["wall_s"])), ("inputs / s", fmt.num(r["inputs_per_s"])),
             ("video hours per wall hour", fmt.num(r["video_hours_per_wall_hour"])),
             ("Ray nodes used", fmt.n(r["nodes_used"])), ("finished", escape(str(r["finished"]))),
             ("config fingerprint", escape(str(r["config_fingerprint"]))),
             ("command", escape(" ".join(r["argv"] or [])))]
    out.append(_table(["fact", "value"], [[a, b] for a, b in facts]))
    if r["resumed"]:
        out.append(f'<div class="warn">Resumed run: stage times cover only the {fmt.n(r["inputs_this_run"])} '
                   "inputs processed by the last attempt.</div>")
    rows = [[escape(x["stage"]), fmt.seconds(x["seconds"]), fmt.pct(x["share"], 1), fmt.n(x["inputs_in"]),
             fmt.hours(x["hours_in"]), fmt.num(x["inputs_per_s"]), fmt.num(x["video_s_per_s"])] for x in r["stages"]]
    out.append("<h3>Per stage (summed task time)</h3>")
    out.append(_table(["stage", "time", "share", "inputs in", "hours in", "inputs / s", "video s / s"], rows,
                      {1, 2, 3, 4, 5, 6}) if rows else "<p>No stage timings in run.json.</p>")
    out.append("<h3>Models (from sampled meta.json)</h3>")
    out.append(_table(["model", "id"], [[escape(k), escape(", ".join(v))] for k, v in s["models"].items()])
               if s["models"] else "<p>No meta.json could be read.</p>")
    out.append("<h3>Versions</h3>")
    out.append(_table(["package", "version"], [[escape(k), escape(str(v))] for k, v in r["versions"].items()]))
    config = escape(json.dumps(r["config"], indent=1))
    out.append(f"<details><summary>Config</summary><pre>{config}</pre></details>")
    return "\n".join(out)


def _compare(s: dict) -> str:
    c = s.get("compare")
    if not c:
        return ""
    out = [f"<h2>Compared with {escape(c['other_path'])}</h2>",
           '<div class="sub">Deltas are this run minus the other. A clip <i>entered</i> the kept set when it is '
           "kept here and not there; it <i>left</i> when it was kept there and is not here.</div>"]
    rows = [[escape(x["label"]), fmt.n(x["inputs_other"]), fmt.n(x["inputs_this"]), _signed(x["inputs_delta"]),
             fmt.n(x["clips_other"]), fmt.n(x["clips_this"]), _signed(x["clips_delta"]),
             fmt.hours(x["clip_hours_this"] if x["clip_hours_this"] is not None else x["input_hours_this"]),
             _signed(x["clip_hours_delta"] if x["clip_hours_delta"] is not None else x["input_hours_delta"], fmt.hours)]
            for x in c["funnel"]]
    out.append(_table(["level", "inputs other", "inputs this", "Δ", "clips other", "clips this", "Δ",
                       "hours this", "Δ hours"], rows, set(range(1, 9))))
    k = c["kept"]
    out.append(f"<p>Kept in both: {fmt.n(k['both'])} clips ({fmt.hours(k['both_hours'])} h). "
               f"Entered: <b>{fmt.n(k['entered'])}</b> ({fmt.hours(k['entered_hours'])} h). "
               f"Left: <b>{fmt.n(k['left'])}</b> ({fmt.hours(k['left_hours'])} h).</p>")
    for title, keys, reasons in (("Left the kept set", k["left_examples"], k["left_reasons"]),
                                 ("Entered the kept set", k["entered_examples"], k["entered_reasons_in_other"])):
        if not keys:
            continue
        why = "what this run did with them" if title.startswith("Left") else "what the other run did with them"
        out.append(f"<h3>{title}</h3><div class=sub>{why}:</div>")
        out.append(_table(["stage", "reason", "clips"],
                          [[escape(x["stage"]), escape(x["reason"]), fmt.n(x["count"])] for x in reasons], {2}))
        out.append(f'<div class="sub">examples: {escape(", ".join(keys))}</div>')
    changed = [x for x in c["rejections"] if x["count_delta"]]
    if changed:
        out.append("<h3>Rejection counts that changed</h3>")
        out.append(_table(["stage", "reason", "unit", "other", "this", "Δ"],
                          [[escape(x["stage"]), escape(x["reason"]), x["unit"], fmt.n(x["count_other"]),
                            fmt.n(x["count_this"]), _signed(x["count_delta"])] for x in changed], {3, 4, 5}))
    if c["scores"]:
        out.append("<h3>Kept-clip score distributions, both runs</h3>")
        figs = [f"<figure>{_img(plots.overlay_figure(v['label'], v['edges'], v['this'], v['other']), name)}</figure>"
                for name, v in c["scores"].items()]
        out.append('<div class="grid">' + "".join(figs) + "</div>")
    return "\n".join(out)


def _identities(s: dict) -> str:
    from .identities import html_section

    return html_section(s)


def _duplicates(s: dict) -> str:
    dup = s.get("duplicates")
    if not dup:
        return ""
    rows = [[escape(g["group_id"]), escape(m["key"]), m["rank"], escape(m["status"] or ""),
             escape("+".join(m["signals"])), fmt.num(m["audio_ber"]), fmt.num(m["phash_bits"])]
            for g in dup["listed"] for m in g["members"]]
    return "\n".join([f"<h2>Duplicate groups ({fmt.n(dup['groups'])})</h2>",
                      f'<div class="sub">{fmt.n(dup["clips_in_groups"])} clips in groups; {fmt.n(dup["duplicates"])} '
                      "are duplicates of a better-ranked member (jobs/dedup.py). Signals: what tied a clip to its "
                      "group (audio fingerprint, perceptual hash, identity).</div>",
                      _table(["group", "clip", "rank", "status", "signals", "audio BER", "phash bits"], rows,
                             {2, 5, 6})])


def render(s: dict, thumbs: dict) -> str:
    title = escape(f"Dataset report: {s['dataset']['name'] or s['dataset']['path']}")
    body = "\n".join([_header(s), _funnel(s), _compare(s), _scores(s), _identities(s), _duplicates(s), _sources(s),
                       _contact(s, thumbs), _run(s)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{CSS}</style></head><body><main>\n{body}\n</main></body></html>\n")
