"""The epoch order: one global sample sequence from (seed, epoch), split into global batches.

Reference design: MosaicML streaming (StreamingDataset: "canonical nodes", shuffle blocks,
exact resume by skipping the samples already seen, elastic world size at a fixed global batch).
Unlike Mosaic, the sequence here never depends on the number of ranks or workers, so any world
size that divides the global batch can resume any run.

1. Shard order: a permutation of the shards from rng(seed, epoch).
2. Canonical partitions: the selected samples, in that shard order, are cut into
   ``num_partitions`` contiguous runs of equal length (+-1). The count is fixed by config, not by
   the world size. Samples, not shards, are cut, so a run may start mid-shard and fewer shards
   than ranks x workers is fine.
3. Bounded shuffle: inside each partition the samples are shuffled within consecutive blocks
   of ``block_size`` samples (about ``shuffle_block_shards`` shards), so a reader of one
   partition needs only the few shards of its current block.
4. Global sequence S: the partitions interleaved round-robin (S[g] comes from partition g % P).
5. Global batches: S cut into batches of ``global_batch_size``; the last batch is dropped or
   filled up by wrapping around to the start of S. Inside a batch the samples are ordered by
   partition, so with P a multiple of the world size each rank keeps reading the same partitions
   (shard locality, like Mosaic's canonical nodes) -- this reorders samples only *within* a
   batch, so the set of samples of every step stays world-size independent.
6. Rank r of W takes the r-th of W equal slices of each global batch; DataLoader worker k of K
   takes every K-th of the rank's batches, which torch's round-robin fetch yields in order.

Resume: after C = steps x global_batch samples, the run continues at global batch C / B with
any W dividing B: no sample of the epoch is repeated or skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAST_BATCH = ("drop", "wrap")
_SALT_ORDER = 0x4C6F6F70  # "Loop": separates the order's random stream from the windows'


@dataclass(frozen=True)
class OrderConfig:
    seed: int = 0
    num_partitions: int = 8
    shuffle_block_shards: int = 4
    global_batch_size: int = 32
    last_batch: str = "drop"

    def __post_init__(self):
        if self.num_partitions < 1 or self.global_batch_size < 1 or self.shuffle_block_shards < 1:
            raise ValueError("num_partitions, global_batch_size and shuffle_block_shards must be >= 1")
        if self.last_batch not in LAST_BATCH:
            raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {self.last_batch!r}")


def block_size(gid_shards: np.ndarray, cfg: OrderConfig) -> int:
    """Samples per shuffle block: ``shuffle_block_shards`` times the mean samples per shard."""
    used = max(1, len(np.unique(gid_shards)))
    return max(1, round(cfg.shuffle_block_shards * len(gid_shards) / used))


def global_sequence(gids: np.ndarray, gid_shards: np.ndarray, n_shards: int, cfg: OrderConfig,
                    epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-4: (S, partition of each position), both int64 [len(gids)]."""
    n, parts = len(gids), cfg.num_partitions
    rng = np.random.default_rng([cfg.seed, epoch, _SALT_ORDER])
    shard_rank = np.empty(n_shards, dtype=np.int64)
    shard_rank[rng.permutation(n_shards)] = np.arange(n_shards)
    by_shard = gids[np.argsort(shard_rank[gid_shards], kind="stable")]  # 1. shard order, tar order inside

    lengths = n // parts + (np.arange(parts) < n % parts)  # 2. equal runs, +-1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    part_of = np.repeat(np.arange(parts), lengths)
    within = np.arange(n) - starts[part_of]
    block = part_of * (n + 1) + within // block_size(gid_shards, cfg)  # 3. blocks never cross partitions
    shuffled = by_shard[np.lexsort((rng.random(n), block))]

    q, rem = divmod(n, parts)  # 4. S[g] = partition g % P, item g // P; the +1 items come last
    g = np.arange(n)
    part = np.where(g < q * parts, g % parts, g - q * parts)
    item = np.where(g < q * parts, g // parts, q)
    return shuffled[starts[part] + item], part


class EpochPlan:
    """Steps 5-6 for one epoch: which global positions every (rank, worker) reads per step."""

    def __init__(self, gids: np.ndarray, gid_shards: np.ndarray, n_shards: int, cfg: OrderConfig, epoch: int):
        self.cfg, self.epoch = cfg, epoch
        seq, part = global_sequence(gids, gid_shards, n_shards, cfg, epoch)
        self.sequence = seq  # S: where the stand-ins for a clip of an unreadable shard come from
        n, b = len(seq), cfg.global_batch_size
        self.num_unique = n
        self.num_batches = n // b if cfg.last_batch == "drop" else -(-n // b)
        total = self.num_batches * b
        take = np.arange(total) % max(n, 1)  # wrap: positions past the end restart at S[0]
        self.is_pad = np.arange(total) >= n
        batch_of = np.arange(total) // b
        order = np.lexsort((part[take] if n else take, batch_of))  # 5. by partition inside a batch
        self.position = np.arange(total)[order]  # global position (seeds the window sampling)
        self.gid = seq[take][order] if n else take
        self.is_pad = self.is_pad[order]
        self.partition = part[take][order] if n else take

    def rank_slice(self, batch: int, rank: int, world: int) -> slice:
        b = self.cfg.global_batch_size
        if b % world:
            raise ValueError(f"global batch {b} is not divisible by world size {world}")
        per = b // world
        return slice(batch * b + rank * per, batch * b + (rank + 1) * per)

    def batches_for(self, worker: int = 0, num_workers: int = 1, start_batch: int = 0) -> list[int]:
        """Global batches a DataLoader worker produces (for its rank's slice), in yield order."""
        return list(range(start_batch + worker, self.num_batches, num_workers))

    def stand_in_positions(self, position: int):
        """Positions of S, in the order tried, whose clip stands in for the clip at ``position``
        when that clip's shard cannot be read (docs/loader.md "Faults"): first the next clips of
        the same partition (S[g + P], S[g + 2P], ...: the same shuffle block, so shards this reader
        has open), then every position after it, wrapping around. Depends on the plan only, so
        the same unreadable shards give the same stand-ins on every rank, worker and resume."""
        n, parts = self.num_unique, self.cfg.num_partitions
        g = position % n
        yield from range(g + parts, (n // parts) * parts, parts)  # same partition while g + kP < qP
        for d in range(1, n):
            yield (g + d) % n
