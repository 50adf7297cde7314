"""Expand ``--input`` arguments into (uri, source) pairs.

Accepted: directories (searched recursively), glob patterns, a ``.txt`` file of URIs (one per
line, ``#`` comments), a ``.parquet`` file with a ``uri`` column (and optionally ``source``),
or single files. Local paths and any fsspec URI (s3://, gs://, ...) go through the same code:
fsspec's filesystem for the URI's protocol does the listing. Every file found is an input:
non-video files are rejected by the probe stage with a reason rather than filtered out by
extension, so nothing disappears without a rejects row. Hidden files are skipped.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import fsspec


@dataclass(frozen=True)
class InputItem:
    uri: str
    source: str  # the input argument (or parquet `source` value) it came from: per-source stats
    video_id: str


def video_id_for(uri: str) -> str:
    """Stable id: readable stem + 16 hex chars (64 bits) of the URI's sha1, so that millions of files
    named alike (VoxCeleb's 00001.mp4 in every folder) still get distinct ids."""
    stem = os.path.splitext(os.path.basename(uri.rstrip("/")))[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:48] or "video"
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:16]}"


def _fs_and_path(arg: str):
    fs, path = fsspec.core.url_to_fs(arg)
    return fs, path


def _unstrip(fs, path: str, arg: str) -> str:
    """Turn a filesystem path back into a URI of the same protocol as the argument."""
    if "://" in arg and not arg.startswith("file://"):
        return fs.unstrip_protocol(path)
    return os.path.abspath(path) if not os.path.isabs(path) else path


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.replace("\\", "/").split("/") if part not in (".", ".."))


class InputError(ValueError):
    pass


def expand_inputs(args: list[str]) -> list[InputItem]:
    items: list[InputItem] = []
    seen: set[str] = set()

    def add(uri: str, source: str):
        if uri not in seen:
            seen.add(uri)
            items.append(InputItem(uri=uri, source=source, video_id=video_id_for(uri)))

    for arg in args:
        fs, path = _fs_and_path(arg)
        # A pattern only when no file or directory has that literal name ("talk [1080p].mp4").
        if any(ch in arg for ch in "*?[") and not fs.exists(path):
            matches = sorted(fs.glob(path))
            if not matches:
                raise InputError(f"--input {arg}: the pattern matches no file")
            for m in matches:
                if fs.isdir(m):  # a matched directory is searched like a directory argument
                    for p in sorted(fs.find(m)):
                        if not _hidden(os.path.relpath(p, m)):
                            add(_unstrip(fs, p, arg), arg)
                elif not _hidden(os.path.basename(m)):
                    add(_unstrip(fs, m, arg), arg)
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if not _hidden(os.path.relpath(p, path)))
            if not found:
                raise InputError(f"--input {arg}: the directory holds no file")
            for p in found:
                add(_unstrip(fs, p, arg), arg)
        elif fs.isfile(path):
            if arg.endswith(".parquet"):
                import pyarrow.parquet as pq

                with fs.open(path, "rb") as f:
                    table = pq.read_table(f)
                if "uri" not in table.column_names:
                    raise InputError(f"--input {arg}: parquet file has no 'uri' column (columns: {table.column_names})")
                uris = table.column("uri").to_pylist()
                sources = table.column("source").to_pylist() if "source" in table.column_names else [arg] * len(uris)
                empty = [i for i, u in enumerate(uris) if not u]
                if empty:
                    raise InputError(f"--input {arg}: {len(empty)} rows have an empty 'uri' (rows {empty[:10]})")
                for u, s in zip(uris, sources):
                    add(str(u), str(s) if s is not None else arg)
            elif arg.endswith(".txt"):
                with fs.open(path, "r") as f:
                    for line in f:
                        line = line.strip()
                        if line and not line.startswith("#"):
                            add(line, arg)
            else:
                add(_unstrip(fs, path, arg), os.path.dirname(arg) or ".")
        else:
            raise InputError(f"--input {arg}: no such file, directory or pattern")
    return items
