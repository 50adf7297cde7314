"""Number formatting shared by the HTML page and report.md (so both print the same digits)."""
from __future__ import annotations


def n(x) -> str:
    return "–" if x is None else f"{int(x):,}"


def hours(h) -> str:
    if h is None:
        return "–"
    return f"{h:,.1f}" if h >= 100 else f"{h:,.3f}"


def pct(part, whole) -> str:
    if part is None or not whole:
        return "–"
    return f"{100.0 * part / whole:.1f} %"


def num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e12:
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def seconds(s) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def rule(r: dict) -> str:
    col = f"|{r['column']}|" if r["op"] == "abs<=" else r["column"]
    op = "<=" if r["op"] == "abs<=" else r["op"]
    return f"{col} {op} {r['value']:g}"
