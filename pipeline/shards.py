"""WebDataset tar shards: byte-capped, written atomically, committed by index.json.

A shard streams to the output store (pipeline/store.py) and appears only when it is complete: a
local shard is written under a temporary name (``.shard-000003.tar.tmp<pid>``) and renamed, an
object-store shard is a multipart upload completed on close; a reader never sees a half-written shard.
``index.json`` (a superset of wids-shard-index-v1, with sha256 per shard) is written last,
also through a temporary file and an atomic rename: its presence commits the dataset.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import schemas
from schemas import SAMPLE_KEY_PATTERN, SHARD_DIR, SHARD_NAME_FORMAT

from .store import OutputStore, open_store

_TAR_BLOCK = 512


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + fsync + rename (the local
    store's whole-or-nothing write; a failed write leaves no temp file behind)."""
    from .store import LocalStore

    path = Path(path)
    LocalStore(path.parent).put_bytes(path.name, data)


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
    # Who wrote it ({"node_id", "node_ip", "writer"}) and why it was closed: "cap" (the next sample
    # would not fit) or "end" (the end of the run's stream: a tail shard, usually smaller).
    writer: dict | None = None
    closed_by: str | None = None

    def as_index_entry(self) -> dict:
        entry = {"url": self.url, "nsamples": self.nsamples, "filesize": self.filesize,
                 "sha256": self.sha256, "keys": list(self.keys)}
        if self.writer is not None:
            entry["writer"] = dict(self.writer)
        if self.closed_by is not None:
            entry["closed_by"] = self.closed_by
        return entry


class ShardWriter:
    """Writes samples into ``shards/<name>.tar`` objects of at most ``max_bytes`` through an output
    store (``root``: a directory path, or an ``OutputStore`` such as an s3:// output).

    A sample is never split across shards; a shard is closed before a sample would push it past
    ``max_bytes`` (a single sample larger than the cap gets a shard of its own). A shard streams to
    the store as it is written (``store.open_write``: size and sha256 computed on the way) and
    appears only once closed, whole; ``abort`` drops it. ``on_close`` is called with the ShardInfo
    of every shard once it is in place; the curation job journals it.

    ``name_format`` names the n-th shard (``SHARD_NAME_FORMAT``: shard-000003.tar; the curation
    writers use one format per run and writer, so that no two writers' names collide).
    """

    def __init__(self, root, max_bytes: int, first_index: int = 0, on_close=None, *,
                 name_format: str = SHARD_NAME_FORMAT, writer: dict | None = None):
        self.store = root if isinstance(root, OutputStore) else open_store(root)
        self.root = self.store.local_path()  # None on an object store
        self.max_bytes = int(max_bytes)
        self.next_index = first_index
        self.on_close = on_close
        self.name_format = name_format
        self.writer = writer
        self._tar: tarfile.TarFile | None = None
        self._upload = None
        self._name: str | None = None
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
            self.close_current("cap")
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
        return self._name

    @property
    def current_url(self) -> str | None:
        return self._name

    @property
    def open_keys(self) -> list[str]:
        """Keys of the samples in the shard being written (not published yet)."""
        return list(self._keys)

    def _open(self) -> None:
        name = f"{SHARD_DIR}/{self.name_format.format(self.next_index)}"
        self.next_index += 1
        if self.store.exists(name):
            raise FileExistsError(f"refusing to overwrite existing shard {self.store.uri(name)}")
        self._upload = self.store.open_write(name)
        self._name = name
        self._tar = tarfile.open(fileobj=self._upload.file(), mode="w", format=tarfile.USTAR_FORMAT)
        self._bytes = 0
        self._keys = []

    def close_current(self, closed_by: str | None = None) -> ShardInfo | None:
        """Close the shard being written (``closed_by``: "cap" or "end", recorded in its entry)."""
        if self._tar is None:
            return None
        self._tar.close()  # the end-of-archive blocks
        self._upload.commit()  # the object appears, whole
        info = ShardInfo(url=self._name, nsamples=len(self._keys), filesize=self._upload.size,
                         sha256=self._upload.sha256, keys=list(self._keys), writer=self.writer, closed_by=closed_by)
        self._tar = self._upload = self._name = None
        self._keys = []
        self.closed_shards.append(info)
        if self.on_close is not None:
            self.on_close(info)
        return info

    def close(self) -> ShardInfo | None:
        return self.close_current("end")

    def abort(self) -> None:
        """Drop the shard being written without publishing it.

        Called after a failed write too (no space left on device): the upload's temp file (or
        multipart upload) is discarded whatever state the failed write left it in."""
        if self._upload is not None:
            with contextlib.suppress(OSError):
                self._upload.abort()
        self._tar = self._upload = self._name = None
        self._keys = []


_TEMP_NAME = re.compile(r"^\..+\.tmp\d*$")  # atomic_write_bytes, store uploads (temp files)


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


