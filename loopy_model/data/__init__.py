"""Streaming training data for Loopy: deterministic, exactly resumable, elastic (docs/loader.md).

    index.py      open index.json (schema/profile checks), sample addressing, fingerprint
    select.py     train-time selection: safe ``where`` expressions over manifest + scores
    identity.py   identity-disjoint train/val splits and identity-balanced epochs (identities.parquet)
    partition.py  the epoch order: shards shuffled, canonical partitions, global batches
    store.py      shard access: local byte ranges, remote LRU cache, prefetch, retries, sha256
    windows.py    Loopy windows: 12 targets, 20 TSM motion latents, reference, audio, A2L conds
    collate.py    fixed-shape batches
    stream.py     StreamingWindowDataset (IterableDataset) and StreamingLoader (state_dict)
"""
from .collate import collate_windows
from .identity import IDENTITIES_FILE, IdentityBalance, parse_split
from .index import DatasetIndex, TRAIN_MEMBERS
from .partition import EpochPlan, OrderConfig, global_sequence
from .select import parse_where, select_samples
from .store import ShardStore
from .stream import LoaderConfig, StreamingLoader, StreamingWindowDataset, resolve_world
from .windows import WindowConfig, clip_windows

__all__ = [
    "DatasetIndex", "TRAIN_MEMBERS", "EpochPlan", "OrderConfig", "global_sequence", "parse_where",
    "select_samples", "ShardStore", "LoaderConfig", "StreamingLoader", "StreamingWindowDataset",
    "resolve_world", "WindowConfig", "clip_windows", "collate_windows", "IDENTITIES_FILE", "IdentityBalance",
    "parse_split",
]
