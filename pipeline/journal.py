"""Progress journal of a curation output: what a rerun may skip, and nothing it may repeat.

Everything goes through the output's store (``pipeline/store.py``: a local or shared directory, or
an object store such as ``s3://``): no rename, no ``flock`` and no mtime order is needed on an object
store. Layout under ``_journal/``:

- ``config.json``: the config fingerprint the output was made with;
- ``runs/NNNNNN.json``: one per run (``begin_run``), created if absent: the run number that
  shard names carry, so names never repeat across runs;
- ``shards/shard-SSSSSSSSSSSS.json``: one per published shard: its index entry and the manifest
  and scores rows of its samples. Written once the shard is complete; a shard object without an
  entry (killed in between) is an orphan and is deleted on restart;
- ``videos/part-SSSSSSSSSSSS.json``: inputs that are finished: their videos.parquet row and rejects
  rows. An input is journaled only once all its kept clips are in published shards;
- ``lock`` (local output: ``flock``, released by the kernel when the run dies) or
  ``lock/GGGGGG.json`` (object store: a lease object, see ``LeaseLock``).

``S`` is a sequence number, zero-padded, assigned by the run holding the lock (the largest number
in the kind's names + 1, kept in memory after that). Every order the journal promises comes from
it: shards in the order they were journaled, the latest outcome of an input is its entry with the
highest number, and a segment (below) is numbered above every file it covers. Entries are created
if absent (an object store's conditional PUT; a hard link locally), so two writers can never
replace each other's entry.

On restart, finished inputs are skipped, and clips of unfinished inputs whose keys are
already in a published shard are not written again (keys are deterministic), so a killed
run resumed counts every input exactly once.

Compaction (an output holds 100,000s of inputs): every ``COMPACT_EVERY`` files of one kind are
merged into ``shards/segment-S.parquet`` or ``videos/segment-S.parquet``, one row per
entry: the entry as JSON text, beside the few columns a resume needs (an input's uri and
retryable flag; a shard's url and index entry), which are read without the rest. A segment lists
the files it covers in its metadata; it is written whole before they are deleted, and a
covered file that a kill left behind is ignored and deleted. A resume thus reads a few segments'
small columns and fewer than ``COMPACT_EVERY`` loose files, each file once; the final tables
stream the entries (``iter_videos``, ``iter_shards``) instead of holding them all.

An output written by the previous version (loose ``shard-NNNNNN.json`` named after the shard,
``part-PID-UUID.json`` ordered by mtime, segments numbered from 0) is read in that old order, before
every sequence-numbered entry, and the first run holding its lock merges those loose files into
numbered segments: the output is adopted once, and resumes as before.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SHARD_DIR

from .shards import ShardInfo
from .store import OutputStore, TableWriter, open_store


class ConfigMismatch(RuntimeError):
    pass


class OutputLocked(ConfigMismatch):
    """Another run holds the output's lock (a ConfigMismatch: the job refuses to start, exit 2)."""


class LockLost(OutputLocked):
    """This run's lease on an object-store output was taken over, or could not be renewed for a whole
    lease: another run may be writing, so this one stops before its next journal write (the job
    exits 2 with this message, like a run refused at the start)."""


JOURNAL_DIR = "_journal"
DEFAULT_LEASE_S = 120.0  # config.write.lock_lease_s


# Loose journal files merged into one segment: bounds what a resume parses in full, and what a
# compaction re-reads (32 shard files of ~2 MB of manifest and scores rows each, or ~800 inputs).
COMPACT_EVERY = 32
_LOOSE = {"videos": "part-*.json", "shards": "shard-*.json"}  # loose entry files, old and numbered
_ENTRY_PREFIX = {"videos": "part", "shards": "shard"}
_SEQ_DIGITS = 12
_NUMBERED = re.compile(r"^(part|shard|segment)-(\d+)\.(json|parquet)$")
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
    "write": ("dataset_name", "writers", "lock_lease_s", "node_poll_s"),
    "features": ("device", "batch_size", "num_gpus", "num_cpus", "actors"),
    "score": ("syncnet_batch_size", "num_gpus", "num_cpus", "actors"),
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
    """The journal of one output: ``Journal(path)`` (a local directory), ``Journal(store)`` or
    ``Journal("s3://bucket/prefix", storage_options)``."""

    def __init__(self, root: str | Path | OutputStore, storage_options: dict | None = None):
        self.store = root if isinstance(root, OutputStore) else open_store(root, storage_options)
        self.root = self.store.local_path() if self.store.is_local else self.store.url
        # The local directory (refilter.json, the flock), None on an object store.
        self.dir = self.store.local_path(JOURNAL_DIR) if self.store.is_local else None
        if self.dir is not None:
            (self.dir / "shards").mkdir(parents=True, exist_ok=True)
            (self.dir / "videos").mkdir(parents=True, exist_ok=True)
        self._covers: dict[str, set[str] | None] = {kind: None for kind in _LOOSE}  # names merged into segments
        self._unmerged = {kind: 0 for kind in _LOOSE}  # loose files this instance wrote since its last compaction
        self._next_seq: dict[str, int | None] = {kind: None for kind in _LOOSE}
        self._locked = False
        self._lease: LeaseLock | None = None
        self.run: int | None = None

    # -- the single-writer lock
    @contextlib.contextmanager
    def lock(self, lease_s: float = DEFAULT_LEASE_S):
        """Exclusive lock of the output for one run: a second concurrent run fails at once
        (``OutputLocked``, naming the holder). Local output: ``flock``. Object store: a lease object
        renewed in the background; a stale one (its run killed) is taken over after ``lease_s``."""
        if self.store.is_local:
            with _flock(self.dir / "lock", self.root):
                self._locked = True
                try:
                    yield
                finally:
                    self._locked = False
            return
        lease = LeaseLock(self.store, f"{JOURNAL_DIR}/lock", lease_s)
        lease.acquire()
        self._lease, self._locked = lease, True
        try:
            yield
        finally:
            self._locked, self._lease = False, None
            lease.release()

    def holder(self) -> dict | None:
        """Who holds the output's lock now ({"host", "pid", ...}), or None when it is free (a stale
        lease counts as free): what ``--dry-run`` reports, without taking the lock."""
        if self.store.is_local:
            path = self.dir / "lock"
            if not path.exists():
                return None
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    try:
                        return json.loads(f.read())
                    except ValueError:
                        return {}
                fcntl.flock(f, fcntl.LOCK_UN)
            return None
        return LeaseLock(self.store, f"{JOURNAL_DIR}/lock").current()

    def refuse_if_held(self) -> None:
        """Raise ``OutputLocked`` when another run holds the lock now, without taking it: the job
        checks this before it starts Ray, so a second run is refused in a second instead of after
        Ray's start-up. ``lock`` still decides (a run starting in between is refused there)."""
        holder = self.holder()
        if holder is not None:
            raise OutputLocked(f"{self.root} is being written by another run ({_describe(holder)}): wait for that "
                               "run to finish; on an object store, a killed run's lock is taken over once its lease ends")

    def check_lock(self) -> None:
        """Raise ``LockLost`` when this run's lease was taken over or has run out unrenewed (object
        stores; a no-op on a local output). Every journal write calls it first."""
        if self._lease is not None:
            self._lease.check()

    def begin_run(self) -> int:
        """This run's number (1, 2, ...), recorded as ``_journal/runs/NNNNNN.json``: shard names carry it."""
        self.check_lock()
        taken = [int(m.group(1)) for name in self.store.list(f"{JOURNAL_DIR}/runs")
                 if (m := re.fullmatch(r"(\d+)\.json", name.rsplit("/", 1)[-1]))]
        number = max(taken, default=0) + 1
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _utc(time.time())}
        while not self.store.put_if_absent(f"{JOURNAL_DIR}/runs/{number:06d}.json",
                                           json.dumps(dict(record, run=number)).encode()):
            number += 1
        self.run = number
        return number

    # -- config
    def check_config(self, fingerprint: str, config_dict: dict, force: bool = False,
                     defaults: dict | None = None) -> None:
        """Refuse to resume an output written with another configuration. ``defaults`` (the config
        class's defaults) lets fields added by a newer pipeline version pass while at their default."""
        name = f"{JOURNAL_DIR}/config.json"
        old = self._read_json(name)
        if old is not None and not force:
            if old["fingerprint"] != fingerprint:
                changed = config_differences(old.get("config", {}), config_dict, defaults)
                if changed or "config" not in old:
                    raise ConfigMismatch(
                        f"{self.root} was written with a different configuration (fingerprint {old['fingerprint']}, "
                        f"now {fingerprint}; differs in: {', '.join(changed[:12]) or 'unknown fields'}); use a new "
                        "output directory, or --force-resume to mix them")
        self.check_lock()
        self.store.put_bytes(name, (json.dumps({"fingerprint": fingerprint, "config": config_dict}, indent=1)
                                    + "\n").encode())

    def _read_json(self, name: str):
        try:
            return json.loads(self.store.read_bytes(name))
        except FileNotFoundError:
            return None

    # -- shards
    def record_shard(self, info: ShardInfo, manifest_rows: list[dict], score_rows: list[dict] | None = None) -> None:
        self._record("shards", {"shard": info.as_index_entry(), "manifest": manifest_rows, "scores": score_rows or []})

    def shard_entries(self) -> list[dict]:
        """The index entry (url, nsamples, filesize, sha256, keys) of every journaled shard, by url,
        without their manifest and scores rows."""
        return sorted(self._light_entries("shards"), key=lambda e: e["url"])

    def iter_shards(self) -> Iterator[dict]:
        """Every journaled shard's entry {"shard", "manifest", "scores"}, one at a time, in journal
        order (the order they were journaled: by url within one writer's shards)."""
        yield from self._iter_entries("shards")

    def shards(self) -> list[dict]:
        return list(self.iter_shards())

    def remove_orphan_shards(self, entries: list[dict] | None = None) -> list[str]:
        """Delete the shard objects without a journal entry (``entries``: shard_entries(), when
        already read), and on S3 the multipart uploads a killed writer never completed. Called by the
        run holding the lock before any writer starts; returns the names deleted."""
        known = {e["url"] for e in (self.shard_entries() if entries is None else entries)}
        removed = []
        for name in self.store.list(SHARD_DIR):
            base = name.rsplit("/", 1)[-1]
            if fnmatch.fnmatch(base, "shard-*.tar") and name not in known:
                self.store.delete(name)
                removed.append(name)
        return removed + self.abort_incomplete_uploads()

    def abort_incomplete_uploads(self) -> list[str]:
        """S3: abort the multipart uploads under the output that were never completed (a writer
        killed mid-shard; invisible, but stored and billed until aborted). Returns their keys."""
        fs = getattr(self.store, "fs", None)
        protocols = {fs.protocol} if fs is not None and isinstance(fs.protocol, str) else set(getattr(fs, "protocol", ()))
        if not protocols & {"s3", "s3a"}:
            return []
        bucket, prefix, _ = fs.split_path(fs._strip_protocol(self.store.url))
        prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        aborted = []
        params = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = fs.call_s3("list_multipart_uploads", **params)
            for upload in page.get("Uploads", []):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(upload["Key"])
            if not page.get("IsTruncated"):
                return aborted
            params.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def next_shard_index(self, entries: list[dict] | None = None) -> int:
        """After the highest ``shard-NNNNNN.tar`` (single-writer names of the previous version)."""
        names = [Path(e["url"]).stem for e in (self.shard_entries() if entries is None else entries)]
        return max((int(m.group(1)) for n in names if (m := re.fullmatch(r"shard-(\d+)", n))), default=-1) + 1

    # -- videos
    def record_videos(self, videos: list[dict]) -> None:
        if videos:
            self._record("videos", {"videos": videos})

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

    # -- entries and their sequence numbers
    def _record(self, kind: str, obj: dict) -> None:
        """A new loose entry, numbered after everything of its kind, created if absent (compact JSON:
        json's C encoder; an indented dump is ~10x slower on scores rows with 512-value embeddings)."""
        self.check_lock()
        data = json.dumps(obj).encode()
        for _ in range(100):
            name = self._name(kind, _ENTRY_PREFIX[kind], "json")
            if self.store.put_if_absent(name, data):
                break
            self._next_seq[kind] = None  # another Journal instance wrote it: number after it
        else:
            raise RuntimeError(f"{self.store.uri(name)}: cannot create a journal entry: every number is taken")
        self._written(kind)

    def _name(self, kind: str, prefix: str, ext: str) -> str:
        """The next numbered name of ``kind`` (the first call lists the kind's names)."""
        if self._next_seq[kind] is None:
            numbers = [seq for name in self.store.list(f"{JOURNAL_DIR}/{kind}")
                       if (seq := _seq_of(kind, name.rsplit("/", 1)[-1])) is not None]
            self._next_seq[kind] = max(numbers, default=-1) + 1
        seq = self._next_seq[kind]
        self._next_seq[kind] += 1
        return f"{JOURNAL_DIR}/{kind}/{prefix}-{seq:0{_SEQ_DIGITS}d}.{ext}"

    def _listing(self, kind: str) -> tuple[list[str], list[str]]:
        """(segments, loose entry files) of ``kind``, each in journal order: segments by number;
        loose files of the previous version first (shards by name, inputs by mtime), then numbered ones."""
        segments, old, numbered = [], [], []
        for name in self.store.list(f"{JOURNAL_DIR}/{kind}"):
            base = name.rsplit("/", 1)[-1]
            seq = _seq_of(kind, base)
            if base.startswith("segment-"):
                if seq is not None:
                    segments.append((seq, name))
            elif seq is not None:
                numbered.append((seq, name))
            elif fnmatch.fnmatch(base, _LOOSE[kind]):
                old.append(name)
        if kind == "videos" and old and self.store.is_local:
            old.sort(key=lambda n: (self.store.local_path(n).stat().st_mtime_ns, n))
        return [n for _, n in sorted(segments)], old + [n for _, n in sorted(numbered)]

    # -- compaction
    def _written(self, kind: str) -> None:
        self._unmerged[kind] += 1
        if self._unmerged[kind] >= COMPACT_EVERY:
            try:
                self._compact(kind, self._loose(kind))
            except OSError:
                # The entry just written is durable; a failed merge (no space left for the segment:
                # its upload is dropped, its files stay loose) must not make the record look failed.
                # The next write meets the same disk and stops the run.
                pass

    def _segments(self, kind: str) -> list[str]:
        return self._listing(kind)[0]

    def _covered(self, kind: str) -> set[str]:
        if self._covers[kind] is None:
            self._covers[kind] = set()
            for seg in self._segments(kind):
                with self.store.open_read(seg) as f:
                    self._covers[kind].update(_covers(pq.read_metadata(f)))
        return self._covers[kind]

    def _loose(self, kind: str, listing: list[str] | None = None) -> list[str]:
        """Journal files not merged into a segment yet, in journal order (a covered file left by a
        kill between a compaction's segment and its deletes is deleted now)."""
        covered = self._covered(kind)
        files = []
        for name in self._listing(kind)[1] if listing is None else listing:
            if name.rsplit("/", 1)[-1] in covered:
                if self._locked:
                    self.check_lock()
                    self.store.delete(name)
            else:
                files.append(name)
        return files

    def _compact(self, kind: str, files: list[str]) -> list[dict]:
        """Merge ``files`` (loose, in journal order) into segments of at most COMPACT_EVERY files, each
        file parsed once and written out before the next is read; returns their entries' light columns.
        A segment is numbered after every file it covers (all the loose files there are)."""
        light = []
        for start in range(0, len(files), COMPACT_EVERY):
            group = files[start:start + COMPACT_EVERY]
            self.check_lock()
            name = self._name(kind, "segment", "parquet")
            while self.store.exists(name):  # written by another Journal instance since we numbered
                self._next_seq[kind] = None
                name = self._name(kind, "segment", "parquet")
            bases = [n.rsplit("/", 1)[-1] for n in group]
            schema = _SEGMENT_SCHEMA[kind].with_metadata({"covers": json.dumps(bases)})
            with TableWriter(self.store, name, schema, batch_rows=_ROWS_PER_GROUP[kind]) as segment:
                for n in group:
                    entries = _file_entries(kind, json.loads(self.store.read_bytes(n)))
                    light += [_light_entry(kind, e) for e in entries]
                    segment.add([_segment_row(kind, e) for e in entries])
            self._covered(kind).update(bases)
            for n in group:
                self.store.delete(n)
        self._unmerged[kind] = 0
        return light

    def _light_entries(self, kind: str) -> list[dict]:
        """The light columns of every entry, in journal order: segments (those columns only), then
        loose files, each parsed once (and merged into a segment on the way by the run holding the lock)."""
        out = []
        covers: set[str] = set()
        segments, loose = self._listing(kind)
        for seg in segments:
            with self.store.open_read(seg) as f:
                pf = pq.ParquetFile(f)
                covers.update(_covers(pf.metadata))
                out += [_light_row(kind, r) for r in pf.read(columns=_LIGHT[kind]).to_pylist()]
        self._covers[kind] = covers
        loose = self._loose(kind, loose)
        if self._locked:
            out += self._compact(kind, loose)
        else:
            for name in loose:
                out += [_light_entry(kind, e) for e in _file_entries(kind, json.loads(self.store.read_bytes(name)))]
        return out

    def _iter_entries(self, kind: str) -> Iterator[dict]:
        """Every entry in journal order, one segment batch or loose file at a time."""
        columns = ["entry"] if kind == "videos" else ["shard", "manifest", "scores"]
        segments, loose = self._listing(kind)
        for seg in segments:
            with self.store.open_read(seg) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=_ROWS_PER_GROUP[kind], columns=columns):
                    for r in batch.to_pylist():
                        if kind == "videos":
                            yield json.loads(r["entry"])
                        else:
                            yield {"shard": json.loads(r["shard"]), "manifest": json.loads(r["manifest"]),
                                   "scores": json.loads(r["scores"])}
        for name in self._loose(kind, loose):
            yield from _file_entries(kind, json.loads(self.store.read_bytes(name)))


def _seq_of(kind: str, base: str) -> int | None:
    """The sequence number in a journal file's name: a segment's (any width: the previous version
    numbered them from 0), or a numbered entry's (exactly _SEQ_DIGITS digits; the previous version's
    ``shard-NNNNNN.json`` carried its shard's number, ``part-PID-UUID.json`` none); None otherwise."""
    m = _NUMBERED.match(base)
    if m is None:
        return None
    prefix, digits, ext = m.groups()
    if prefix == "segment":
        return int(digits) if ext == "parquet" else None
    return int(digits) if prefix == _ENTRY_PREFIX[kind] and ext == "json" and len(digits) == _SEQ_DIGITS else None


def _covers(metadata) -> list[str]:
    return json.loads((metadata.metadata or {}).get(b"covers", b"[]"))


def _file_entries(kind: str, data: dict) -> list[dict]:
    """The entries of one loose file: a part's inputs, or the one shard of a shard file."""
    return data["videos"] if kind == "videos" else [data]


# -- the lock

def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _describe(record: dict) -> str:
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}"


@contextlib.contextmanager
def _flock(path: Path, root) -> Iterator[None]:
    """flock of a local output; the file names its holder (opened for append: a refused run must not
    truncate the holder's note before reading it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = f" by {_describe(json.loads(f.read()))}"
            except ValueError:
                holder = ""
            raise OutputLocked(f"{root} is being written by another run{holder} (lock {path})") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(dict(_holder(), acquired=_utc(time.time()))))
        f.flush()
        yield
    finally:
        f.close()


class LeaseLock:
    """The single-writer lock of an object-store output: a lease object created if absent
    (conditional PUT), ``_journal/lock/GGGGGG.json``, holding {owner, host, pid, acquired, renewed,
    lease_s} (times: seconds since the epoch, so the hosts' clocks must agree to well within a lease,
    as NTP keeps them). The lock is the object of the highest generation G.

    - A second run finds it fresh and is refused at once, told who holds it and when the lease ends.
    - One not renewed for its lease (its run was killed) is taken over by creating the next
      generation: of runs racing for it exactly one creates it (nothing is deleted before the race
      is won), and the winner then deletes the older generations.
    - A daemon thread renews it every lease/4 after checking it is still ours (no higher generation,
      our record in ours); if it is not, or could not be renewed for a whole lease, ``check`` raises
      ``LockLost``, and the journal calls ``check`` before every write.
    - Released (deleted, if still ours) on exit."""

    def __init__(self, store: OutputStore, prefix: str = f"{JOURNAL_DIR}/lock", lease_s: float = DEFAULT_LEASE_S):
        self.store, self.prefix, self.lease_s = store, prefix, float(lease_s)
        self.owner = uuid.uuid4().hex
        self.name: str | None = None  # our generation's object, once acquired
        self.generation = 0
        self.acquired: float | None = None
        self._confirmed = 0.0  # monotonic time of the last renewal showing the lock ours
        self._lost: str | None = None
        self._last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, now: float) -> bytes:
        return json.dumps(dict(_holder(), owner=self.owner, generation=self.generation, acquired=self.acquired,
                               renewed=now, lease_s=self.lease_s)).encode()

    def generations(self) -> list[tuple[int, str]]:
        """(generation, name) of every lock object, lowest first."""
        return sorted((int(m.group(1)), name) for name in self.store.list(self.prefix)
                      if (m := re.fullmatch(r"(\d+)\.json", name.rsplit("/", 1)[-1])))

    def _read(self, name: str) -> dict | None:
        try:
            data = self.store.read_bytes(name)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return {"renewed": 0.0, "note": "unreadable lock object"}  # not a lease anyone holds: stale

    def current(self) -> dict | None:
        """The record of the highest generation while its lease runs, else None (free or stale)."""
        gens = self.generations()
        held = self._read(gens[-1][1]) if gens else None
        if held is None or time.time() - float(held.get("renewed", 0.0)) >= float(held.get("lease_s", 0.0)):
            return None
        return held

    def acquire(self, tries: int = 5) -> None:
        for _ in range(tries):
            gens = self.generations()
            top = gens[-1] if gens else (0, None)
            if top[1] is not None:
                held = self._read(top[1])
                if held is None:
                    continue  # released in between: look again
                renewed, lease = float(held.get("renewed", 0.0)), float(held.get("lease_s", self.lease_s))
                age = time.time() - renewed
                if age < lease:
                    raise OutputLocked(
                        f"{self.store.url} is being written by another run ({_describe(held)}, since "
                        f"{_utc(float(held.get('acquired') or renewed))}; lock {self.store.uri(top[1])}, renewed "
                        f"{age:.0f} s ago, its lease ends at {_utc(renewed + lease)} unless renewed): wait for that run "
                        "to finish; if it was killed, run again after the lease ends and this run takes the lock over")
            self.generation, self.acquired = top[0] + 1, time.time()
            name = f"{self.prefix}/{self.generation:06d}.json"
            if not self.store.put_if_absent(name, self._record(self.acquired)):
                continue  # another run created this generation first: look again
            self.name, self._confirmed = name, time.monotonic()
            if top[1] is not None:
                print(f"[curate] note: took over the lock {self.store.uri(top[1])}: held by {_describe(held)}, not "
                      f"renewed for {age:.0f} s (lease {lease:.0f} s), so that run is taken to be dead",
                      file=sys.stderr, flush=True)
            for _, older in gens:
                self.store.delete(older)
            self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True, name=f"lease-{name}")
            self._thread.start()
            return
        raise OutputLocked(f"{self.store.url}: could not take the lock {self.store.uri(self.prefix)} in {tries} tries "
                           "(other runs are starting on this output at the same time)")

    def _still_ours(self) -> str | None:
        """Why the lock is no longer ours, or None while it is."""
        gens = self.generations()
        if gens and gens[-1][0] > self.generation:
            held = self._read(gens[-1][1]) or {}
            return f"taken over by {_describe(held)} at {_utc(float(held.get('acquired') or 0))}"
        held = self._read(self.name)
        if held is None or held.get("owner") != self.owner:
            return "the lock object was deleted or replaced"
        return None

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                lost = self._still_ours()
                if lost:
                    self._lost = lost
                    return
                self.store.put_bytes(self.name, self._record(time.time()))
                self._confirmed = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried; check() stops the run after a lease
                self._last_error = e

    def check(self) -> None:
        where = self.store.uri(self.name) if self.name else self.store.uri(self.prefix)
        if self._lost:
            raise LockLost(f"{self.store.url}: this run lost the output lock {where} ({self._lost}); it stops "
                           "rather than write beside another run")
        unconfirmed = time.monotonic() - self._confirmed
        if unconfirmed > self.lease_s:
            raise LockLost(f"{self.store.url}: this run could not renew the output lock {where} for {unconfirmed:.0f} s "
                           f"(lease {self.lease_s:.0f} s; last error: {self._last_error!r}); another run may have taken "
                           "it over, so this one stops")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._lost or self.name is None:
            return
        with contextlib.suppress(Exception):  # a lock left behind is taken over after its lease
            if self._still_ours() is None:
                self.store.delete(self.name)
