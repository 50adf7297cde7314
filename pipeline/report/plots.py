"""Figures as base64 PNG for the self-contained page (matplotlib, Agg, no pyplot state).

Plots draw from the already-binned numbers of stats.json (histograms are computed with numpy
in stats.py), so plotting cost does not grow with the number of clips.
"""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI; set before any figure exists
from matplotlib.figure import Figure  # noqa: E402

import numpy as np  # noqa: E402

from . import fmt  # noqa: E402

KEPT, REJECTED, OTHER = "#2b7bba", "#d6604d", "#7a7a7a"
DPI = 96


def to_png_b64(fig: Figure, tight: bool = True) -> str:
    """``tight=False`` for the many small histograms: fixed margins render in half the time."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    return base64.b64encode(buf.getvalue()).decode()


def _small_figure() -> Figure:
    fig = Figure(figsize=(3.6, 2.4))
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.89)
    return fig


def funnel_figure(levels: list[dict]) -> str:
    fig = Figure(figsize=(7.5, 2.8))
    ax = fig.add_subplot()
    y = np.arange(len(levels))[::-1]
    in_h = [lv["input_hours"] for lv in levels]
    clip_h = [lv["clip_hours"] or 0 for lv in levels]
    ax.barh(y + 0.18, in_h, height=0.36, color="#9ecae1", label="source hours of the inputs at this level")
    ax.barh(y - 0.18, clip_h, height=0.36, color=KEPT, label="clip hours")
    top = max(in_h + clip_h + [1e-9])
    for yi, lv in zip(y, levels):
        text = f"{lv['inputs']:,} inputs"
        if lv["clips"] is not None:
            text += f", {lv['clips']:,} clips"
        ax.text(top * 1.02, yi, text, va="center", fontsize=8)
    ax.set_yticks(y, [lv["label"] for lv in levels])
    ax.set_xlim(0, top * 1.45)
    ax.set_xlabel("hours")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png_b64(fig)


def rejections_figure(rejections: list[dict], top: int = 15) -> str | None:
    rows = sorted(rejections, key=lambda r: -r["count"])[:top]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 0.32 * len(rows) + 0.8))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r["count"] for r in rows], color=[OTHER if r["unit"] == "input" else REJECTED for r in rows])
    labels = [f"{r['stage']}: {r['reason'][:48]} ({r['unit']})" for r in rows]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("rejected (grey: inputs, red: clips)")
    ax.spines[["top", "right"]].set_visible(False)
    return to_png_b64(fig)


def _threshold_lines(ax, thresholds: list[dict]) -> None:
    for r in thresholds:
        values = (-r["value"], r["value"]) if r["op"] == "abs<=" else (r["value"],)
        style = dict(color="black", lw=1.2, ls="-") if r["applied"] else dict(color=OTHER, lw=1.0, ls="--")
        for i, v in enumerate(values):
            label = f"keep {fmt.rule(r)}" + ("" if r["applied"] else " (not applied)") if i == 0 else None
            ax.axvline(v, label=label, **style)


def _share(hist: dict, n: int) -> np.ndarray:
    c = np.asarray(hist["counts"], dtype=float)
    return c / n if n else c


def histogram_figure(name: str, col: dict) -> str:
    """Kept vs rejected as the share of each group per bin (the groups differ a lot in size)."""
    fig = _small_figure()
    ax = fig.add_subplot()
    edges = np.asarray(col["edges"])
    for group, color in (("kept", KEPT), ("rejected", REJECTED)):
        g = col[group]
        if g["n"]:
            ax.stairs(_share(g["hist"], g["n"]), edges, color=color, fill=True, alpha=0.35)
            ax.stairs(_share(g["hist"], g["n"]), edges, color=color, label=f"{group} (n={g['n']:,})")
    _threshold_lines(ax, col["thresholds"])
    ax.set_title(col["label"], fontsize=9)
    ax.set_ylabel("share of group", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png_b64(fig, tight=False)


def overlay_figure(label: str, edges: list[float], this: dict, other: dict, names=("this run", "other run")) -> str:
    """Kept-clip distributions of two runs on the same bins (compare mode)."""
    fig = _small_figure()
    ax = fig.add_subplot()
    e = np.asarray(edges)
    for hist, n, color, name in ((this["counts"], this["n"], KEPT, names[0]),
                                 (other["counts"], other["n"], "#e08214", names[1])):
        if n:
            ax.stairs(np.asarray(hist, float) / n, e, color=color, lw=1.5, label=f"{name} (n={n:,})")
    ax.set_title(label + " (kept)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png_b64(fig, tight=False)


def sources_figure(sources: list[dict], top: int = 15) -> str | None:
    rows = sources[:top]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 0.3 * len(rows) + 0.9))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    ax.barh(y + 0.2, [r["input_hours"] for r in rows], height=0.4, color="#9ecae1", label="hours in")
    ax.barh(y - 0.2, [r["kept_hours"] for r in rows], height=0.4, color=KEPT, label="hours kept")
    ax.set_yticks(y, [_short(r["source"]) for r in rows], fontsize=7)
    ax.set_xlabel("hours")
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png_b64(fig)


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]
