"""report.html (self-contained: inline CSS, PNG data URIs, no script) and report.md of an eval run,
in the house style of the dataset report (pipeline/report: its CSS, table and figure helpers)."""
from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np

from pipeline.report import fmt
from pipeline.report.html import CSS, _img, _table
from pipeline.report.markdown import _table as md_table
from pipeline.report.plots import KEPT, REJECTED, to_png_b64

# The scores in the small-multiples figure and the headline cards.
KEY = ("sync_conf", "sync_dist", "sync_offset", "mouth_activity", "head_motion_var_mean", "expression_var_mean",
       "yaw_abs_max", "face_size_out_px")
THIS, OTHER = KEPT, REJECTED


def _num(x, digits: int = 3) -> str:
    return fmt.num(x, digits)


def _delta(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    return ("+" if x > 0 else "") + fmt.num(x, digits)


def _values(rows, col):
    return np.array([r[col] for r in rows if r.get("status") == "ok" and r.get(col) is not None], np.float64)


def scores_figure(rows, other_rows=None, labels=("this run", "compared")) -> str:
    """Small multiples: each video's value of a key score, one column of points per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.6))
    axes = fig.subplots(2, 4).ravel()
    rng = np.random.default_rng(0)
    from .run import SCORE_LABELS

    for ax, col in zip(axes, KEY):
        runs = [(rows, THIS, labels[0])] + ([(other_rows, OTHER, labels[1])] if other_rows is not None else [])
        for x, (rr, color, label) in enumerate(runs):
            v = _values(rr, col)
            if len(v):
                ax.scatter(x + rng.uniform(-0.12, 0.12, len(v)), v, s=14, color=color, alpha=0.75, label=label)
                ax.hlines(np.median(v), x - 0.25, x + 0.25, color="black", lw=1.5)
        ax.set_xticks(range(len(runs)), [r[2] for r in runs], fontsize=7)
        ax.set_xlim(-0.6, len(runs) - 0.4)
        ax.set_title(SCORE_LABELS[col], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("per video (points) and median (bar)", fontsize=9)
    fig.tight_layout()
    return to_png_b64(fig)


def motion_figure(rows, other_rows=None, labels=("this run", "compared")) -> str | None:
    """Loopy's Glo vs Exp (head-motion vs expression variance), one point per video."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.4))
    ax = fig.add_subplot()
    any_point = False
    for rr, color, label in [(rows, THIS, labels[0])] + ([(other_rows, OTHER, labels[1])] if other_rows else []):
        pts = [(r["head_motion_var_mean"], r["expression_var_mean"]) for r in rr
               if r.get("status") == "ok" and r.get("head_motion_var_mean") is not None
               and r.get("expression_var_mean") is not None]
        if pts:
            any_point = True
            a = np.array(pts)
            ax.scatter(a[:, 0], a[:, 1], s=18, color=color, alpha=0.8, label=label)
    if not any_point:
        return None
    ax.set_xlabel("Glo: head-motion variance (px², 12-frame windows)", fontsize=8)
    ax.set_ylabel("Exp: expression variance (px²)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png_b64(fig)


def _frechet_text(s: dict, key: str) -> str:
    r = s[key]
    if r["value"] is not None:
        return f"{r['value']:.3f} ({r['model']}, {r['n']} vs {r.get('reference_n') or '?'} samples)"
    return f"not computed: {r['reason']}"


def render_html(rows: list[dict], s: dict, other_rows=None) -> str:
    sc, c = s["scores"], s.get("compare")
    labels = ("this run", f"compared: {c['other_name']}" if c else "")
    out = [f"<h1>Evaluation: {escape(s['name'])}</h1>",
           f'<div class="sub">{escape(s["out"])} · profile {escape(s["profile"])} · crop {escape(s["crop"])} · '
           f'pipeline {escape(str(s["pipeline_version"]))} · eval {escape(s["eval_version"])} · '
           f'{escape(s["created"])}</div>']
    if s["profile"] == "smoke":
        out.append('<div class="warn">smoke profile: DWPose (and SyncNet unless --syncnet-weights was given) are '
                   "tiny random models; their numbers are not meaningful.</div>")
    for e in s["videos"]["error_list"]:
        out.append(f'<div class="warn bad">{escape(e["video"])}: {escape(e["error"])} '
                   f'({escape(e["detail"] or "")})</div>')
    cards = [("videos scored", f'{s["videos"]["scored"]} / {s["videos"]["inputs"]}'),
             ("Sync-C mean", _num(sc["sync_conf"]["mean"])), ("Sync-D mean", _num(sc["sync_dist"]["mean"])),
             ("|offset| mean", _num(sc["sync_offset"].get("abs_mean"))),
             ("Glo mean", _num(sc["head_motion_var_mean"]["mean"])), ("Exp mean", _num(sc["expression_var_mean"]["mean"])),
             ("FID", _num(s["fid"]["value"])), ("FVD", _num(s["fvd"]["value"])),
             ("pass curation rules", f'{s["curation_pass"]["n"]} / {s["curation_pass"]["of"]}')]
    out.append('<div class="cards">' + "".join(f"<div class=card><b>{v}</b><span>{escape(t)}</span></div>"
                                               for t, v in cards) + "</div>")
    out.append("<h2>Scores</h2>")
    out.append('<div class="sub">Over the scored videos. Definitions: docs/evaluation.md and docs/scoring.md '
               "(the curation job's scorers, imported).</div>")
    out.append(_table(["score", "n", "mean", "median", "std", "min", "max"],
                      [[escape(v["label"]), fmt.n(v["n"]), _num(v["mean"]), _num(v["median"]), _num(v["std"]),
                        _num(v["min"]), _num(v["max"])] for v in sc.values()], {1, 2, 3, 4, 5, 6}))
    out.append(f'<p>FID: {escape(_frechet_text(s, "fid"))}<br>FVD: {escape(_frechet_text(s, "fvd"))}</p>')
    if c:
        out.append(f"<h2>Compared with {escape(str(c['other_name']))}</h2>")
        out.append(f'<div class="sub">{escape(c["other_path"])} · profile {escape(str(c["other_profile"]))} · '
                   f'{c["videos"]["other"]} videos there, {c["videos"]["this"]} here; Δ = this − other</div>')
        out.append(_table(["score", "mean (this)", "mean (other)", "Δ mean", "median (this)", "median (other)",
                           "Δ median"],
                          [[escape(r["label"]), _num(r["mean_this"]), _num(r["mean_other"]), _delta(r["mean_delta"]),
                            _num(r["median_this"]), _num(r["median_other"]), _delta(r["median_delta"])]
                           for r in c["scores"]], {1, 2, 3, 4, 5, 6}))
        f = c["frechet"]
        out.append(f"<p>FID: {_num(f['fid']['this'])} here, {_num(f['fid']['other'])} there · "
                   f"FVD: {_num(f['fvd']['this'])} here, {_num(f['fvd']['other'])} there</p>")
    out.append("<h2>Plots</h2>")
    out.append('<div class="grid" style="grid-template-columns:1fr">'
               f"<figure>{_img(scores_figure(rows, other_rows, labels), 'scores per video')}</figure></div>")
    mf = motion_figure(rows, other_rows, labels)
    if mf:
        out.append(f'<figure style="max-width:520px;margin:8px 0">{_img(mf, "Glo vs Exp")}</figure>')
    out.append("<h2>Videos</h2>")
    vrows = []
    for r in rows:
        ok = r["status"] == "ok"
        vrows.append([escape(r["video"]), escape(r["status"] if ok else f"error: {r['error']}"),
                      _num(r.get("sync_conf")), _num(r.get("sync_dist")), fmt.num(r.get("sync_offset")),
                      _num(r.get("head_motion_var_mean")), _num(r.get("expression_var_mean")),
                      _num(r.get("yaw_abs_max")), _num(r.get("face_size_out_px")), _num(r.get("complete_frac")),
                      fmt.num(r.get("n_frames")),
                      escape("yes" if r.get("curation_pass") else (r.get("curation_failed_rules") or "–")),
                      escape(r.get("notes") or r.get("error_detail") or "")])
    out.append(_table(["video", "status", "Sync-C", "Sync-D", "offset", "Glo", "Exp", "|yaw| max", "face px",
                       "complete", "frames", "curation rules", "notes"], vrows, set(range(2, 11))))
    out.append("<h2>Models</h2>")
    out.append(_table(["role", "model"], [[escape(k), escape(str(v))] for k, v in s["models"].items()]))
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>Evaluation: {escape(s["name"])}</title>'
            f"<style>{CSS}</style></head><body><main>\n{body}\n</main></body></html>\n")


def render_md(rows: list[dict], s: dict) -> str:
    sc, c = s["scores"], s.get("compare")
    out = [f"# Evaluation: {s['name']}", "",
           f"`{s['out']}` · profile `{s['profile']}` · crop `{s['crop']}` · {s['videos']['scored']} of "
           f"{s['videos']['inputs']} videos scored · {s['curation_pass']['n']} pass the curation rules", ""]
    if s["profile"] == "smoke":
        out += ["> smoke profile: tiny random DWPose (and SyncNet unless --syncnet-weights was given): "
                "numbers without meaning.", ""]
    out += [f"> {e['video']}: {e['error']} ({e['detail']})" for e in s["videos"]["error_list"]]
    out += [""] if s["videos"]["error_list"] else []
    out += md_table(["score", "n", "mean", "median", "min", "max"],
                    [[v["label"], fmt.n(v["n"]), _num(v["mean"]), _num(v["median"]), _num(v["min"]), _num(v["max"])]
                     for k, v in sc.items() if v["n"]])
    out += [f"FID: {_frechet_text(s, 'fid')}", "", f"FVD: {_frechet_text(s, 'fvd')}", ""]
    if c:
        out += [f"## Compared with `{c['other_path']}` (Δ = this − other)", ""]
        out += md_table(["score", "mean (this)", "mean (other)", "Δ mean", "median (this)", "median (other)",
                         "Δ median"],
                        [[r["label"], _num(r["mean_this"]), _num(r["mean_other"]), _delta(r["mean_delta"]),
                          _num(r["median_this"]), _num(r["median_other"]), _delta(r["median_delta"])]
                         for r in c["scores"]])
    out += ["Models: " + ", ".join(f"{k} = `{v}`" for k, v in s["models"].items()), ""]
    return "\n".join(out)


def write(out: Path, rows: list[dict], summary: dict, other_rows=None) -> None:
    (Path(out) / "report.html").write_text(render_html(rows, summary, other_rows), encoding="utf-8")
    (Path(out) / "report.md").write_text(render_md(rows, summary), encoding="utf-8")
