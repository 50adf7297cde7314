"""Epoch order: a world-size-independent permutation, equal steps per rank, elastic resume."""
from collections import Counter

import numpy as np
import pytest

from loader_fixtures import loader_config, make_dataset, take
from loopy_model.data import EpochPlan, OrderConfig, StreamingLoader, StreamingWindowDataset, global_sequence

UNEVEN = [7, 3, 11, 1, 6, 5, 9, 6]  # 48 clips in shards of very different sizes


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("uneven"), UNEVEN, frames=(12, 40))


def test_global_sequence_is_a_seeded_permutation_with_bounded_shuffle():
    shards = np.repeat(np.arange(8), UNEVEN)
    gids = np.arange(len(shards))
    cfg = OrderConfig(seed=3, num_partitions=4, shuffle_block_shards=1, global_batch_size=12)
    s0, part = global_sequence(gids, shards, 8, cfg, epoch=0)
    assert sorted(s0.tolist()) == gids.tolist()
    assert np.array_equal(s0, global_sequence(gids, shards, 8, cfg, epoch=0)[0])  # deterministic
    assert not np.array_equal(s0, global_sequence(gids, shards, 8, cfg, epoch=1)[0])  # reshuffled per epoch
    assert not np.array_equal(s0, global_sequence(gids, shards, 8, OrderConfig(seed=4, num_partitions=4,
                                                                               shuffle_block_shards=1), 0)[0])
    assert part.tolist()[:8] == [0, 1, 2, 3, 0, 1, 2, 3]  # partitions interleaved round-robin
    # bounded buffer: with 6-sample shards and 1-shard blocks, each block is one whole shard
    even = np.repeat(np.arange(8), 6)
    seq, part = global_sequence(gids, even, 8, cfg, epoch=0)
    shuffled_inside = 0
    for p in range(4):
        run = seq[part == p]
        for block in run.reshape(-1, 6):
            assert len(set(even[block])) == 1
            shuffled_inside += not np.all(np.diff(block) > 0)
    assert shuffled_inside > 0


def test_every_rank_gets_the_same_number_of_batches_and_each_clip_once(uneven):
    for world in (1, 2, 3, 4, 6):
        per_rank = []
        for rank in range(world):
            ds = StreamingWindowDataset(loader_config(uneven), rank=rank, world_size=world)
            per_rank.append([(b["batch_index"], b["keys"]) for b in StreamingLoader(ds)])
        assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) == 4  # 48 / 12
        keys = [k for r in per_rank for _, ks in r for k in ks]
        assert len(keys) == 48 and len(set(keys)) == 48
        if world == 1:
            reference = [set(ks) for _, ks in per_rank[0]]
        else:  # the set of clips of every step does not depend on the world size
            assert [set().union(*(r[i][1] for r in per_rank)) for i in range(4)] == reference


def test_drop_and_wrap_keep_ranks_equal_with_a_partial_last_batch(tmp_path):
    root = make_dataset(tmp_path, [5, 9, 2, 14, 1], frames=(12, 30))  # 31 clips, batch 12
    for mode, steps in (("drop", 2), ("wrap", 3)):
        counts, keys, pads = [], Counter(), 0
        for rank in range(3):
            ds = StreamingWindowDataset(loader_config(root, last_batch=mode), rank=rank, world_size=3)
            batches = list(StreamingLoader(ds))
            counts.append(len(batches))
            for b in batches:
                keys.update(b["keys"])
                pads += int(b["is_padding"].sum())
        assert counts == [steps] * 3
        if mode == "drop":
            assert sum(keys.values()) == 24 and max(keys.values()) == 1
        else:  # wrap: all 31 once, 5 repeated from the start of the order, flagged as padding
            assert len(keys) == 31 and sum(keys.values()) == 36 and pads == 5


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    root = make_dataset(tmp_path, [10, 14], frames=(12, 20))  # 2 shards, 2 ranks x 2 workers
    seen = []
    for rank in range(2):
        ds = StreamingWindowDataset(loader_config(root), rank=rank, world_size=2)
        batches = list(StreamingLoader(ds, num_workers=2))
        assert [b["batch_index"] for b in batches] == [0, 1]  # in order across workers
        seen += [k for b in batches for k in b["keys"]]
    assert len(seen) == 24 and len(set(seen)) == 24
    with pytest.raises(ValueError, match="no global batch"):
        StreamingWindowDataset(loader_config(root, global_batch_size=32), rank=0, world_size=2)
    with pytest.raises(ValueError, match="divisible by the world size"):
        StreamingWindowDataset(loader_config(root), rank=0, world_size=5)


def _elastic(root, world_before: int, world_after: int, steps_before: int):
    states = []
    used = []
    for rank in range(world_before):
        loader = StreamingLoader(StreamingWindowDataset(loader_config(root), rank=rank, world_size=world_before))
        used += [b for b in take(loader, steps_before)]
        states.append(loader.state_dict())
    assert all(s == states[0] for s in states)  # every rank saves the same small state
    assert states[0]["samples"] == steps_before * 12
    for rank in range(world_after):
        ds = StreamingWindowDataset(loader_config(root), rank=rank, world_size=world_after)
        ds.load_state_dict(states[0])
        used += list(StreamingLoader(ds))
    return used


@pytest.mark.parametrize("before,after", [(4, 2), (2, 3)])
def test_elastic_resume_sees_each_clip_exactly_once(uneven, before, after):
    used = _elastic(uneven, before, after, steps_before=2)
    keys = Counter(k for b in used for k in b["keys"])
    assert len(keys) == 48 and set(keys.values()) == {1}
    # and step by step the same clips as an uninterrupted single-rank run
    steps = {}
    for b in used:
        steps.setdefault(b["batch_index"], set()).update(b["keys"])
    single = list(StreamingLoader(StreamingWindowDataset(loader_config(uneven), rank=0, world_size=1)))
    assert [steps[i] for i in range(4)] == [set(b["keys"]) for b in single]


def test_plan_splits_batches_round_robin_over_workers():
    shards = np.repeat(np.arange(3), [4, 4, 4])
    plan = EpochPlan(np.arange(12), shards, 3, OrderConfig(global_batch_size=2, num_partitions=2), 0)
    assert plan.num_batches == 6
    assert plan.batches_for(0, 4, start_batch=1) == [1, 5] and plan.batches_for(3, 4, start_batch=1) == [4]
    assert plan.rank_slice(2, 1, 2) == slice(5, 6)


def test_rank_and_world_come_from_args_torch_distributed_or_env(monkeypatch, tmp_path):
    import torch.distributed as dist

    from loopy_model.data import resolve_world

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_world() == (2, 3) and resolve_world(1, 4) == (1, 4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert resolve_world() == (0, 1)
    finally:
        dist.destroy_process_group()
