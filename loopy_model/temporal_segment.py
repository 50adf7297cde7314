"""Temporal segment module: which preceding frames become the motion-frame latents.

Loopy, section 3.2 ("temporal segment module", Eq. 2 lost in the text we have; reconstructed
here as in DESIGN.md) and section 4 "Implementation details": the 124 frames before the current
12-frame clip are split into segments, nearest the clip first; segment j (j = 1, 2, ...) holds
``s * r**(j-1)`` frames, and each segment is abstracted to ``s`` frames. With stride s=4 and
expand ratio r=2 over 5 segments: 4 + 8 + 16 + 32 + 64 = 124 frames -> 5 * 4 = 20 latents.

Abstraction (paper Table 3 ablation "sampling strategies"):
- ``uniform`` (default, the full model): segment j is cut into ``s`` equal sub-blocks of
  ``r**(j-1)`` frames and the frame of each sub-block nearest the current clip is kept, so the
  kept frames are evenly spaced at stride ``r**(j-1)`` and the frame right before the clip (-1)
  is always kept;
- ``mean``: the mean of each sub-block ("average pooling");
- ``random``: one random frame of each sub-block ("random single-frame sampling").

Frames are addressed by *offsets* relative to the first frame of the current clip: -1 is the
frame immediately before it, -124 the oldest. All outputs are in chronological order (oldest
first), the order in which motion frames precede the clip on the time axis of the inter-clip
temporal attention. The data loader (training) and the model's autoregressive inference both
use these functions so that training and inference see the same frames.
"""
from __future__ import annotations

import numpy as np

MODES = ("uniform", "mean", "random")

# Loopy defaults (section 4): s = 4, r = 2, 124 motion frames -> 20 latents.
STRIDE = 4
EXPAND_RATIO = 2
NUM_SEGMENTS = 5


def segment_lengths(stride: int = STRIDE, expand_ratio: int = EXPAND_RATIO,
                    num_segments: int = NUM_SEGMENTS) -> list[int]:
    """Frames in each segment, nearest the clip first: s * r**(j-1) for j = 1..num_segments."""
    if stride < 1 or expand_ratio < 1 or num_segments < 1:
        raise ValueError("stride, expand_ratio and num_segments must be >= 1")
    return [stride * expand_ratio ** j for j in range(num_segments)]


def num_motion_frames(stride: int = STRIDE, expand_ratio: int = EXPAND_RATIO,
                      num_segments: int = NUM_SEGMENTS) -> int:
    """How many preceding frames the module covers (124 for the defaults)."""
    return sum(segment_lengths(stride, expand_ratio, num_segments))


def num_motion_latents(stride: int = STRIDE, num_segments: int = NUM_SEGMENTS) -> int:
    """How many abstracted frames it outputs (20 for the defaults)."""
    return stride * num_segments


def sub_blocks(stride: int = STRIDE, expand_ratio: int = EXPAND_RATIO,
               num_segments: int = NUM_SEGMENTS) -> np.ndarray:
    """The sub-block of preceding frames behind each output slot, chronological.

    Returns int64 [stride * num_segments, 2]: row i = [lo, hi) offsets (negative, hi <= 0).
    The rows tile [-num_motion_frames, 0) exactly, without gaps or overlaps.
    """
    rows = []
    end = 0  # exclusive upper offset of the segment being cut (segment 1 ends at -1)
    for length in segment_lengths(stride, expand_ratio, num_segments):
        block = length // stride  # = r**(j-1)
        start = end - length
        rows.extend([start + i * block, start + (i + 1) * block] for i in range(stride))
        end = start
    rows.sort()  # chronological: oldest segment's first sub-block first
    return np.asarray(rows, dtype=np.int64)


def temporal_segment_indices(stride: int = STRIDE, expand_ratio: int = EXPAND_RATIO,
                             num_segments: int = NUM_SEGMENTS, mode: str = "uniform",
                             rng: np.random.Generator | None = None) -> np.ndarray:
    """Offsets of the frames kept for each output slot (``uniform`` or ``random``).

    int64 [stride * num_segments], chronological, all in [-num_motion_frames, -1]. For s=4, r=2:
    uniform -> -109 -93 -77 -61 | -53 -45 -37 -29 | -25 -21 -17 -13 | -11 -9 -7 -5 | -4 -3 -2 -1.
    ``mean`` has no single index per slot: use :func:`sub_blocks`/:func:`temporal_segment_groups`.
    """
    blocks = sub_blocks(stride, expand_ratio, num_segments)
    if mode == "uniform":
        return blocks[:, 1] - 1  # the frame of each sub-block nearest the clip
    if mode == "random":
        rng = rng if rng is not None else np.random.default_rng()
        return blocks[:, 0] + rng.integers(0, blocks[:, 1] - blocks[:, 0])
    raise ValueError(f"mode {mode!r} has no index per slot; use one of 'uniform', 'random'")


def temporal_segment_groups(stride: int = STRIDE, expand_ratio: int = EXPAND_RATIO,
                            num_segments: int = NUM_SEGMENTS, mode: str = "uniform",
                            rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """For every output slot, the offsets whose frames are averaged into it (any mode).

    ``uniform``/``random`` give one offset per slot; ``mean`` gives the whole sub-block.
    """
    if mode not in MODES:
        raise ValueError(f"unknown temporal segment mode {mode!r}; expected one of {MODES}")
    if mode == "mean":
        return [np.arange(lo, hi, dtype=np.int64) for lo, hi in sub_blocks(stride, expand_ratio, num_segments)]
    return [np.array([i]) for i in temporal_segment_indices(stride, expand_ratio, num_segments, mode, rng)]


def apply_temporal_segment(frames, valid=None, stride: int = STRIDE, expand_ratio: int = EXPAND_RATIO,
                           num_segments: int = NUM_SEGMENTS, mode: str = "uniform", rng=None):
    """Reduce preceding frames [B, F, ...] (chronological, last = frame -1) to [B, n_out, ...].

    For autoregressive inference: ``frames`` holds up to ``num_motion_frames`` latents of the
    previous clips (torch tensor); fewer frames than needed count as missing (start of the
    video). ``valid`` [B, F] bool marks real frames (default: all). Returns (motion, mask):
    mask [B, n_out] is False where a slot saw no real frame; such slots are zero.
    """
    import torch

    batch, available = frames.shape[:2]
    need = num_motion_frames(stride, expand_ratio, num_segments)
    if valid is None:
        valid = torch.ones(batch, available, dtype=torch.bool, device=frames.device)
    if available > need:  # only the newest `need` frames matter
        frames, valid, available = frames[:, -need:], valid[:, -need:], need
    out, mask = [], []
    for offsets in temporal_segment_groups(stride, expand_ratio, num_segments, mode, rng):
        pos = torch.as_tensor(offsets + available, device=frames.device)  # offset -1 -> index F-1
        inside = pos >= 0
        pos = pos.clamp(min=0)
        w = (valid[:, pos] & inside.unsqueeze(0)).to(frames.dtype)  # [B, k]
        count = w.sum(1)
        shape = (batch, len(pos)) + (1,) * (frames.dim() - 2)
        total = (frames[:, pos] * w.view(shape)).sum(1)
        out.append(total / count.clamp(min=1).view((batch,) + (1,) * (frames.dim() - 2)))
        mask.append(count > 0)
    return torch.stack(out, 1), torch.stack(mask, 1)
