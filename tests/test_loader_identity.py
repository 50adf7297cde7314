"""Identity-aware loading (loopy_model/data/identity.py): identity-balanced epochs within 10% of
uniform on a skewed dataset, the temperature's definition, identity-disjoint splits, and both
through exact (new-process) and elastic resume."""
import importlib.util
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loader_fixtures import assert_resumed_equals, loader_config, make_dataset, take, write_identities
from loopy_model.data import IdentityBalance, StreamingLoader, StreamingWindowDataset, WindowConfig
from loopy_model.data.identity import (check_balance, dense_groups, identity_probabilities, identity_unit,
                                       parse_split, split_mask)

ROOT = Path(__file__).resolve().parents[1]
SIZES = np.arange(1, 41)  # 40 identities with 1..40 clips: 820 clips, the largest 40x the smallest


def _keys(root) -> list[str]:
    return pq.read_table(Path(root) / "manifest.parquet")["key"].to_pylist()


def _skewed_identities(keys, seed=0) -> dict[str, int]:
    """Identity ``1000 + 7 s`` has ``s`` clips, scattered over the shards."""
    ids = np.repeat(SIZES, SIZES)
    np.random.default_rng(seed).shuffle(ids)
    return {k: int(1000 + 7 * s) for k, s in zip(keys, ids)}


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("skewed"), [20] * 41, frames=(12, 16))
    identity_of = _skewed_identities(_keys(root))
    write_identities(root, identity_of)
    return root, identity_of


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """60 clips: identities of 1..10 clips (55) and 5 clips the table does not list."""
    root = make_dataset(tmp_path_factory.mktemp("small"), [9, 4, 13, 7, 2, 11, 8, 6], frames=(14, 60))
    keys = _keys(root)
    ids = np.repeat(np.arange(1, 11), np.arange(1, 11))
    np.random.default_rng(1).shuffle(ids)
    write_identities(root, {k: int(i) for k, i in zip(keys[:55], ids)})
    return root


def _epoch(root, world, workers=0, **cfg):
    """Every rank's batches of one epoch."""
    out = []
    for rank in range(world):
        ds = StreamingWindowDataset(loader_config(root, **cfg), rank=rank, world_size=world)
        out += list(StreamingLoader(ds, num_workers=workers))
    return out


def _plan_keys(ds, epoch=0) -> Counter:
    plan = ds.plan(epoch)
    return Counter(ds.index.key_of(int(g)) for g in plan.gid)


# ---------------------------------------------------------------------------- balance
def test_balanced_epoch_draws_identities_within_10_percent_of_uniform(skewed):
    root, identity_of = skewed
    natural = Counter(identity_of[k] for b in _epoch(root, 1) for k in b["keys"])
    assert max(natural.values()) / min(natural.values()) >= 20  # the skew the balance must undo

    batches = _epoch(root, 2, workers=2, balance="identity")
    ds = StreamingWindowDataset(loader_config(root, balance="identity"), rank=0, world_size=1)
    assert len(batches) == 2 * 68 and len(ds) == 68  # an epoch has as many steps as without balancing
    keys = [k for b in batches for k in b["keys"]]
    positions = [int(p) for b in batches for p in b["sample_position"]]
    assert sorted(positions) == list(range(68 * 12))  # each drawn sample once over ranks and workers
    assert Counter(keys) == _plan_keys(ds)

    counts = Counter(identity_of[k] for k in keys)
    assert len(counts) == 40
    mean = len(keys) / 40
    worst = max(abs(c / mean - 1) for c in counts.values())
    assert worst <= 0.10, (worst, sorted(counts.values()))
    # inside an identity the draws cycle through its clips: 40 clips, ~20 draws -> all different;
    # the singleton identity's one clip is drawn every time
    by_identity = {}
    for k in keys:
        by_identity.setdefault(identity_of[k], []).append(k)
    big, single = by_identity[1000 + 7 * 40], by_identity[1000 + 7]
    assert len(set(big)) == len(big) and len(set(single)) == 1 and len(single) >= 18


def test_balanced_draws_are_seeded_per_epoch(skewed):
    root, _ = skewed
    ds = StreamingWindowDataset(loader_config(root, balance="identity"), rank=0, world_size=1)
    again = StreamingWindowDataset(loader_config(root, balance="identity"), rank=0, world_size=1)
    assert np.array_equal(ds.plan(0).gid, again.plan(0).gid)  # deterministic
    assert Counter(ds.plan(0).gid.tolist()) != Counter(ds.plan(1).gid.tolist())  # new draws each epoch
    other = StreamingWindowDataset(loader_config(root, balance="identity", seed=5), rank=0, world_size=1)
    assert Counter(ds.plan(0).gid.tolist()) != Counter(other.plan(0).gid.tolist())


def test_temperature_sets_identity_probability_to_clips_to_the_power_one_over_t():
    group = np.repeat(np.arange(40), SIZES)
    gids = np.random.default_rng(0).permutation(len(group))  # clip ids unrelated to identities
    n = len(gids)
    for t, target in ((None, np.full(40, n / 40)), (2.0, n * np.sqrt(SIZES) / np.sqrt(SIZES).sum()),
                      (1e6, np.full(40, n / 40)), (1.0, SIZES.astype(float))):
        bal = IdentityBalance(gids, group, t)  # clip gids[j] belongs to identity group[j]
        for epoch in range(3):
            counts = bal.counts(seed=0, epoch=epoch)
            assert counts.sum() == n and np.all(np.abs(counts - target) < 1), (t, epoch)
            per_identity = np.bincount(_group_of(bal.draw(0, epoch), gids, group), minlength=40)
            assert np.array_equal(per_identity, counts)
    # T = 1 is the natural distribution: every clip exactly once, as without balancing
    assert np.array_equal(IdentityBalance(gids, group, 1.0).draw(3, 0), np.sort(gids))
    # a small T concentrates on the largest identity without overflowing n ** (1/T)
    p = identity_probabilities(np.array([1, 1000, 10 ** 6]), 0.01)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1) and p[2] > 0.999


def _group_of(drawn, gids, group):
    lookup = np.empty(len(gids), dtype=np.int64)
    lookup[gids] = group
    return lookup[drawn]


def test_temperature_orders_identities_between_natural_and_uniform(skewed):
    root, identity_of = skewed
    ratios = []
    for t in (1.0, 2.0, 4.0, None):
        ds = StreamingWindowDataset(loader_config(root, balance="identity", balance_temperature=t),
                                    rank=0, world_size=1)
        counts = Counter(identity_of[k] for k in _plan_keys(ds).elements())
        ratios.append(counts[1000 + 7 * 40] / counts[1000 + 7])  # largest / smallest identity
    assert ratios[0] == 40 and abs(ratios[1] - 40 ** 0.5) < 0.5 and abs(ratios[2] - 40 ** 0.25) < 0.3
    assert abs(ratios[3] - 1) < 0.1


@pytest.mark.parametrize("balance,t", [("clip", None), ("identity", 0), ("identity", -1.0),
                                       ("identity", float("inf")), ("identity", float("nan")), (None, 2.0)])
def test_bad_balance_options_are_refused(balance, t):
    with pytest.raises(ValueError, match="balance"):
        check_balance(balance, t)


# ---------------------------------------------------------------------------- split
def test_split_is_identity_disjoint_and_holds_out_the_fraction_on_many_identities():
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(-(1 << 40), 1 << 40, 20000))  # arbitrary int64 ids, negatives too
    identity = np.repeat(ids, rng.integers(1, 6, len(ids)))
    known = np.ones(len(identity), bool)
    keys = [f"c{i}" for i in range(len(identity))]
    val = split_mask(identity, known, keys, "val", 0.02)
    train = split_mask(identity, known, keys, "train", 0.02)
    assert np.array_equal(val, ~train)
    assert not set(identity[val]) & set(identity[train])  # no identity on both sides
    frac = len(set(identity[val])) / len(ids)
    assert abs(frac - 0.02) < 0.003, frac  # 3 sigma of a binomial over 20000 identities
    assert abs(val.mean() - 0.02) < 0.004
    # stable and nested: the 1% val side is inside the 2% one; the same ids give the same sides
    assert np.all(val[split_mask(identity, known, keys, "val", 0.01)])
    assert np.array_equal(val, split_mask(identity, known, keys, "val", 0.02))
    assert identity_unit(12345) == identity_unit(np.int64(12345)) and 0 <= identity_unit(-3) < 1


def test_split_in_the_loader(skewed):
    root, identity_of = skewed
    sides = {}
    for side in ("train", "val"):
        ds = StreamingWindowDataset(loader_config(root, split=f"{side}:0.2", last_batch="wrap"), rank=0, world_size=1)
        sides[side] = {ds.index.key_of(int(g)) for g in ds.gids}
        yielded = {k for b in StreamingLoader(ds) for k in b["keys"]}
        assert yielded == sides[side]
    assert not sides["train"] & sides["val"] and len(sides["train"] | sides["val"]) == 820
    val_ids = {identity_of[k] for k in sides["val"]}
    assert not val_ids & {identity_of[k] for k in sides["train"]} and 0 < len(val_ids) < 40
    # with a `where` and a balance: the split is taken of the selection, the balance of the split
    ds = StreamingWindowDataset(loader_config(root, where="sync_conf >= 3", split="train:0.2", balance="identity"),
                                rank=0, world_size=1)
    drawn = {identity_of[k] for k in _plan_keys(ds)}
    assert drawn and not drawn & val_ids


def test_an_empty_side_is_a_clear_error(small):
    with pytest.raises(ValueError, match="0 selected clips make no global batch"):
        StreamingWindowDataset(loader_config(small, split="val:1e-9", balance="identity"), rank=0, world_size=1)


@pytest.mark.parametrize("split", ["val", "val:0", "val:1", "test:0.1", "train:x", "0.02"])
def test_bad_split_strings_are_refused(split):
    with pytest.raises(ValueError, match="split="):
        parse_split(split)


# ---------------------------------------------------------------------------- the table
def test_clips_missing_from_the_table_are_identities_of_their_own(small, caplog):
    keys = _keys(small)
    with caplog.at_level(logging.WARNING, logger="loopy_model.data.identity"):
        ds = StreamingWindowDataset(loader_config(small, balance="identity"), rank=0, world_size=1)
    assert "5 of 60 selected clips are not in" in caplog.text
    assert len(ds.balance.sizes) == 15 and sorted(ds.balance.sizes.tolist())[:5] == [1] * 5  # 10 + 5 singletons
    counts = ds.balance.counts(0, 0)
    assert np.all(np.abs(counts - 4) < 1)  # 60 draws over 15 identities
    drawn = _plan_keys(ds)
    assert all(drawn[k] == 4 for k in keys[55:])  # each missing clip drawn as one identity
    # the split places a missing clip by its key (its placeholder id is ignored): stable, both sides
    names = [f"vid{i:05d}" for i in range(400)]
    unknown = np.zeros(400, bool)
    mask = split_mask(np.full(400, -1), unknown, names, "val", 0.5)
    assert np.array_equal(mask, split_mask(np.arange(400), unknown, names, "val", 0.5))
    assert 0.4 < mask.mean() < 0.6
    groups = dense_groups(np.array([7, 7, 9, -1, -1]), np.array([True, True, True, False, False]))
    assert groups.tolist() == [0, 0, 1, 2, 3]


def test_a_null_identity_counts_as_missing(tmp_path):
    root = make_dataset(tmp_path, [12], frames=(12, 14))
    keys = _keys(root)
    write_identities(root, {**{k: 1 for k in keys[:10]}, keys[10]: None})
    ds = StreamingWindowDataset(loader_config(root, balance="identity"), rank=0, world_size=1)
    assert sorted(ds.balance.sizes.tolist()) == [1, 1, 10]  # identity 1, the null one, the unlisted one


def test_missing_or_malformed_identities_table_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path, [12], frames=(12, 14))
    keys = _keys(root)
    for opts in (dict(balance="identity"), dict(split="val:0.1")):
        with pytest.raises(ValueError, match=r"identities\.parquet, which does not exist.*jobs/identities\.py"):
            StreamingWindowDataset(loader_config(root, **opts), rank=0, world_size=1)
    pq.write_table(pa.table({"key": keys, "cluster": list(range(12))}), root / "identities.parquet")
    with pytest.raises(ValueError, match=r"identities\.parquet lacks column\(s\) \['identity_id'\]"):
        StreamingWindowDataset(loader_config(root, balance="identity"), rank=0, world_size=1)
    pq.write_table(pa.table({"key": keys, "identity_id": [0.5] * 12}), root / "identities.parquet")
    with pytest.raises(ValueError, match="identity_id is double, expected int64"):
        StreamingWindowDataset(loader_config(root, balance="identity"), rank=0, world_size=1)
    pq.write_table(pa.table({"key": keys + keys[:1], "identity_id": list(range(13))}), root / "identities.parquet")
    with pytest.raises(ValueError, match="listed more than once"):
        StreamingWindowDataset(loader_config(root, balance="identity"), rank=0, world_size=1)


# ---------------------------------------------------------------------------- resume
WINDOWS = dict(windows_per_clip=2, latent_sampling="sample", motion_mode="random", reference="outside_window")
IDENTITY_OPTS = dict(balance="identity", balance_temperature=3.0, split="train:0.3")
CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from loader_fixtures import loader_config, take
from loopy_model.data import StreamingLoader, StreamingWindowDataset, WindowConfig
ds = StreamingWindowDataset(loader_config({root!r}, windows=WindowConfig(**{windows!r}), **{opts!r}), rank=1, world_size=2)
loader = StreamingLoader(ds, num_workers=1)
loader.load_state_dict(json.load(open({state!r})))
batches = take(loader, {n})
np.savez({out!r}, **{{f"{{i}}_{{k}}": v.numpy() for i, b in enumerate(batches) for k, v in b.items() if hasattr(v, "numpy")}})
json.dump({{"keys": [b["keys"] for b in batches], "steps": [[b["epoch"], b["batch_index"]] for b in batches]}},
          open({out!r} + ".json", "w"))
"""


def _identity_loader(root, workers=0, **opts):
    ds = StreamingWindowDataset(loader_config(root, windows=WindowConfig(**WINDOWS), **{**IDENTITY_OPTS, **opts}),
                                rank=1, world_size=2)
    return StreamingLoader(ds, num_workers=workers)


def test_balanced_split_resumes_exactly_in_a_new_process(small, tmp_path):
    ds = _identity_loader(small).dataset
    steps = ds.plan(0).num_batches
    n_before, n_after = steps - 1, 3  # the resumed part crosses into epoch 1 (new draws)
    full = take(_identity_loader(small), n_before + n_after)
    assert [b["epoch"] for b in full] == [0] * steps + [1] * (n_before + n_after - steps)
    assert Counter(k for b in full for k in b["keys"]).most_common(1)[0][1] > 1  # repeats are drawn

    first = _identity_loader(small, workers=2)
    take(first, n_before)
    (tmp_path / "state.json").write_text(json.dumps(first.state_dict()))
    out = str(tmp_path / "after.npz")
    code = CHILD.format(tests=str(ROOT / "tests"), root=str(small), windows=WINDOWS, opts=IDENTITY_OPTS,
                        state=str(tmp_path / "state.json"), n=n_after, out=out)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    resumed, arrays = json.loads(Path(out + ".json").read_text()), np.load(out)
    expected = full[n_before:]
    assert_resumed_equals(resumed, arrays, expected)


def test_balanced_epoch_resumes_elastically_each_drawn_sample_once(skewed):
    root, _ = skewed
    opts = dict(balance="identity", split="train:0.1")
    used, states = [], []
    for rank in range(2):
        loader = StreamingLoader(StreamingWindowDataset(loader_config(root, **opts), rank=rank, world_size=2))
        used += take(loader, 3)
        states.append(loader.state_dict())
    assert states[0] == states[1]
    for rank in range(3):
        ds = StreamingWindowDataset(loader_config(root, **opts), rank=rank, world_size=3)
        ds.load_state_dict(states[0])
        used += list(StreamingLoader(ds, num_workers=2 if rank == 1 else 0))
    single = StreamingWindowDataset(loader_config(root, **opts), rank=0, world_size=1)
    total = single.plan(0).num_batches * 12
    assert sorted(int(p) for b in used for p in b["sample_position"]) == list(range(total))
    assert Counter(k for b in used for k in b["keys"]) == _plan_keys(single)
    steps = {}
    for b in used:
        steps.setdefault(b["batch_index"], Counter()).update(b["keys"])
    assert [steps[i] for i in range(len(steps))] == [Counter(b["keys"]) for b in StreamingLoader(single)]


def test_state_refuses_another_balance(small):
    loader = _identity_loader(small)
    take(loader, 1)
    state = loader.state_dict()
    for opts in (dict(balance=None, balance_temperature=None), dict(balance_temperature=2.0), dict(split="train:0.2")):
        with pytest.raises(ValueError, match="fingerprint"):
            _identity_loader(small, **opts).load_state_dict(state)
    plain = StreamingWindowDataset(loader_config(small), rank=0, world_size=1)  # unchanged without balance
    assert plain.fingerprint == plain.index.fingerprint(plain.gids)


# ---------------------------------------------------------------------------- trainer
def test_train_options_reach_the_loader(small, tmp_path):
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from loopy_model.train.setup import World, build_loader

    args = job.parse_args(["--data", str(small), "--out", str(tmp_path / "run"), "--stage", "1",
                           "--split", "train:0.3", "--balance", "identity", "--balance-temperature", "2",
                           "--batch-size", "12", "--loader-workers", "0"])
    cfg = job.config_from_args(args)
    assert (cfg.split, cfg.balance, cfg.balance_temperature) == ("train:0.3", "identity", 2.0)
    ds = build_loader(cfg, World(0, 1, 0, torch.device("cpu"), False)).dataset
    expected = StreamingWindowDataset(loader_config(small, split="train:0.3", balance="identity",
                                                    balance_temperature=2.0), rank=0, world_size=1)
    assert ds.balance is not None and ds.fingerprint == expected.fingerprint
