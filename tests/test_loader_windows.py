"""What a Loopy training window contains (targets, TSM motion latents, reference, audio, A2L)."""
import numpy as np
import pytest
import torch

from loader_fixtures import DIM, HW, LAYERS, clip_number, loader_config, make_dataset
from loopy_model import temporal_segment as tsm
from loopy_model.data import StreamingLoader, StreamingWindowDataset, WindowConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("windows"), [6, 6], frames=(14, 200))


@pytest.fixture(scope="module")
def dataset_with_std(tmp_path_factory):  # curated with features.vae_store_std
    return make_dataset(tmp_path_factory.mktemp("windows_std"), [6, 6], frames=(14, 200), store_std=True)


def _batches(root, **windows):
    cfg = loader_config(root, windows=WindowConfig(**windows))
    return list(StreamingLoader(StreamingWindowDataset(cfg, rank=0, world_size=1)))


def test_shapes_and_contents_of_uniform_windows(dataset):
    (batch,) = _batches(dataset, windows_per_clip=3, latent_sampling="mean", latent_scale=1.0)
    b = 36
    assert batch["latents"].shape == (b, 12, 4, HW, HW) and batch["latents"].dtype == torch.float32
    assert batch["motion_latents"].shape == (b, 20, 4, HW, HW) and batch["motion_mask"].shape == (b, 20)
    assert batch["ref_latent"].shape == (b, 4, HW, HW)
    assert batch["audio"].shape == (b, 12, 5, LAYERS, DIM) and batch["audio"].dtype == torch.float16
    assert batch["kps"].shape == (b, 12, 68, 3)
    assert batch["keys"][0] == batch["keys"][1] == batch["keys"][2]  # windows of a clip stay together
    offsets = tsm.temporal_segment_indices()
    for i in range(b):
        t0, n, clip = int(batch["frame_start"][i]), int(batch["num_clip_frames"][i]), clip_number(batch["keys"][i])
        assert 0 <= t0 <= n - 12 and batch["target_mask"][i].all()
        lat = batch["latents"][i]
        assert lat[:, 0, 0, 0].tolist() == list(range(t0, t0 + 12)) and torch.all(lat[:, 1] == clip)
        want = t0 + offsets
        assert batch["motion_mask"][i].tolist() == (want >= 0).tolist()  # before the clip: masked
        mo = batch["motion_latents"][i, :, 0, 0, 0]
        assert mo[want >= 0].tolist() == want[want >= 0].tolist() and torch.all(mo[want < 0] == 0)
        assert batch["ref_latent"][i, 0, 0, 0] == batch["ref_index"][i]
        expected_audio = np.clip(np.arange(t0, t0 + 12)[:, None] + np.arange(-2, 3), 0, n - 1)
        assert np.array_equal(batch["audio"][i, :, :, 0, 0].float().numpy(), expected_audio)
        assert batch["kps"][i, :, 0, 0].tolist() == list(range(t0, t0 + 12))
        # the face-size-normalised motion.npy columns (2, 3), not the raw px^2 ones (1000 + clip, 2000 + t0)
        assert batch["head_motion_var"][i] == pytest.approx(1e-4 * (clip + t0 / 1000), rel=1e-5)
        assert batch["expression_var"][i] == pytest.approx(-1e-4 * t0, rel=1e-5) and batch["a2l_valid"][i]


def test_sampled_latents_use_the_posterior_std(dataset_with_std, dataset):
    (batch,) = _batches(dataset_with_std, windows_per_clip=4, latent_scale=1.0)
    noise = (batch["latents"][:, :, 0] - batch["frame_start"][:, None, None, None] -
             torch.arange(12)[None, :, None, None]) / 0.5  # std channels hold 0.5
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    (scaled,) = _batches(dataset_with_std, latent_sampling="mean")
    assert torch.allclose(scaled["latents"][:, :, 2], torch.tensor(0.18215))  # SD 1.5 scale
    # mean-only shards (the schema 2.0 default): "sample" has no std to sample with, so z = the mean
    (mean_only,) = _batches(dataset, windows_per_clip=2, latent_scale=1.0)
    assert mean_only["latents"].shape[2] == 4
    want = mean_only["frame_start"][:, None] + torch.arange(12)[None, :]
    assert torch.equal(mean_only["latents"][:, :, 0, 0, 0], want.float())


def test_mean_motion_mode_averages_sub_blocks_over_existing_frames(dataset):
    (batch,) = _batches(dataset, latent_sampling="mean", latent_scale=1.0, motion_mode="mean")
    blocks = tsm.sub_blocks()
    for i in range(12):
        t0 = int(batch["frame_start"][i])
        for slot, (lo, hi) in enumerate(blocks):
            frames = np.arange(t0 + lo, t0 + hi)
            frames = frames[frames >= 0]
            got = float(batch["motion_latents"][i, slot, 0, 0, 0])
            assert bool(batch["motion_mask"][i, slot]) == bool(len(frames))
            assert got == pytest.approx(frames.mean() if len(frames) else 0.0)


def test_reference_policies(dataset):
    (batch,) = _batches(dataset, reference="outside_window", windows_per_clip=4)
    start, ref = batch["frame_start"], batch["ref_index"]
    assert torch.all((ref < start) | (ref >= start + 12))
    (batch,) = _batches(dataset, reference="first")
    assert torch.all(batch["ref_index"] == 0)


def test_clips_shorter_than_a_window_are_padded_and_masked(tmp_path):
    root = make_dataset(tmp_path, [12], frames=(5, 9))
    (batch,) = _batches(root, latent_sampling="mean", latent_scale=1.0)
    for i in range(12):
        n = int(batch["num_clip_frames"][i])
        assert batch["target_mask"][i].tolist() == [True] * n + [False] * (12 - n)
        assert batch["latents"][i, :, 0, 0, 0].tolist() == list(range(n)) + [n - 1] * (12 - n)
        assert not batch["motion_mask"][i].any() and not batch["a2l_valid"][i]


def test_unmeasurable_motion_windows_fall_back_to_audio(tmp_path):
    """A NaN in motion.npy (too few keypoints above DWPose's score threshold) is no A2L condition:
    a2l_valid False (draw_conditions then picks audio) and 0 in place of the value."""
    from loopy_model.conditions import ConditionConfig, draw_conditions, model_inputs

    root = make_dataset(tmp_path, [12], frames=(40, 60), nan_motion=True)
    (batch,) = _batches(root, windows_per_clip=2, latent_sampling="mean")
    odd = batch["frame_start"] % 2 == 1
    assert odd.any() and (~odd).any()
    assert torch.equal(batch["a2l_valid"], ~odd)
    assert torch.all(batch["head_motion_var"][odd] == 0) and torch.all(batch["expression_var"][odd] == 0)
    gens = [torch.Generator().manual_seed(i) for i in range(len(odd))]
    conds = draw_conditions(ConditionConfig(), gens, batch["a2l_valid"])
    assert torch.all(conds["a2l_condition"][odd] == 0)  # index 0 = audio
    inputs = model_inputs(batch, stage=2)
    assert torch.isfinite(inputs["head_motion_var"]).all() and torch.isfinite(inputs["expression_var"]).all()


def test_a2l_inputs_are_the_normalised_variances_on_a_log_scale(dataset):
    from loopy_model.conditions import MOTION_VAR_UNIT, model_inputs

    (batch,) = _batches(dataset, latent_sampling="mean")
    inputs = model_inputs(batch, stage=2)
    norm = torch.tensor([1e-4 * (clip_number(k) + int(t0) / 1000) for k, t0 in zip(batch["keys"], batch["frame_start"])])
    torch.testing.assert_close(inputs["head_motion_var"], torch.log1p(norm / MOTION_VAR_UNIT), rtol=1e-4, atol=1e-4)
    assert torch.all(inputs["expression_var"] == 0)  # fixture expression column is -t0 <= 0, clamped


def test_pinned_batches_from_dataloader_workers(dataset):
    cfg = loader_config(dataset, global_batch_size=4)
    loader = StreamingLoader(StreamingWindowDataset(cfg, rank=0, world_size=1), num_workers=2, pin_memory=True)
    batches = list(loader)
    assert [b["batch_index"] for b in batches] == [0, 1, 2]
    single = list(StreamingLoader(StreamingWindowDataset(cfg, rank=0, world_size=1)))
    for a, b in zip(batches, single):
        assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"])
    if torch.cuda.is_available():
        assert batches[0]["latents"].is_pinned()

