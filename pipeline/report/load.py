"""Read one curation output for the report: tables, run.json, index.json.

Only the parquet tables and the two small JSON files are read here (the shards are sampled
later, a few members only), and only the columns the report uses: on a million clips the
string columns we skip (uri, detail, timings) are most of the bytes.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

import schemas

# Columns per table that the report needs; a column absent from an older output is added as
# nulls so the statistics code never branches on the output's age.
MANIFEST_COLUMNS = ("key", "video_id", "source", "shard", "duration_s", "n_frames", "face_size_px",
                    "sample_bytes", "profile")
REJECTS_COLUMNS = ("uri", "video_id", "clip_index", "key", "stage", "reason", "duration_s", "source")
VIDEOS_COLUMNS = ("uri", "video_id", "source", "status", "stage", "reason", "n_candidates", "n_kept",
                  "n_rejected_clips", "duration_s")
# scores.parquet: everything except the wide per-file strings nothing in the report shows.
# the embedding: 512 values per clip, used by jobs/identities.py; signatures: ~14 KB a clip, for jobs/dedup.py
SCORES_SKIP = ("uri", "identity_embedding", "phash", "phash_mirrored", "audio_fingerprint")


class ReportError(ValueError):
    """The directory is not a curation output the report can read."""


@dataclass
class RunData:
    root: str  # the directory as given (path or URL)
    fs: fsspec.AbstractFileSystem
    path: str  # root inside fs
    run: dict
    index: dict | None
    videos: pa.Table
    manifest: pa.Table
    rejects: pa.Table
    scores: pa.Table | None
    notes: list[str] = field(default_factory=list)  # what was missing or odd, shown in the report
    identities: pa.Table | None = None  # identities.parquet (jobs/identities.py), when present
    identities_meta: dict = field(default_factory=dict)
    duplicates: pa.Table | None = None  # duplicates.parquet of jobs/dedup.py, when it ran

    def join(self, rel: str) -> str:
        return posixpath.join(self.path, rel)

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))


def _read_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def _read_table(fs, path: str, wanted: tuple[str, ...] | None, schema: pa.Schema,
                skip: tuple[str, ...] = ()) -> pa.Table:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        cols = [c for c in (wanted or names) if c in names and c not in skip]
        table = pf.read(columns=cols)
    # Fill missing contract columns with typed nulls (older outputs lack newer columns).
    for name in wanted or ():
        if name not in table.column_names and name in schema.names:
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table


def load_run(root: str) -> RunData:
    fs, path = fsspec.core.url_to_fs(str(root))
    if not fs.isdir(path):
        raise ReportError(f"{root} is not a directory")
    notes: list[str] = []
    tables = {}
    for name, wanted, schema in (("videos.parquet", VIDEOS_COLUMNS, schemas.VIDEOS_SCHEMA),
                                 ("manifest.parquet", MANIFEST_COLUMNS, schemas.MANIFEST_SCHEMA),
                                 ("rejects.parquet", REJECTS_COLUMNS, schemas.REJECTS_SCHEMA)):
        p = posixpath.join(path, name)
        if not fs.exists(p):
            raise ReportError(f"{root} has no {name}: not a finished curation output")
        tables[name] = _read_table(fs, p, wanted, schema)
    scores = None
    p = posixpath.join(path, "scores.parquet")
    if fs.exists(p):
        scores = _read_table(fs, p, None, schemas.SCORES_SCHEMA, skip=SCORES_SKIP)
    else:
        notes.append("scores.parquet is absent (an output from before the scoring stage): score "
                     "distributions show only what manifest.parquet and rejects.parquet hold.")
    duplicates = None
    p = posixpath.join(path, "duplicates.parquet")
    if fs.exists(p):
        with fs.open(p, "rb") as f:
            duplicates = pq.read_table(f, columns=["key", "group_id", "group_size", "rank", "evidence"])
    run = _read_json(fs, posixpath.join(path, "run.json"))
    if run is None:
        notes.append("run.json is absent: no config, versions or timings.")
    index = _read_json(fs, posixpath.join(path, "index.json"))
    if index is None:
        notes.append("index.json is absent: the run did not commit; the tables may be from an earlier attempt.")
    version = (run or {}).get("schema_version") or (index or {}).get("schema_version")
    if version and version not in schemas.SUPPORTED_SCHEMA_VERSIONS:
        notes.append(f"schema version {version} is not one this report knows "
                     f"({', '.join(schemas.SUPPORTED_SCHEMA_VERSIONS)}); numbers may be wrong.")
    from .identities import IDENTITIES_FILE, read as read_identities

    identities, identities_meta = read_identities(fs, posixpath.join(path, IDENTITIES_FILE))
    return RunData(root=str(root), fs=fs, path=path, run=run or {}, index=index,
                   videos=tables["videos.parquet"], manifest=tables["manifest.parquet"],
                   rejects=tables["rejects.parquet"], scores=scores, notes=notes,
                   identities=identities, identities_meta=identities_meta, duplicates=duplicates)
