"""WebDataset tar shards: byte-capped, written atomically, committed by index.json.

A shard is written under a temporary name (``.shard-000003.tar.tmp``) and renamed to
``shard-000003.tar`` only when it is complete, so a reader never sees a half-written shard.
``index.json`` (a superset of wids-shard-index-v1, with sha256 per shard) is written last,
also through a temporary file and an atomic rename: its presence commits the dataset.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import schemas
from schemas import SAMPLE_KEY_PATTERN, SHARD_DIR, SHARD_NAME_FORMAT

_TAR_BLOCK = 512


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (no space left on device, a quota) must not leave its temp file behind.
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as .npy (never pickled: object arrays are refused)."""
    if array.dtype == object:
        raise TypeError("object arrays cannot be stored: .npy members are read with allow_pickle=False")
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tar_member_size(payload_bytes: int) -> int:
    """Bytes one member takes in a ustar archive: header block + payload padded to 512."""
    return _TAR_BLOCK + (payload_bytes + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def sample_tar_size(members: dict[str, bytes]) -> int:
    return sum(tar_member_size(len(v)) for v in members.values())


def check_key(key: str) -> str:
    if not SAMPLE_KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} has characters outside [A-Za-z0-9_-]")
    return key


@dataclass
class ShardInfo:
    url: str  # relative to the dataset root (where index.json lives)
    nsamples: int
    filesize: int
    sha256: str
    keys: list[str] = field(default_factory=list)

    def as_index_entry(self) -> dict:
        return {"url": self.url, "nsamples": self.nsamples, "filesize": self.filesize,
                "sha256": self.sha256, "keys": list(self.keys)}


class ShardWriter:
    """Writes samples into ``root/shards/shard-NNNNNN.tar`` files of at most ``max_bytes``.

    A sample is never split across shards; a shard is closed before a sample would push it past
    ``max_bytes`` (a single sample larger than the cap gets a shard of its own). ``on_close``
    is called with the ShardInfo of every shard once it is renamed into place; the curation job
    uses it to journal progress.
    """

    def __init__(self, root: str | Path, max_bytes: int, first_index: int = 0, on_close=None):
        self.root = Path(root)
        self.dir = self.root / SHARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.next_index = first_index
        self.on_close = on_close
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._bytes = 0
        self._keys: list[str] = []
        self.closed_shards: list[ShardInfo] = []

    # -- writing
    def write(self, key: str, members: dict[str, bytes]) -> str:
        """Add one sample; returns the shard url (relative) it went to."""
        check_key(key)
        for name in members:
            if name.startswith(".") or "/" in name:
                raise ValueError(f"bad member name {name!r} for sample {key}")
        size = sample_tar_size(members)
        if self._tar is not None and self._keys and self._bytes + size + 2 * _TAR_BLOCK > self.max_bytes:
            self.close_current()
        if self._tar is None:
            self._open()
        mtime = time.time()
        for name in sorted(members):
            payload = members[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(payload)
            info.mtime = mtime
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(payload))
        self._bytes += size
        self._keys.append(key)
        return f"{SHARD_DIR}/{self._final.name}"

    @property
    def current_url(self) -> str | None:
        return None if self._final is None else f"{SHARD_DIR}/{self._final.name}"

    def _open(self) -> None:
        name = SHARD_NAME_FORMAT.format(self.next_index)
        self.next_index += 1
        self._final = self.dir / name
        if self._final.exists():
            raise FileExistsError(f"refusing to overwrite existing shard {self._final}")
        self._tmp = self.dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._bytes = 0
        self._keys = []

    def close_current(self) -> ShardInfo | None:
        if self._tar is None:
            return None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)
        info = ShardInfo(url=f"{SHARD_DIR}/{self._final.name}", nsamples=len(self._keys),
                         filesize=self._final.stat().st_size, sha256=sha256_file(self._final),
                         keys=list(self._keys))
        self._tar = self._file = self._tmp = self._final = None
        self._keys = []
        self.closed_shards.append(info)
        if self.on_close is not None:
            self.on_close(info)
        return info

    def close(self) -> None:
        self.close_current()

    def abort(self) -> None:
        """Drop the shard being written (its temp file) without publishing it.

        Called after a failed write too (no space left on device): closing the file may fail
        again while flushing, which must not keep the temp file (the end-of-archive blocks a
        tar close would add are not needed for a file that is deleted)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = self._final = None
        self._keys = []


_TEMP_NAME = re.compile(r"^\..+\.tmp\d*$")  # atomic_write_bytes, AtomicParquetWriter, ShardWriter


def remove_stale_temp_files(root) -> list[Path]:
    """Delete the temp files a killed run left (a shard, a table, run.json, a journal entry being
    written): none was ever published. Called with the output's lock held, so no writer is active.
    ``root``: the output directory, or its OutputStore; an object store has no temp files (an upload
    never completed is no object: Journal.abort_incomplete_uploads aborts those)."""
    if not isinstance(root, (str, Path)):
        if not root.is_local:
            return []
        root = root.local_path()
    root = Path(root)
    removed = []
    journal = root / "_journal"
    for d in (root, root / SHARD_DIR, journal, journal / "shards", journal / "videos", journal / "runs"):
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and _TEMP_NAME.match(p.name):
                    p.unlink()
                    removed.append(p)
    return removed


def build_index(shards: list[ShardInfo], *, profile: str, name: str, members: list[str],
                pipeline_version: str) -> dict:
    index = {
        "__kind__": schemas.INDEX_KIND,
        "wids_version": 1,
        "name": name,
        "schema_version": schemas.SCHEMA_VERSION,
        "pipeline_version": pipeline_version,
        "profile": profile,
        "members": sorted(members),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nsamples": sum(s.nsamples for s in shards),
        "shardlist": [s.as_index_entry() for s in shards],
    }
    schemas.validate_index(index)
    return index


def write_index(root: str | Path, index: dict) -> Path:
    path = Path(root) / "index.json"
    atomic_write_json(path, index)
    return path


def read_index(root_or_path: str | Path) -> dict:
    p = Path(root_or_path)
    if p.is_dir():
        p = p / "index.json"
    index = json.loads(p.read_text())
    if index.get("schema_version") not in schemas.SUPPORTED_SCHEMA_VERSIONS:
        raise ValueError(f"{p}: unknown schema version {index.get('schema_version')!r}; "
                         f"this code reads {schemas.SUPPORTED_SCHEMA_VERSIONS}")
    return index


def verify_index(root: str | Path) -> list[str]:
    """Problems found comparing index.json with the shard files (empty list = consistent)."""
    root = Path(root)
    index = read_index(root)
    problems = []
    for entry in index["shardlist"]:
        path = root / entry["url"]
        if not path.exists():
            problems.append(f"{entry['url']}: missing")
            continue
        if path.stat().st_size != entry["filesize"]:
            problems.append(f"{entry['url']}: size {path.stat().st_size} != {entry['filesize']}")
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['url']}: sha256 mismatch")
        with tarfile.open(path) as tar:
            keys = []
            for m in tar.getmembers():
                k = m.name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
        if len(keys) != entry["nsamples"]:
            problems.append(f"{entry['url']}: {len(keys)} samples != nsamples {entry['nsamples']}")
        if "keys" in entry and keys != entry["keys"]:
            problems.append(f"{entry['url']}: keys differ from index")
    return problems


class AtomicParquetWriter:
    """A parquet file written in batches of rows (pyarrow ParquetWriter, one row group per batch) to a
    temp file, renamed into place by ``close``: tables of 100,000s of rows are never held whole, and a
    reader never sees a partial file (``abort`` or an exception drops it)."""

    def __init__(self, path: str | Path, schema, batch_rows: int = 2048):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.schema, self.batch_rows = schema, batch_rows
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        if len(self.rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(schemas.conform_table(self.rows, self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # after a failed write: the first error is the one to report
            self.writer.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
