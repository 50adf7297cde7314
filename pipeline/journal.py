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
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import uuid
from pathlib import Path

from schemas import SHARD_DIR

from .shards import ShardInfo, atomic_write_json


class ConfigMismatch(RuntimeError):
    pass


# Fields that change how fast or where things run, not what is computed: a run may resume on a
# resized cluster.
_RESOURCE_FIELDS = {
    "ray": None, "model_dir": None,
    "dedup": None,  # thresholds of jobs/dedup.py, a later job over the finished output
    "write": ("dataset_name",),
    "features": ("device", "batch_size", "num_gpus", "num_cpus", "actors"),
    "score": ("syncnet_batch_size", "num_gpus", "actors"),
}


def config_fingerprint(config_dict: dict) -> str:
    relevant = copy.deepcopy(config_dict)
    for section, fields in _RESOURCE_FIELDS.items():
        if fields is None:
            relevant.pop(section, None)
        else:
            for f in fields:
                relevant.get(section, {}).pop(f, None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class Journal:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "_journal"
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.dir / "videos").mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock of the output for one run (a second concurrent run fails at once)."""
        f = open(self.dir / "lock", "w")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigMismatch(f"{self.root} is being written by another run (lock {self.dir / 'lock'})") from None
            yield
        finally:
            f.close()

    # -- config
    def check_config(self, fingerprint: str, config_dict: dict, force: bool = False) -> None:
        path = self.dir / "config.json"
        if path.exists() and not force:
            old = json.loads(path.read_text())
            if old["fingerprint"] != fingerprint:
                raise ConfigMismatch(
                    f"{self.root} was written with a different configuration (fingerprint {old['fingerprint']}, "
                    f"now {fingerprint}); use a new output directory, or --force-resume to mix them")
        atomic_write_json(path, {"fingerprint": fingerprint, "config": config_dict})

    # -- shards
    def record_shard(self, info: ShardInfo, manifest_rows: list[dict], score_rows: list[dict] | None = None) -> None:
        name = Path(info.url).stem
        atomic_write_json(self.dir / "shards" / f"{name}.json",
                          {"shard": info.as_index_entry(), "manifest": manifest_rows, "scores": score_rows or []})

    def shards(self) -> list[dict]:
        out = [json.loads(p.read_text()) for p in sorted((self.dir / "shards").glob("shard-*.json"))]
        return sorted(out, key=lambda e: e["shard"]["url"])

    def remove_orphan_shards(self) -> list[Path]:
        known = {Path(e["shard"]["url"]).name for e in self.shards()}
        removed = []
        shard_dir = self.root / SHARD_DIR
        if shard_dir.is_dir():
            for p in shard_dir.glob("shard-*.tar"):
                if p.name not in known:
                    p.unlink()
                    removed.append(p)
        return removed

    def next_shard_index(self) -> int:
        names = [Path(e["shard"]["url"]).stem for e in self.shards()]
        return max((int(n.split("-")[1]) for n in names), default=-1) + 1

    # -- videos
    def record_videos(self, videos: list[dict]) -> None:
        if videos:
            atomic_write_json(self.dir / "videos" / f"part-{os.getpid()}-{uuid.uuid4().hex[:12]}.json",
                              {"videos": videos})

    def videos(self) -> list[dict]:
        """The latest journaled outcome of every input (a retried input replaces its old entry)."""
        parts = sorted((self.dir / "videos").glob("part-*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        out: dict[str, dict] = {}
        for p in parts:
            for v in json.loads(p.read_text())["videos"]:
                out[v["video"]["uri"]] = v
        return list(out.values())
