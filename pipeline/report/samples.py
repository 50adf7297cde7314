"""Contact-sheet thumbnails: a few kept clips from the shards, a few rejected source files.

This is the only part of the report that touches video, so it is bounded: a fixed number of
samples, a cap on decoded frames per thumbnail, and every failure becomes a note instead of an
error (a report about a dataset full of broken files must still render).
"""
from __future__ import annotations

import base64
import io
import json
import os
import posixpath
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .load import RunData

THUMB_PX = 144
MAX_DECODE_FRAMES = 300  # after a seek: at most one x264 GOP (keyint 250) plus slack


def _jpeg_b64(frame) -> str:
    img = frame.to_image()  # PIL (Pillow ships with matplotlib)
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


def decode_thumbs(src, times_s: list[float]) -> list[str]:
    """JPEG base64 thumbnails of the first frame at or after each time (seconds from the start).

    ``src`` is a path or a file-like object (PyAV reads both: ``av.open(io.BytesIO(data))``).
    """
    import av

    out = []
    with av.open(src) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        for t in times_s:
            if t > 0:
                container.seek(int((start + t) / stream.time_base), stream=stream, backward=True)
            frame = None
            for i, f in enumerate(container.decode(stream)):
                frame = f
                if f.time is None or f.time >= start + t - 1e-3 or i >= MAX_DECODE_FRAMES:
                    break
            if frame is None:
                raise ValueError("no frame decoded")
            out.append(_jpeg_b64(frame))
    return out


def _pick(n_rows: int, k: int, seed: int = 0) -> np.ndarray:
    """k row numbers spread over the table, the same on every run (reports are diffable)."""
    if n_rows <= k:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=k, replace=False))


def sample_kept(data: RunData, k: int = 6) -> tuple[list[dict], dict, list[str]]:
    """(thumbnail rows, model ids seen in their meta.json, notes)."""
    m = data.manifest
    notes: list[str] = []
    if m.num_rows == 0:
        return [], {}, ["no kept clips"]
    # Only rows whose shard exists: outputs are sometimes partly deleted or synced. One listing
    # per shard directory, not one stat per shard (a thousand round trips on object storage).
    shards = [s for s in pc.unique(m["shard"]).to_pylist() if s]
    listed: set[str] = set()
    for d in {posixpath.dirname(s) for s in shards}:
        if data.fs.isdir(data.join(d)):
            listed.update(posixpath.basename(p) for p in data.fs.ls(data.join(d), detail=False))
    present = [s for s in shards if posixpath.basename(s) in listed]
    if len(present) < len(shards):
        notes.append(f"{len(shards) - len(present)} of {len(shards)} shards named in manifest.parquet are missing")
    rows_tbl = m.filter(pc.is_in(m["shard"], value_set=pa.array(present, pa.string()))) if present else m.slice(0, 0)
    picked = rows_tbl.take(_pick(rows_tbl.num_rows, k)).select(["key", "shard", "source", "duration_s"]).to_pylist()
    by_shard: dict[str, list[dict]] = {}
    for row in picked:
        by_shard.setdefault(row["shard"], []).append(row)
    models: dict[str, set] = {}
    out = []
    for shard, rows in sorted(by_shard.items()):
        wanted = {r["key"]: r for r in rows}
        found: dict[str, dict] = {}
        try:
            with data.fs.open(data.join(shard), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for member in tf:  # headers only; an uncompressed tar seeks past the data
                    key, _, suffix = member.name.partition(".")
                    if key in wanted and suffix in ("video.mp4", "meta.json"):
                        found.setdefault(key, {})[suffix] = tf.extractfile(member).read()
                        if len(found) == len(wanted) and all(len(v) == 2 for v in found.values()):
                            break
        except Exception as e:  # noqa: BLE001 - a broken shard is a note in the report
            notes.append(f"{shard}: {type(e).__name__}: {e}")
            continue
        for key, row in wanted.items():
            members = found.get(key, {})
            item = {"key": key, "shard": shard, "source": row["source"], "duration_s": row["duration_s"],
                    "thumbs": [], "note": None}
            try:
                meta = json.loads(members.get("meta.json", b"{}"))
            except ValueError:
                meta, item["note"] = {}, "meta.json is not valid JSON"
            item["profile"] = meta.get("profile")
            for name, model in (meta.get("models") or {}).items():
                models.setdefault(name, set()).add(str(model))
            if "video.mp4" not in members:
                item["note"] = "video.mp4 not found in the shard"
            else:
                try:
                    mid = (row["duration_s"] or 0) / 2
                    item["thumbs"] = decode_thumbs(io.BytesIO(members["video.mp4"]), [0.0, mid])
                except Exception as e:  # noqa: BLE001
                    item["note"] = f"could not decode video.mp4: {type(e).__name__}: {e}"
            out.append(item)
    out.sort(key=lambda x: x["key"])
    return out, {k: sorted(v) for k, v in sorted(models.items())}, notes


def _local_path(uri: str) -> str | None:
    """Source files are decoded only when local: a report must not fetch remote video."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        return None
    return uri


def sample_rejected(data: RunData, reasons: list[dict], per_reason: int = 2) -> list[dict]:
    """For each (stage, reason) given: up to ``per_reason`` rejected inputs with a thumbnail or a note."""
    r = data.rejects
    out = []
    for reason in reasons:
        mask = pc.and_(pc.equal(r["stage"], reason["stage"]), pc.equal(r["reason"], reason["reason"]))
        rows = r.filter(pc.fill_null(mask, False))
        examples = []
        for row in rows.take(_pick(rows.num_rows, per_reason)).to_pylist():
            ex = {"uri": row["uri"], "key": row["key"], "clip_index": row["clip_index"], "thumb": None, "note": None}
            path = _local_path(row["uri"] or "")
            if path is None:
                ex["note"] = "remote source: not fetched for the report"
            elif not os.path.isfile(path):
                ex["note"] = "source file is missing"
            else:
                t = _frame_time(data, row)
                try:
                    ex["thumb"] = decode_thumbs(path, [t])[0]
                    ex["time_s"] = t
                except Exception as e:  # noqa: BLE001 - unreadable sources are the usual reason
                    ex["note"] = f"no frame could be decoded ({type(e).__name__}: {str(e)[:80]})"
            examples.append(ex)
        out.append({"stage": reason["stage"], "reason": reason["reason"], "count": reason["count"],
                    "examples": examples})
    return out


def _frame_time(data: RunData, row: dict) -> float:
    """The middle of a rejected clip when scores give its start, else 10 % into the source file."""
    if row["clip_index"] is not None and row["clip_index"] >= 0:
        if data.scores is not None and row["key"] and "start_s" in data.scores.column_names:
            hit = data.scores.filter(pc.fill_null(pc.equal(data.scores["key"], row["key"]), False))
            if hit.num_rows and hit["start_s"][0].as_py() is not None:
                return float(hit["start_s"][0].as_py()) + float(hit["duration_s"][0].as_py() or 0) / 2
        hit = data.videos.filter(pc.fill_null(pc.equal(data.videos["uri"], row["uri"]), False))
        d = hit["duration_s"][0].as_py() if hit.num_rows else None
    else:
        d = row["duration_s"]  # an input-level reject carries the source duration
    return 0.1 * float(d) if d else 0.0
