"""Small synthetic datasets for the loader tests, written with the real ShardWriter.

Members carry their own coordinates so tests can check what a window contains (schema 2.0):
latent mean[t] = (t, clip, 1, -1) (with ``store_std``: std = 0.5 on channels 4..7), audio[t, l] = t,
kps[t, :, 0] = t, motion[i] = raw (1000 + clip, 2000 + i), normalised 1e-4 * (clip + i / 1000, -i)
(realistic magnitudes: 1e-4 is a 1% of face size RMS motion): a window's A2L variances show which
columns the loader read. Shapes are tiny (latent [T,4,4,4]).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.shards import ShardWriter, build_index, npy_bytes, write_index

HW, LAYERS, DIM = 4, 3, 4


def sample_members(clip: int, frames: int, key: str, profile: str, store_std: bool = False,
                   schema_1: bool = False, nan_motion: bool = False) -> dict[str, bytes]:
    """``schema_1``: the pre-2.0 layout (latent mean+std, motion.npy with 2 raw columns).
    ``nan_motion``: odd window starts are not measurable (NaN, too few valid keypoints)."""
    t = np.arange(frames, dtype=np.float32)
    latent = np.zeros((frames, 8 if store_std or schema_1 else 4, HW, HW), dtype=np.float16)
    latent[:, 0] = t[:, None, None]  # fp16 holds these integers exactly (< 2048)
    latent[:, 1] = clip
    latent[:, 2], latent[:, 3] = 1, -1
    latent[:, 4:] = 0.5
    audio = np.broadcast_to(t[:, None, None], (frames, LAYERS, DIM)).astype(np.float16)
    kps = np.zeros((frames, 68, 3), dtype=np.float32)
    kps[:, :, 0] = t[:, None]
    windows = max(frames - 11, 0)
    i = np.arange(windows, dtype=np.float64)
    motion = np.stack([1000 + clip + 0 * i, 2000 + i, 1e-4 * (clip + i / 1000), -1e-4 * i], 1).astype(np.float32)
    if nan_motion:
        motion[1::2] = np.nan
    if schema_1:
        motion = motion[:, :2]
    meta = {"key": key, "profile": profile}
    return {"latent.npy": npy_bytes(latent), "audio.npy": npy_bytes(audio), "kps.npy": npy_bytes(kps),
            "motion.npy": npy_bytes(motion), "meta.json": json.dumps(meta).encode(),
            "video.mp4": bytes(256)}


def make_dataset(root: str | Path, shard_sizes: list[int], frames=(20, 160), profile: str = "full",
                 seed: int = 0, manifest: bool = True, scores: bool = True, store_std: bool = False,
                 schema_1: bool = False, nan_motion: bool = False) -> Path:
    """Shards with exactly ``shard_sizes[i]`` samples each; returns the dataset root.
    ``schema_1``: a dataset as schema 1.0 wrote it (members and index.json version)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(root, max_bytes=1 << 40)
    rows, score_rows, clip = [], [], 0
    for size in shard_sizes:
        for _ in range(size):
            key = f"vid{clip:03d}_{clip % 7:04d}"
            n = int(rng.integers(frames[0], frames[1] + 1))
            url = writer.write(key, sample_members(clip, n, key, profile, store_std, schema_1, nan_motion))
            rows.append({"key": key, "shard": url, "n_frames": n, "profile": profile, "clip": clip})
            score_rows.append({"key": key, "sync_conf": float(clip % 10), "yaw_abs_max": float(clip % 40)})
            clip += 1
        writer.close_current()
    index = build_index(writer.closed_shards, profile=profile, name="synthetic",
                        members=["latent.npy", "audio.npy", "kps.npy", "motion.npy", "meta.json", "video.mp4"],
                        pipeline_version="test")
    if schema_1:
        index["schema_version"] = "1.0"
    write_index(root, index)
    if manifest:
        pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    if scores:
        pq.write_table(pa.Table.from_pylist(score_rows), root / "scores.parquet")
    return root


def write_identities(root: str | Path, identity_of: dict[str, int | None], model: str = "test-arcface") -> Path:
    """identities.parquet as jobs/identities.py writes it: key, identity_id, cluster_size, identity_model
    (``None``: a null identity_id). cluster_size counts the listed clips of the identity."""
    sizes: dict = {}
    for i in identity_of.values():
        sizes[i] = sizes.get(i, 0) + 1
    table = pa.table({"key": pa.array(list(identity_of), pa.string()),
                      "identity_id": pa.array(list(identity_of.values()), pa.int64()),
                      "cluster_size": pa.array([sizes[i] for i in identity_of.values()], pa.int32()),
                      "identity_model": pa.array([model] * len(identity_of), pa.string())})
    path = Path(root) / "identities.parquet"
    pq.write_table(table, path)
    return path


def clip_number(key: str) -> int:
    return int(key[3:6])


def loader_config(root, **overrides):
    """A LoaderConfig for the tiny datasets: 12 clips per step, few partitions, real windows."""
    from loopy_model.data import LoaderConfig, WindowConfig

    windows = overrides.pop("windows", WindowConfig(windows_per_clip=1))
    base = dict(uri=str(root), global_batch_size=12, num_partitions=6, shuffle_block_shards=2,
                io_threads=2, prefetch_clips=4, windows=windows)
    base.update(overrides)
    return LoaderConfig(**base)


def take(loader, n: int) -> list[dict]:
    """The next ``n`` batches of a StreamingLoader, continuing into later epochs as needed."""
    out = []
    while len(out) < n:
        before = len(out)
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
        if len(out) == before:
            raise RuntimeError("loader yielded nothing")
    return out


def assert_resumed_equals(resumed: dict, arrays, expected: list[dict]) -> None:
    """A resumed child's batches (keys, steps, every tensor) equal the uninterrupted run's."""
    import numpy as np
    import torch

    assert resumed["keys"] == [b["keys"] for b in expected]
    assert resumed["steps"] == [[b["epoch"], b["batch_index"]] for b in expected]
    for i, b in enumerate(expected):
        for name, value in b.items():
            if isinstance(value, torch.Tensor):
                assert np.array_equal(arrays[f"{i}_{name}"], value.numpy()), (i, name)
