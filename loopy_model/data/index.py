"""Open a curated dataset by its ``index.json`` (local directory or any fsspec URI).

``index.json`` is the commit marker of a dataset (schemas/, DESIGN.md "Shards"): a superset of
wids-shard-index-v1 with, per shard, url (relative to the index), nsamples, filesize, sha256
and the sample keys in tar order. Readers refuse schema versions they do not know, naming the
dataset, its version, the supported ones and what changed (``schemas.version_refusal``; a shard
whose members have an older layout is refused by name in windows.py), and the trainer refuses
``smoke`` datasets (made with tiny random models) unless told otherwise.

A sample is addressed by its global id ``gid = shard_offset[shard] + position in shard``.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np

import schemas

# What the window sampler reads; video.mp4 and meta.json are never needed for training.
TRAIN_MEMBERS = ("latent.npy", "audio.npy", "kps.npy", "motion.npy")


@dataclass(frozen=True)
class ShardEntry:
    url: str
    nsamples: int
    filesize: int
    sha256: str
    keys: tuple[str, ...] | None


def shard_url_problem(url) -> str | None:
    """Why ``url`` could name a file outside the dataset root (or the shard cache), else None.

    A shard url is joined to the dataset root and, for remote datasets, flattened into a cache
    file name: an absolute path, a URI, a ``..`` component, a backslash or a NUL would let a
    hostile index.json read or write outside them (issue 12)."""
    if not isinstance(url, str) or not url:
        return "is empty or not a string"
    if "\\" in url or "\0" in url:
        return "contains a backslash or NUL"
    if url.startswith("/") or "://" in url or (len(url) > 1 and url[1] == ":"):
        return "is absolute"
    if ".." in url.split("/"):
        return "has a '..' component"
    return None


def open_fs(uri: str, storage_options: dict | None = None):
    """(filesystem, path) for a URI; plain paths are local."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


class DatasetIndex:
    """The shard table of one dataset, after the version and profile checks."""

    def __init__(self, uri: str, index: dict, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.raw = index
        self.profile = index["profile"]
        self.schema_version = index["schema_version"]
        self.members = tuple(index.get("members", ()))
        self.shards = [ShardEntry(e["url"], int(e["nsamples"]), int(e["filesize"]), e["sha256"],
                                  tuple(e["keys"]) if "keys" in e else None) for e in index["shardlist"]]
        for s in self.shards:
            problem = shard_url_problem(s.url)
            if problem:
                raise ValueError(f"{self.uri}/index.json: shard url {s.url!r} {problem}; "
                                 "a shard url must be a plain path inside the dataset")
        counts = np.array([s.nsamples for s in self.shards], dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_samples = int(self.shard_offsets[-1])

    # -- loading
    @classmethod
    def load(cls, uri: str, *, storage_options: dict | None = None, allow_smoke: bool = False,
             require_members=TRAIN_MEMBERS) -> "DatasetIndex":
        """Read ``uri/index.json`` (``uri`` may also name the index file itself)."""
        root = uri[: -len("/index.json")] if uri.endswith("/index.json") else uri.rstrip("/")
        fs, path = open_fs(root, storage_options)
        with fs.open(posixpath.join(path, "index.json"), "rb") as f:
            index = json.loads(f.read())
        if index.get("__kind__") != schemas.INDEX_KIND:
            raise ValueError(f"{root}/index.json is not a {schemas.INDEX_KIND} index")
        refusal = schemas.version_refusal(index.get("schema_version"), f"dataset {root}/index.json")
        if refusal:
            raise ValueError(refusal)
        schemas.validate_index(index)
        if index["profile"] == "smoke" and not allow_smoke:
            raise ValueError(f"{root} holds 'smoke' shards (features from tiny random models); "
                             "pass allow_smoke=True to train on them anyway")
        missing = [m for m in require_members if index.get("members") and m not in index["members"]]
        if missing:
            raise ValueError(f"{root}: shards lack members {missing} that training needs "
                             f"(index members: {index['members']})")
        return cls(root, index, storage_options)

    # -- addressing
    def shard_of(self, gids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.shard_offsets, gids, side="right") - 1

    def locate(self, gid: int) -> tuple[int, int]:
        shard = int(self.shard_of(np.array([gid]))[0])
        return shard, int(gid - self.shard_offsets[shard])

    def key_of(self, gid: int) -> str | None:
        shard, pos = self.locate(gid)
        keys = self.shards[shard].keys
        return None if keys is None else keys[pos]

    def key_to_gid(self) -> dict[str, int]:
        if any(s.keys is None for s in self.shards):
            raise ValueError(f"{self.uri}/index.json has shards without 'keys'; "
                             "selecting by manifest columns needs them")
        return {k: int(self.shard_offsets[i]) + j for i, s in enumerate(self.shards) for j, k in enumerate(s.keys)}

    def shard_uri(self, shard: int) -> str:
        return posixpath.join(self.uri, self.shards[shard].url)

    def fingerprint(self, gids: np.ndarray, extra: bytes = b"") -> str:
        """Identifies (shards, selected samples[, how they are drawn]): a resumed run must see the same one."""
        h = hashlib.sha256()
        h.update(json.dumps([[s.url, s.sha256, s.nsamples] for s in self.shards]).encode())
        h.update(np.ascontiguousarray(gids, dtype="<i8").tobytes())
        h.update(extra)  # empty unless sampling is balanced: older fingerprints stay valid
        return h.hexdigest()[:32]
