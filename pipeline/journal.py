"""Progress journal of an output directory: what a rerun may skip, and nothing it may repeat.

Layout under ``OUT/_journal/`` (every file written atomically):

- ``config.json``: the config fingerprint the output was made with;
- ``shards/shard-NNNNNN.json``: one file per published shard: its index entry and the
  manifest rows of its samples. Written right after the shard is renamed into place; a shard
  file without its journal file (killed in between) is an orphan and is deleted on restart;
- ``videos/part-*.json``: inputs that are finished: their videos.parquet row and rejects
  rows. An input is journaled only once all its kept clips are in published shards.

On restart, finished inputs are skipped, and clips of unfinished inputs whose keys are
already in a published shard are not written again (keys are deterministic), so a killed
run resumed counts every input exactly once.

Compaction (an output holds 100,000s of inputs): every ``COMPACT_EVERY`` files of one kind are
merged into ``shards/segment-NNNNNN.parquet`` or ``videos/segment-NNNNNN.parquet``, one row per
entry: the entry as JSON text, beside the few columns a resume needs (an input's uri and
retryable flag; a shard's url and index entry), which are read without the rest. A segment lists
the files it covers in its metadata; it is written atomically before they are deleted, and a
covered file that a kill left behind is ignored and deleted. A resume thus reads a few segments'
small columns and fewer than ``COMPACT_EVERY`` loose files, each file once; the final tables
stream the entries (``iter_videos``, ``iter_shards``) instead of holding them all.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SHARD_DIR

from .shards import AtomicParquetWriter, ShardInfo, atomic_write_bytes, atomic_write_json


class ConfigMismatch(RuntimeError):
    pass


# Loose journal files merged into one segment: bounds what a resume parses in full, and what a
# compaction re-reads (32 shard files of ~2 MB of manifest and scores rows each, or ~800 inputs).
COMPACT_EVERY = 32
_LOOSE = {"videos": "part-*.json", "shards": "shard-*.json"}
_SEGMENT_SCHEMA = {
    "videos": pa.schema([("uri", pa.string()), ("retryable", pa.bool_()), ("entry", pa.string())]),
    "shards": pa.schema([("url", pa.string()), ("shard", pa.string()), ("manifest", pa.string()),
                         ("scores", pa.string())]),
}
_LIGHT = {"videos": ["uri", "retryable"], "shards": ["url", "shard"]}  # what a resume reads
# Rows per row group (what a streamed read holds at once): inputs of ~1-30 KB, shards of ~2 MB each
# (100 samples' manifest and scores rows).
_ROWS_PER_GROUP = {"videos": 64, "shards": 2}


def _segment_row(kind: str, entry: dict) -> dict:
    if kind == "videos":
        return {"uri": entry["video"]["uri"], "retryable": bool(entry.get("retryable")), "entry": json.dumps(entry)}
    return {"url": entry["shard"]["url"], "shard": json.dumps(entry["shard"]),
            "manifest": json.dumps(entry["manifest"]), "scores": json.dumps(entry.get("scores", []))}


def _light_row(kind: str, row: dict) -> dict:
    """What a resume needs of one segment row: (uri, retryable) of an input, the index entry of a shard."""
    if kind == "videos":
        return {"uri": row["uri"], "retryable": bool(row["retryable"])}
    return json.loads(row["shard"])


def _light_entry(kind: str, entry: dict) -> dict:
    """The same of an entry of a loose file."""
    if kind == "videos":
        return {"uri": entry["video"]["uri"], "retryable": bool(entry.get("retryable"))}
    return entry["shard"]


# Fields that change how fast or where things run, not what is computed: a run may resume on a
# resized cluster.
_RESOURCE_FIELDS = {
    "ray": None, "model_dir": None,
    "dedup": None,  # thresholds of jobs/dedup.py, a later job over the finished output
    "write": ("dataset_name",),
    "features": ("device", "batch_size", "num_gpus", "num_cpus", "actors"),
    "score": ("syncnet_batch_size", "num_gpus", "actors"),
}


def _relevant(config_dict: dict) -> dict:
    relevant = copy.deepcopy(config_dict)
    for section, fields in _RESOURCE_FIELDS.items():
        if fields is None:
            relevant.pop(section, None)
        else:
            for f in fields:
                relevant.get(section, {}).pop(f, None)
    return relevant


def config_fingerprint(config_dict: dict) -> str:
    return hashlib.sha256(json.dumps(_relevant(config_dict), sort_keys=True).encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Dotted fields whose value changed between two configs (resource fields ignored).

    A field the old config does not have was added by a newer version of the pipeline: it is no
    difference while it holds its default (the old run computed what the default computes), so an
    output resumes across an upgrade that only added fields."""
    out: list[str] = []

    def walk(a, b, d, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                sub_d = d.get(k, _MISSING) if isinstance(d, dict) else _MISSING
                if k not in a:
                    if sub_d is _MISSING or b[k] != sub_d:
                        out.append(f"{path}{k}")
                elif k not in b:
                    continue  # removed by a newer version: it cannot change what this one computes
                else:
                    walk(a[k], b[k], sub_d, f"{path}{k}.")
        elif a != b:
            out.append(path.rstrip("."))

    walk(_relevant(old), _relevant(new), defaults or {}, "")
    return out


_MISSING = object()


class Journal:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "_journal"
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.dir / "videos").mkdir(parents=True, exist_ok=True)
        self._covers: dict[str, set[str] | None] = {kind: None for kind in _LOOSE}  # names merged into segments
        self._unmerged = {kind: 0 for kind in _LOOSE}  # loose files this instance wrote since its last compaction
        self._locked = False

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock of the output for one run (a second concurrent run fails at once)."""
        f = open(self.dir / "lock", "w")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigMismatch(f"{self.root} is being written by another run (lock {self.dir / 'lock'})") from None
            self._locked = True
            yield
        finally:
            self._locked = False
            f.close()

    # -- config
    def check_config(self, fingerprint: str, config_dict: dict, force: bool = False,
                     defaults: dict | None = None) -> None:
        """Refuse to resume an output written with another configuration. ``defaults`` (the config
        class's defaults) lets fields added by a newer pipeline version pass while at their default."""
        path = self.dir / "config.json"
        if path.exists() and not force:
            old = json.loads(path.read_text())
            if old["fingerprint"] != fingerprint:
                changed = config_differences(old.get("config", {}), config_dict, defaults)
                if changed or "config" not in old:
                    raise ConfigMismatch(
                        f"{self.root} was written with a different configuration (fingerprint {old['fingerprint']}, "
                        f"now {fingerprint}; differs in: {', '.join(changed[:12]) or 'unknown fields'}); use a new "
                        "output directory, or --force-resume to mix them")
        atomic_write_json(path, {"fingerprint": fingerprint, "config": config_dict})

    # -- shards
    def record_shard(self, info: ShardInfo, manifest_rows: list[dict], score_rows: list[dict] | None = None) -> None:
        name = Path(info.url).stem
        _write_compact_json(self.dir / "shards" / f"{name}.json",
                            {"shard": info.as_index_entry(), "manifest": manifest_rows, "scores": score_rows or []})
        self._written("shards")

    def shard_entries(self) -> list[dict]:
        """The index entry (url, nsamples, filesize, sha256, keys) of every journaled shard, by url,
        without their manifest and scores rows."""
        return sorted(self._light_entries("shards"), key=lambda e: e["url"])

    def iter_shards(self) -> Iterator[dict]:
        """Every journaled shard's entry {"shard", "manifest", "scores"}, by url, one at a time."""
        urls = [e["url"] for e in self._light_entries("shards")]
        if urls == sorted(urls):  # always, as shard numbers only grow: stream them
            yield from self._iter_entries("shards")
        else:
            yield from sorted(self._iter_entries("shards"), key=lambda e: e["shard"]["url"])

    def shards(self) -> list[dict]:
        return list(self.iter_shards())

    def remove_orphan_shards(self, entries: list[dict] | None = None) -> list[Path]:
        """Delete shard files without a journal entry (``entries``: shard_entries(), when already read)."""
        known = {Path(e["url"]).name for e in (self.shard_entries() if entries is None else entries)}
        removed = []
        shard_dir = self.root / SHARD_DIR
        if shard_dir.is_dir():
            for p in shard_dir.glob("shard-*.tar"):
                if p.name not in known:
                    p.unlink()
                    removed.append(p)
        return removed

    def next_shard_index(self, entries: list[dict] | None = None) -> int:
        names = [Path(e["url"]).stem for e in (self.shard_entries() if entries is None else entries)]
        return max((int(n.split("-")[1]) for n in names), default=-1) + 1

    # -- videos
    def record_videos(self, videos: list[dict]) -> None:
        if videos:
            _write_compact_json(self.dir / "videos" / f"part-{os.getpid()}-{uuid.uuid4().hex[:12]}.json",
                                {"videos": videos})
            self._written("videos")

    def finished(self) -> dict[str, bool]:
        """uri -> retryable of every journaled input (its latest outcome), without its rows."""
        return {e["uri"]: e["retryable"] for e in self._light_entries("videos")}

    def iter_videos(self) -> Iterator[dict]:
        """The latest journaled outcome of every input (a retried input's last entry replaces the
        older ones), one at a time, in journal order of those latest entries."""
        last = {e["uri"]: i for i, e in enumerate(self._light_entries("videos"))}
        for i, entry in enumerate(self._iter_entries("videos")):
            if last[entry["video"]["uri"]] == i:
                yield entry

    def videos(self) -> list[dict]:
        return list(self.iter_videos())

    # -- compaction
    def _written(self, kind: str) -> None:
        self._unmerged[kind] += 1
        if self._unmerged[kind] >= COMPACT_EVERY:
            try:
                self._compact(kind, self._loose(kind))
            except OSError:
                # The entry just written is durable; a failed merge (no space left for the segment:
                # its temp file is gone, its files stay loose) must not make the record look failed.
                # The next write meets the same disk and stops the run.
                pass

    def _segments(self, kind: str) -> list[Path]:
        return sorted((self.dir / kind).glob("segment-*.parquet"))

    def _covered(self, kind: str) -> set[str]:
        if self._covers[kind] is None:
            self._covers[kind] = set()
            for seg in self._segments(kind):
                with open(seg, "rb") as f:
                    self._covers[kind].update(_covers(pq.read_metadata(f)))
        return self._covers[kind]

    def _loose(self, kind: str) -> list[Path]:
        """Journal files not merged into a segment yet, in journal order (a covered file left by a
        kill between a compaction's segment and its deletes is deleted now)."""
        covered = self._covered(kind)
        if self._locked:  # temp files of a killed run's atomic writes were never journaled
            for p in (self.dir / kind).glob(".*.tmp*"):
                p.unlink(missing_ok=True)
        files = []
        for p in (self.dir / kind).glob(_LOOSE[kind]):
            if p.name in covered:
                if self._locked:
                    p.unlink(missing_ok=True)
            else:
                files.append(p)
        if kind == "videos":  # a retried input's newer part must come after its older one
            return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))
        return sorted(files)

    def _compact(self, kind: str, files: list[Path]) -> list[dict]:
        """Merge ``files`` (loose, in journal order) into segments of at most COMPACT_EVERY files, each
        file parsed once and written out before the next is read; returns their entries' light columns."""
        light = []
        for start in range(0, len(files), COMPACT_EVERY):
            group = files[start:start + COMPACT_EVERY]
            segments = self._segments(kind)
            seq = int(segments[-1].stem.split("-")[1]) + 1 if segments else 0
            schema = _SEGMENT_SCHEMA[kind].with_metadata({"covers": json.dumps([p.name for p in group])})
            with AtomicParquetWriter(self.dir / kind / f"segment-{seq:06d}.parquet", schema,
                                     batch_rows=_ROWS_PER_GROUP[kind]) as segment:
                for p in group:
                    entries = _file_entries(kind, json.loads(p.read_text()))
                    light += [_light_entry(kind, e) for e in entries]
                    segment.add([_segment_row(kind, e) for e in entries])
            self._covered(kind).update(p.name for p in group)
            for p in group:
                p.unlink()
        self._unmerged[kind] = 0
        return light

    def _light_entries(self, kind: str) -> list[dict]:
        """The light columns of every entry, in journal order: segments (those columns only), then
        loose files, each parsed once (and merged into a segment on the way by the run holding the lock)."""
        out = []
        covers: set[str] = set()
        for seg in self._segments(kind):
            with open(seg, "rb") as f:
                pf = pq.ParquetFile(f)
                covers.update(_covers(pf.metadata))
                out += [_light_row(kind, r) for r in pf.read(columns=_LIGHT[kind]).to_pylist()]
        self._covers[kind] = covers
        loose = self._loose(kind)
        if self._locked:
            out += self._compact(kind, loose)
        else:
            for p in loose:
                out += [_light_entry(kind, e) for e in _file_entries(kind, json.loads(p.read_text()))]
        return out

    def _iter_entries(self, kind: str) -> Iterator[dict]:
        """Every entry in journal order, one segment batch or loose file at a time."""
        columns = ["entry"] if kind == "videos" else ["shard", "manifest", "scores"]
        for seg in self._segments(kind):
            with open(seg, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=_ROWS_PER_GROUP[kind], columns=columns):
                    for r in batch.to_pylist():
                        if kind == "videos":
                            yield json.loads(r["entry"])
                        else:
                            yield {"shard": json.loads(r["shard"]), "manifest": json.loads(r["manifest"]),
                                   "scores": json.loads(r["scores"])}
        for p in self._loose(kind):
            yield from _file_entries(kind, json.loads(p.read_text()))


def _write_compact_json(path: Path, obj) -> None:
    """A loose journal file: compact JSON (json's C encoder; an indented dump goes through its pure-Python
    encoder, ~10x slower on scores rows with 512-value embeddings)."""
    atomic_write_bytes(path, json.dumps(obj).encode())


def _covers(metadata) -> list[str]:
    return json.loads((metadata.metadata or {}).get(b"covers", b"[]"))


def _file_entries(kind: str, data: dict) -> list[dict]:
    """The entries of one loose file: a part's inputs, or the one shard of a shard file."""
    return data["videos"] if kind == "videos" else [data]
