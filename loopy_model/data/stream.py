"""The streaming training dataset and its resumable loader.

``StreamingWindowDataset`` is a torch ``IterableDataset`` that yields whole per-rank batches
(use it with ``DataLoader(batch_size=None)``, which ``StreamingLoader`` does for you):

    ds = StreamingWindowDataset(LoaderConfig("s3://bucket/ds", global_batch_size=24,
                                             where="sync_conf >= 5", cache_dir="/local/cache"))
    loader = StreamingLoader(ds, num_workers=4, pin_memory=True)
    loader.load_state_dict(ckpt["data"])          # optional: continue a run exactly
    for batch in loader:                          # one epoch (the rest of it after a resume)
        ...; ckpt["data"] = loader.state_dict()   # small dict: seed, epoch, samples, ...

Order and splitting: partition.py. Shard access: store.py. Windows: windows.py.
The position (epoch, samples consumed globally) advances only when the training loop receives
a batch, so batches prefetched by workers but never used are produced again after a resume.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import identity as ident
from .collate import collate_windows
from .index import TRAIN_MEMBERS, DatasetIndex
from .partition import EpochPlan, OrderConfig
from .select import select_samples
from .store import SKIP_REASONS, NoReadableShardError, ShardFile, ShardStore, ShardUnreadable
from .windows import WindowConfig, clip_windows

log = logging.getLogger(__name__)

STATE_VERSION = 1
_SALT_WINDOWS = 0x57494E44  # "WIND": the windows' random stream, apart from the order's


@dataclass
class LoaderConfig:
    uri: str  # dataset root (holds index.json): a directory or an fsspec URI
    global_batch_size: int = 32  # clips per optimizer step, summed over all ranks
    seed: int = 0
    num_partitions: int = 8  # canonical partitions; fixed for the life of a run (docs/loader.md)
    shuffle_block_shards: int = 4  # shuffle buffer, in shards' worth of samples
    last_batch: str = "drop"  # drop | wrap: the incomplete last global batch
    where: str | None = None  # selection over manifest(+scores) columns
    split: str | None = None  # "train:0.02" | "val:0.02": identity-disjoint side (identity.py)
    balance: str | None = None  # None (each clip once per epoch) | "identity" (identity.py)
    balance_temperature: float | None = None  # p(identity) ∝ clips ** (1/T); None = uniform
    allow_smoke: bool = False
    storage_options: dict | None = None  # fsspec options (endpoint, credentials, ...)
    cache_dir: str | None = None  # local shard cache for remote datasets
    cache_limit_bytes: int = 64 << 30
    verify_sha256: bool = False
    retries: int = 4  # per shard fetch, on transient errors (connection, 5xx, timeout)
    retry_backoff_s: float = 0.5
    permanent_retries: int = 2  # on not found / access denied / corrupt bytes, then the shard is skipped
    skip_unreadable_shards: bool = True  # False: a corrupt or missing shard is an error (checking a dataset)
    max_failed_shards_in_a_row: int = 8  # failed shard fetches with no success between: the storage is gone
    io_threads: int = 4  # per process: clips read and windowed concurrently
    prefetch_clips: int = 16  # clips in flight ahead of the one being batched
    prefetch_shards: int = 2  # distinct shards fetched ahead (remote datasets)
    windows: WindowConfig = field(default_factory=WindowConfig)


def resolve_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torch.distributed, else torchrun's env, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamingWindowDataset(IterableDataset):
    def __init__(self, cfg: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        self.cfg = cfg
        self.rank, self.world_size = resolve_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.index = DatasetIndex.load(cfg.uri, storage_options=cfg.storage_options, allow_smoke=cfg.allow_smoke)
        self.gids, self.balance = self._identity_selection(select_samples(self.index, cfg.where, cfg.allow_smoke))
        self.fingerprint = self.index.fingerprint(self.gids, b"" if self.balance is None
                                                  else self.balance.fingerprint_bytes())
        self.order = OrderConfig(cfg.seed, cfg.num_partitions, cfg.shuffle_block_shards,
                                 cfg.global_batch_size, cfg.last_batch)
        self.epoch, self.samples = 0, 0  # position: the next global sample of this epoch
        self._plan: EpochPlan | None = None
        self._store: ShardStore | None = None
        self._store_pid = None
        self._check_start()

    def _check_start(self) -> None:
        b, w = self.order.global_batch_size, self.world_size
        if b % w:
            raise ValueError(f"global_batch_size {b} must be divisible by the world size {w} "
                             "(keep it fixed across resumes; change only the world size)")
        n = len(self.gids)
        if self.plan(self.epoch).num_batches == 0:
            raise ValueError(f"{self.index.uri}: {n} selected clips make no global batch of {b} with "
                             f"last_batch='drop'; lower global_batch_size or use last_batch='wrap'")
        if self.samples % b:
            raise ValueError(f"resume point {self.samples} samples is not a multiple of the global batch {b}")

    def _identity_selection(self, gids: np.ndarray) -> tuple[np.ndarray, "ident.IdentityBalance | None"]:
        """Apply ``split`` to the selected ids and set up ``balance`` (identity.py)."""
        cfg = self.cfg
        split = ident.parse_split(cfg.split)
        ident.check_balance(cfg.balance, cfg.balance_temperature)
        if split is None and cfg.balance is None:
            return gids, None
        why = " and ".join(f"{name}={value!r}" for name, value in (("split", cfg.split), ("balance", cfg.balance))
                           if value)
        identity, known, keys = ident.identity_groups(self.index, gids, why)
        if split is not None:
            side = ident.split_mask(identity, known, keys, *split)
            gids, identity, known = gids[side], identity[side], known[side]
        if cfg.balance is None or not len(gids):  # nothing to balance: _check_start says so
            return gids, None
        return gids, ident.IdentityBalance(gids, ident.dense_groups(identity, known), cfg.balance_temperature)

    def __getstate__(self):  # for spawned DataLoader workers: no threads, no cached plan
        state = dict(self.__dict__)
        state.update(_store=None, _store_pid=None, _plan=None)
        return state

    # -- order
    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch or self._plan.cfg != self.order:
            # balanced: the epoch's drawn clips (repeats included), then the same ordering
            gids = self.gids if self.balance is None else self.balance.draw(self.order.seed, epoch)
            self._plan = EpochPlan(gids, self.index.shard_of(gids), len(self.index.shards), self.order, epoch)
        return self._plan

    def __len__(self) -> int:
        """Batches this rank yields from the current position to the end of the epoch."""
        return self.plan(self.epoch).num_batches - self.samples // self.order.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning -- unless it is the current one: calling
        ``set_epoch(e)`` at the top of every epoch (DistributedSampler style) keeps a resumed
        mid-epoch position."""
        if int(epoch) != self.epoch:
            self.epoch, self.samples = int(epoch), 0

    # -- state
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.order.seed, "epoch": self.epoch,
                "samples": self.samples, "num_partitions": self.order.num_partitions,
                "shuffle_block_shards": self.order.shuffle_block_shards,
                "last_batch": self.order.last_batch, "global_batch_size": self.order.global_batch_size,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; the order parameters come from the state."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the dataset, the selection (where, split) or the balance changed since this state "
                             "was saved "
                             f"(fingerprint {state['fingerprint']} != {self.fingerprint})")
        self.order = OrderConfig(state["seed"], state["num_partitions"], state["shuffle_block_shards"],
                                 self.order.global_batch_size, state["last_batch"])
        self.epoch, self.samples = int(state["epoch"]), int(state["samples"])
        self._check_start()

    def mark_consumed(self, batch: dict) -> None:
        """Advance the position past ``batch`` (call once per batch the training loop used)."""
        b = self.order.global_batch_size
        self.epoch, self.samples = batch["epoch"], (batch["batch_index"] + 1) * b
        if batch["batch_index"] + 1 >= self.plan(self.epoch).num_batches:
            self.epoch, self.samples = self.epoch + 1, 0

    # -- reading
    def store(self) -> ShardStore:
        if self._store is None or self._store_pid != os.getpid():  # one per (worker) process
            c, o = self.cfg, self.order
            in_flight = 2 * o.num_partitions * (o.shuffle_block_shards + 1)  # shards a pass may interleave
            self._store = ShardStore(self.index, cache_dir=c.cache_dir, cache_limit_bytes=c.cache_limit_bytes,
                                     verify=c.verify_sha256, retries=c.retries, backoff_s=c.retry_backoff_s,
                                     max_open=max(16, in_flight), permanent_retries=c.permanent_retries,
                                     max_failed_in_a_row=c.max_failed_shards_in_a_row, members=TRAIN_MEMBERS)
            if not self._store.local:
                self._warn_small_cache()
            self._store_pid = os.getpid()
        return self._store

    def _warn_small_cache(self) -> None:
        """A node reads ~ (its partitions) x (block + 1) shards at a time; less cache re-downloads."""
        o, local_ranks = self.order, int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        parts = min(o.num_partitions, -(-o.num_partitions // self.world_size) * local_ranks)
        mean = sum(s.filesize for s in self.index.shards) / max(len(self.index.shards), 1)
        need = parts * (o.shuffle_block_shards + 1) * mean + self.cfg.prefetch_shards * mean
        if self.cfg.cache_limit_bytes < need:
            log.warning("cache_limit_bytes=%d is below the ~%d bytes of shards this node reads at a time; "
                        "shards will be downloaded more than once per epoch", self.cfg.cache_limit_bytes, need)

    def _readable_clip(self, plan: EpochPlan, position: int, gid: int) -> tuple[ShardFile, int, dict[str, str]]:
        """(open shard, gid) of the clip to read at ``position``: its own, or -- when its shard
        cannot be read -- the first stand-in (``plan.stand_in_positions``) whose shard can; and
        {url: "reason: problem"} of the unreadable shards passed over."""
        store, skipped = self.store(), {}
        candidates = iter(plan.stand_in_positions(position))
        while True:
            shard = int(self.index.shard_of(np.array([gid]))[0])
            if shard not in store.failures:
                try:
                    return store.open(shard), gid, skipped
                except ShardUnreadable:
                    if not self.cfg.skip_unreadable_shards:
                        raise
            err = store.failures[shard]
            if not self.cfg.skip_unreadable_shards:
                raise type(err)(str(err))
            skipped[self.index.shards[shard].url] = f"{err.reason}: {err}"
            nxt = next(candidates, None)
            if nxt is None:
                raise NoReadableShardError(store.failure_report(
                    f"{self.index.uri}: no shard holding a selected clip could be read"))
            gid = int(plan.sequence[nxt])

    def _load_clip(self, plan: EpochPlan, j: int, epoch: int) -> tuple[list[dict], int, dict[str, str]]:
        position = int(plan.position[j])
        f, gid, skipped = self._readable_clip(plan, position, int(plan.gid[j]))
        shard, pos = self.index.locate(gid)
        keys = self.index.shards[shard].keys
        key = keys[pos] if keys is not None else f.keys[pos]
        # seeded by the position, not the clip: a stand-in gets the window the position would have had
        rng = np.random.default_rng([self.order.seed, epoch, position, _SALT_WINDOWS])
        windows, nbytes = clip_windows(f, key, rng, self.cfg.windows)
        for w in windows:
            w["sample_position"], w["is_padding"] = position, bool(plan.is_pad[j])
            w["is_stand_in"] = bool(skipped)
        return windows, nbytes, skipped

    def readable_sample(self) -> tuple[ShardFile, str]:
        """(open shard, key) of the first sample of the first readable shard, in index order
        (what the trainer inspects for the data layout)."""
        store = self.store()
        for shard, entry in enumerate(self.index.shards):
            if not entry.nsamples:
                continue
            try:
                f = store.open(shard)
            except ShardUnreadable:
                continue
            return f, entry.keys[0] if entry.keys else f.keys[0]
        raise NoReadableShardError(store.failure_report(f"{self.index.uri}: no shard could be read"))

    def __iter__(self):
        epoch, start = self.epoch, self.samples // self.order.global_batch_size  # fixed for this pass
        plan = self.plan(epoch)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = plan.batches_for(worker, workers, start)
        per_batch = self.order.global_batch_size // self.world_size
        slices = [plan.rank_slice(b, self.rank, self.world_size) for b in batches]
        jobs = [j for sl in slices for j in range(sl.start, sl.stop)]  # plan rows, in yield order
        shards = self.index.shard_of(plan.gid[jobs]).tolist()
        upcoming = list(dict.fromkeys(shards))  # distinct shards in first-use order
        first_use = {s: i for i, s in enumerate(upcoming)}
        store = self.store()
        store.forget_failures()  # each pass tries unreadable shards again (fresh workers do anyway)
        pool = ThreadPoolExecutor(max(1, self.cfg.io_threads), thread_name_prefix="clip-read")
        pending: deque = deque()
        submitted = 0
        try:
            for b in batches:
                # keep this batch's clips + prefetch_clips in flight, and the next shards fetching
                while submitted < len(jobs) and len(pending) < per_batch + self.cfg.prefetch_clips:
                    at = first_use[shards[submitted]]
                    for s in upcoming[at: at + 1 + self.cfg.prefetch_shards]:
                        store.prefetch(s)  # no-op once requested
                    pending.append(pool.submit(self._load_clip, plan, jobs[submitted], epoch))
                    submitted += 1
                windows, nbytes, skipped = [], 0, {}
                for _ in range(per_batch):
                    w, n, passed_over = pending.popleft().result()
                    windows.extend(w)
                    nbytes += n
                    skipped.update(passed_over)
                batch = collate_windows(windows, epoch=epoch, batch_index=b)
                batch["bytes_read"] = int(nbytes)
                batch["skipped_shards"] = skipped  # url -> "reason: problem", for StreamingLoader's counts
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


class StreamingLoader:
    """A torch DataLoader over a StreamingWindowDataset that knows where it is in the epoch, and
    counts the unreadable shards its batches skipped (``fault_stats``)."""

    def __init__(self, dataset: StreamingWindowDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None, timeout: float = 0):
        self.dataset = dataset
        pin_memory = pin_memory and torch.cuda.is_available()  # nothing to pin for on a CPU-only host
        self.kwargs = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory, timeout=timeout,
                           persistent_workers=False,  # workers must see the position of each new pass
                           multiprocessing_context=multiprocessing_context)
        if num_workers > 0 and prefetch_factor is not None:
            self.kwargs["prefetch_factor"] = prefetch_factor
        self.skipped_shards: dict[str, str] = {}  # url -> "reason: problem", over this loader's life
        self.stand_in_clips = 0  # clips of this rank read in place of a skipped shard's

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        """The rest of the current epoch; the next call continues with the next epoch."""
        for batch in DataLoader(self.dataset, **self.kwargs):
            self._count_faults(batch)
            self.dataset.mark_consumed(batch)
            yield batch

    def _count_faults(self, batch: dict) -> None:
        for url, problem in batch.get("skipped_shards", {}).items():
            if url not in self.skipped_shards:
                self.skipped_shards[url] = problem
                log.warning("rank %d: skipping shard %s (%s); its clips are replaced by the next readable "
                            "clips of the epoch (docs/loader.md, Faults)", self.dataset.rank, url, problem)
        self.stand_in_clips += int(batch["is_stand_in"].sum()) // self.dataset.cfg.windows.windows_per_clip

    def fault_stats(self) -> dict[str, int]:
        """Counters for the training metrics: distinct shards skipped (all, and per reason) and
        clips replaced, as this rank's loader met them since it was created."""
        reasons = [p.split(":", 1)[0] for p in self.skipped_shards.values()]
        stats = {"skipped_shards": len(reasons)}
        stats.update({f"skipped_{r}": reasons.count(r) for r in SKIP_REASONS})
        stats["stand_in_clips"] = self.stand_in_clips
        return stats

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
