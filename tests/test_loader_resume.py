"""Exact mid-epoch resume: a NEW PROCESS continuing from state_dict() yields what an
uninterrupted run would have yielded next (keys and every tensor, bit for bit)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loader_fixtures import assert_resumed_equals, loader_config, make_dataset, take
from loopy_model.data import StreamingLoader, StreamingWindowDataset, WindowConfig

ROOT = Path(__file__).resolve().parents[1]
# random windows, sampled latents, random TSM frames: everything the RNG touches must replay
WINDOWS = dict(windows_per_clip=2, latent_sampling="sample", motion_mode="random", reference="outside_window")
N_BEFORE, N_AFTER = 3, 4  # 5 steps per epoch: the resumed part crosses into epoch 1

CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from loader_fixtures import loader_config, take
from loopy_model.data import StreamingLoader, StreamingWindowDataset, WindowConfig
state = json.load(open({state!r}))
ds = StreamingWindowDataset(loader_config({root!r}, windows=WindowConfig(**{windows!r})), rank=1, world_size=2)
loader = StreamingLoader(ds, num_workers=1)
loader.load_state_dict(state)
batches = take(loader, {n})
arrays = {{f"{{i}}_{{k}}": v.numpy() for i, b in enumerate(batches) for k, v in b.items() if hasattr(v, "numpy")}}
np.savez({out!r}, **arrays)
json.dump({{"keys": [b["keys"] for b in batches], "steps": [[b["epoch"], b["batch_index"]] for b in batches],
           "state": loader.state_dict()}}, open({out!r} + ".json", "w"))
"""


def _loader(root, workers=0):
    ds = StreamingWindowDataset(loader_config(root, windows=WindowConfig(**WINDOWS)), rank=1, world_size=2)
    return StreamingLoader(ds, num_workers=workers)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume"), [9, 4, 13, 7, 2, 11, 8, 6], frames=(14, 150))  # 60 clips


def test_resume_in_a_new_process_matches_an_uninterrupted_run(dataset, tmp_path):
    full = take(_loader(dataset), N_BEFORE + N_AFTER)
    assert [b["epoch"] for b in full] == [0] * 5 + [1] * 2

    first = _loader(dataset, workers=2)  # workers prefetch more than is consumed
    take(first, N_BEFORE)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["samples"] == N_BEFORE * 12 and len(json.dumps(state)) < 400
    (tmp_path / "state.json").write_text(json.dumps(state))

    out = str(tmp_path / "after.npz")
    code = CHILD.format(tests=str(ROOT / "tests"), state=str(tmp_path / "state.json"), root=str(dataset),
                        windows=WINDOWS, n=N_AFTER, out=out)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    resumed = json.loads(Path(out + ".json").read_text())
    arrays = np.load(out)

    expected = full[N_BEFORE:]
    assert_resumed_equals(resumed, arrays, expected)
    assert resumed["state"]["epoch"] == 1 and resumed["state"]["samples"] == 2 * 12


def test_state_refuses_another_dataset_or_selection(dataset, tmp_path):
    loader = _loader(dataset)
    take(loader, 1)
    state = loader.state_dict()
    other = StreamingWindowDataset(loader_config(dataset, where="sync_conf >= 1"), rank=0, world_size=2)
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})
    changed = StreamingWindowDataset(loader_config(dataset, global_batch_size=8), rank=0, world_size=2)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        changed.load_state_dict(state)  # 12 samples consumed is not a whole number of 8-clip steps


def test_state_carries_the_order_parameters(dataset):
    loader = _loader(dataset)
    take(loader, 2)
    state = loader.state_dict()
    ds = StreamingWindowDataset(loader_config(dataset, seed=99, num_partitions=3,
                                              windows=WindowConfig(**WINDOWS)), rank=1, world_size=2)
    ds.load_state_dict(state)  # seed and partitions come from the state, not the new config
    nxt = take(StreamingLoader(ds), 1)[0]
    again = take(loader, 1)[0]
    assert nxt["keys"] == again["keys"] and torch.equal(nxt["latents"], again["latents"])


def test_set_epoch_keeps_a_resumed_position_and_moves_to_other_epochs(dataset):
    loader = _loader(dataset)
    take(loader, 2)
    state = loader.state_dict()
    resumed = _loader(dataset)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the usual call at the top of the epoch loop: no effect mid-epoch
    assert resumed.state_dict()["samples"] == 24 and len(resumed) == 3
    resumed.set_epoch(4)
    assert resumed.state_dict()["epoch"] == 4 and resumed.state_dict()["samples"] == 0 and len(resumed) == 5
