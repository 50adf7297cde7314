"""Identity counts of the report (docs/identity.md): from identities.parquet at the output root, written by
``jobs/identities.py``; absent outputs show a note instead. Numbers (``identity_counts``) and their HTML and
markdown sections live together here so the report's other modules only call them."""
from __future__ import annotations

import json
from html import escape

import numpy as np

from . import fmt

IDENTITIES_FILE = "identities.parquet"


def read(fs, path: str):
    """(table with key/identity_id/cluster_size, file metadata dict) or (None, {}) when the file is absent."""
    import pyarrow.parquet as pq

    if not fs.exists(path):
        return None, {}
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        table = pf.read(columns=["key", "identity_id", "cluster_size"])
        meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
    return table, meta


def _bins(max_size: int) -> list[tuple[int, int]]:
    """Clips-per-identity bins: 1, 2, 3-4, 5-8, 9-16, ... (powers of two) up to the largest identity."""
    bins, lo = [(1, 1)], 2
    while lo <= max_size:
        hi = 2 * lo - 2 if lo > 2 else 2
        bins.append((lo, hi))
        lo = hi + 1
    return bins


def identity_counts(data) -> dict:
    """{"present": False} or the identity counts: identities, clips, histogram of clips per identity (identities
    and clips in each bin), the largest identities, singletons, the threshold and model used."""
    table = getattr(data, "identities", None)
    if table is None:
        return {"present": False}
    meta = getattr(data, "identities_meta", {}) or {}
    ids = np.asarray(table["identity_id"].to_numpy(zero_copy_only=False), np.int64)
    sizes = np.bincount(ids)[np.unique(ids)] if len(ids) else np.zeros(0, np.int64)
    hist = []
    for lo, hi in _bins(int(sizes.max()) if len(sizes) else 1):
        sel = (sizes >= lo) & (sizes <= hi)
        hist.append({"clips_min": lo, "clips_max": hi, "identities": int(sel.sum()), "clips": int(sizes[sel].sum())})
    kept = set(data.manifest["key"].to_pylist()) if data.manifest is not None else set()
    keys = set(table["key"].to_pylist())
    facts = json.loads(meta.get("facts", "{}") or "{}")
    return {"present": True, "n_clips": int(len(ids)), "n_identities": int(len(sizes)),
            "singletons": int((sizes == 1).sum()), "largest": sorted((int(x) for x in sizes), reverse=True)[:10],
            "clips_per_identity_median": float(np.median(sizes)) if len(sizes) else None,
            "histogram": hist, "threshold": float(meta["threshold"]) if meta.get("threshold") else None,
            "identity_model": meta.get("identity_model") or None, "method": facts.get("method"),
            "without_embedding": facts.get("n_without_embedding"),
            "kept_not_in_file": len(kept - keys), "in_file_not_kept": len(keys - kept)}


def note(ident: dict) -> str | None:
    if not ident["present"]:
        return "identities.parquet is absent: run `python jobs/identities.py DIR` for identity counts."
    if ident["kept_not_in_file"] or ident["in_file_not_kept"]:
        return (f"identities.parquet does not match the kept set ({ident['kept_not_in_file']} kept clips missing, "
                f"{ident['in_file_not_kept']} clips no longer kept): re-run jobs/identities.py after refilter/dedup.")
    return None


def _label(b: dict) -> str:
    return str(b["clips_min"]) if b["clips_min"] == b["clips_max"] else f"{b['clips_min']}–{b['clips_max']}"


def html_section(s: dict) -> str:
    ident = s.get("identities") or {"present": False}
    out = ["<h2>Identities</h2>"]
    if not ident["present"]:
        return out[0] + f"<p>{escape(note(ident))}</p>"
    out.append(f'<div class="sub">{fmt.n(ident["n_clips"])} kept clips in {fmt.n(ident["n_identities"])} identities '
               f'({fmt.n(ident["singletons"])} with one clip; median {fmt.num(ident["clips_per_identity_median"])} clips '
               f'per identity; largest {", ".join(fmt.n(x) for x in ident["largest"])}). ArcFace cosine &ge; '
               f'{fmt.num(ident["threshold"])}, connected components ({escape(str(ident["method"]))}), model '
               f'{escape(str(ident["identity_model"]))}; clips without an embedding: '
               f'{fmt.n(ident["without_embedding"])} (each its own identity).</div>')
    rows = [[_label(b), fmt.n(b["identities"]), fmt.n(b["clips"])] for b in ident["histogram"]]
    out.append("<h3>Clips per identity</h3>")
    head = "".join(f"<th>{h}</th>" for h in ("clips per identity", "identities", "clips"))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' for c in r) + "</tr>" for r in rows)
    out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    n = note(ident)
    if n:
        out.append(f'<div class="sub">{escape(n)}</div>')
    return "\n".join(out)


def markdown_lines(s: dict) -> list[str]:
    ident = s.get("identities") or {"present": False}
    if not ident["present"]:
        return []
    out = ["## Identities", "",
           f"{fmt.n(ident['n_clips'])} kept clips in {fmt.n(ident['n_identities'])} identities "
           f"({fmt.n(ident['singletons'])} with one clip; largest {', '.join(fmt.n(x) for x in ident['largest'])}); "
           f"ArcFace cosine >= {fmt.num(ident['threshold'])}, model `{ident['identity_model']}`.", "",
           "| clips per identity | identities | clips |", "|---:|---:|---:|"]
    out += [f"| {_label(b)} | {fmt.n(b['identities'])} | {fmt.n(b['clips'])} |" for b in ident["histogram"]]
    return out + [""]
