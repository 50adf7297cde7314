"""Temporal segment module index functions (Loopy 3.2: s=4, r=2 -> 124 frames -> 20)."""
import numpy as np
import pytest
import torch

from loopy_model import temporal_segment as tsm


def test_defaults_cover_exactly_the_124_preceding_frames_with_20_slots():
    assert tsm.segment_lengths() == [4, 8, 16, 32, 64]  # nearest the clip first
    assert tsm.num_motion_frames() == 124 and tsm.num_motion_latents() == 20
    blocks = tsm.sub_blocks()
    assert blocks.shape == (20, 2)
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in blocks])
    assert np.array_equal(covered, np.arange(-124, 0))  # tiles [-124, -1] without gaps/overlaps

    idx = tsm.temporal_segment_indices()
    assert idx.shape == (20,) and len(set(idx.tolist())) == 20
    assert idx.min() >= -124 and idx.max() == -1 and np.all(np.diff(idx) > 0)  # chronological
    assert idx.tolist() == [-109, -93, -77, -61, -53, -45, -37, -29, -25, -21, -17, -13,
                            -11, -9, -7, -5, -4, -3, -2, -1]
    # uniform: stride r**(j-1) inside segment j
    steps = np.diff(idx[::-1] * -1)
    assert steps.tolist() == [1] * 4 + [2] * 4 + [4] * 4 + [8] * 4 + [16] * 3


@pytest.mark.parametrize("s,r,n", [(4, 2, 5), (2, 3, 4), (8, 1, 3), (1, 2, 6)])
def test_other_parameters_tile_their_range(s, r, n):
    total = tsm.num_motion_frames(s, r, n)
    assert total == sum(s * r ** j for j in range(n))
    for mode in tsm.MODES:
        groups = tsm.temporal_segment_groups(s, r, n, mode, np.random.default_rng(0))
        assert len(groups) == s * n
        flat = np.concatenate(groups)
        assert flat.min() >= -total and flat.max() <= -1
    mean = np.concatenate(tsm.temporal_segment_groups(s, r, n, "mean"))
    assert np.array_equal(mean, np.arange(-total, 0))


def test_random_mode_draws_one_frame_inside_each_sub_block():
    blocks = tsm.sub_blocks()
    draws = np.stack([tsm.temporal_segment_indices(mode="random", rng=np.random.default_rng(i)) for i in range(50)])
    assert np.all(draws >= blocks[:, 0]) and np.all(draws < blocks[:, 1])
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError):
        tsm.temporal_segment_indices(mode="mean")


def test_apply_on_frames_matches_indices_and_masks_missing_history():
    frames = torch.arange(124, dtype=torch.float32).view(1, 124, 1).repeat(2, 1, 3)  # value = frame index
    out, mask = tsm.apply_temporal_segment(frames)
    assert out.shape == (2, 20, 3) and mask.all()
    assert out[0, :, 0].tolist() == (tsm.temporal_segment_indices() + 124).tolist()

    mean, _ = tsm.apply_temporal_segment(frames, mode="mean")
    blocks = tsm.sub_blocks() + 124
    assert torch.allclose(mean[0, :, 0], torch.tensor((blocks[:, 0] + blocks[:, 1] - 1) / 2, dtype=torch.float32))

    short = frames[:, -10:]  # only 10 frames of history (start of a video)
    out, mask = tsm.apply_temporal_segment(short)
    assert mask[0].tolist() == [False] * 13 + [True] * 7  # -9 -7 -5 -4 -3 -2 -1 exist; -11 and older do not
    assert out[0, mask[0], 0].tolist() == [115, 117, 119, 120, 121, 122, 123]  # frames 114..123 given
    assert torch.all(out[:, ~mask[0]] == 0)
