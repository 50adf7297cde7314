"""Expand ``--input`` arguments into (uri, source) pairs.

Accepted: directories (searched recursively), glob patterns, a ``.txt`` file of URIs (one per
line, ``#`` comments), a ``.parquet`` file with a ``uri`` column (and optionally ``source``),
or single files. Local paths and any fsspec URI (s3://, gs://, ...) go through the same code:
fsspec's filesystem for the URI's protocol does the listing. Every file found is an input:
non-video files are rejected by the probe stage with a reason rather than filtered out by
extension, so nothing disappears without a rejects row. Hidden files are skipped.

A broken entry is never dropped and never aborts the job: an entry of a list that does not
exist, a directory named like a video, a symlink (loop or not) are inputs like any other, and
the probe stage turns each into a rejects row saying what is wrong (``check_input``). Only a
direct ``--input`` argument that matches nothing is an ``InputError`` (a mistyped argument).
Directory symlinks are listed, not followed (fsspec's local ``find`` walks with
``os.walk(followlinks=False)``): following them could loop or count a file twice, and each one
is reported instead, so a linked directory the user meant is visible; pass it as its own
``--input`` to include it.
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


# A directory found while searching with one of these names is reported as an input ("not a
# file") instead of being passed over in silence: someone meant it to be a video.
VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mov .mkv .webm .avi .ts .mts .m2ts .mpg .mpeg .flv .wmv .3gp .mxf".split())


def _named_like_video(path: str) -> bool:
    return os.path.splitext(path.rstrip("/"))[1].lower() in VIDEO_EXTENSIONS


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


def _search(fs, root: str) -> list[str]:
    """Files under ``root`` (not hidden), plus the directories the probe stage must report:
    those named like a video (VIDEO_EXTENSIONS) and, on a local filesystem, those this user
    cannot list. Sorted."""
    found = []
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    for p, info in fs.find(root, withdirs=True, detail=True).items():
        if p.rstrip("/") == root.rstrip("/") or _hidden(os.path.relpath(p, root)):
            continue
        if info.get("type") != "directory" or _named_like_video(p):
            found.append(p)
        elif local and not os.access(p, os.R_OK | os.X_OK):
            # fsspec's walk omits a directory it cannot list: reported instead ("permission denied")
            found.append(p)
    return sorted(set(found))


def expand_inputs(args: list[str], stats: dict | None = None) -> list[InputItem]:
    """Inputs in order, each once. ``stats`` (a dict, optional) receives what was folded away:
    ``duplicates`` (entries naming an input already listed) and ``blank_entries`` (empty lines
    of a .txt list, empty ``uri`` cells of a .parquet list), so the run summary can count them."""
    items: list[InputItem] = []
    seen: set[str] = set()
    counts = {"duplicates": 0, "blank_entries": 0}

    def add(uri: str, source: str):
        if uri not in seen:
            seen.add(uri)
            items.append(InputItem(uri=uri, source=source, video_id=video_id_for(uri)))
        else:
            counts["duplicates"] += 1

    for arg in args:
        fs, path = _fs_and_path(arg)
        # A pattern only when no file or directory has that literal name ("talk [1080p].mp4").
        if any(ch in arg for ch in "*?[") and not fs.exists(path):
            matches = sorted(fs.glob(path))
            if not matches:
                raise InputError(f"--input {arg}: the pattern matches no file")
            for m in matches:
                if fs.isdir(m) and not _named_like_video(m):  # searched like a directory argument
                    for p in _search(fs, m):
                        add(_unstrip(fs, p, arg), arg)
                elif not _hidden(os.path.basename(m)):
                    add(_unstrip(fs, m, arg), arg)
        elif fs.isdir(path):
            found = _search(fs, path)
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
                for u, s in zip(uris, sources):
                    if u is None or not str(u).strip():  # a blank entry, like an empty line of a .txt
                        counts["blank_entries"] += 1
                        continue
                    add(_list_entry(str(u).strip()), str(s) if s is not None else arg)
            elif arg.endswith(".txt"):
                with fs.open(path, "r") as f:
                    for line in f:
                        line = line.strip()
                        if not line:
                            counts["blank_entries"] += 1
                        elif not line.startswith("#"):
                            add(_list_entry(line), arg)
            else:
                add(_unstrip(fs, path, arg), os.path.dirname(arg) or ".")
        else:
            raise InputError(f"--input {arg}: no such file, directory or pattern")
    if stats is not None:
        stats.update(counts)
    return items


def _list_entry(entry: str) -> str:
    """A list entry as an input URI: local paths made absolute, so FFmpeg never reads a name
    like ``-x.mp4`` or ``concat:a|b`` as an option or a protocol. Whether it exists is the
    probe stage's question (a missing entry is a rejects row, not an aborted job)."""
    if "://" in entry and not entry.startswith("file://"):
        return entry
    path = entry[len("file://"):] if entry.startswith("file://") else entry
    return os.path.abspath(path)
