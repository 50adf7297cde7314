"""Stack windows into one fixed-shape batch of tensors (+ the bookkeeping a trainer needs).

Shapes (B = clips per rank batch x windows per clip, F = 12, M = 20 motion latents):
  latents [B,F,c,H,W] f32   target_mask [B,F] bool   motion_latents [B,M,c,H,W] f32
  motion_mask [B,M] bool    ref_latent [B,c,H,W] f32  audio [B,F,5,L,D] (stored dtype, fp16)
  kps [B,F,68,3] f32        head_motion_var, expression_var [B] f32   a2l_valid [B] bool
  frame_start, ref_index, num_clip_frames, sample_position [B] int64   is_padding [B] bool
  is_stand_in [B] bool: the clip stands in for one of an unreadable shard (docs/loader.md "Faults")
  keys: list[str]           epoch, batch_index: int (the global step this batch belongs to)
Pinning is left to ``torch.utils.data.DataLoader(pin_memory=True)``, which pins every tensor.
"""
from __future__ import annotations

import numpy as np
import torch

TENSOR_FIELDS = ("latents", "target_mask", "motion_latents", "motion_mask", "ref_latent", "audio", "kps",
                 "head_motion_var", "expression_var", "a2l_valid", "frame_start", "ref_index",
                 "num_clip_frames", "sample_position", "is_padding", "is_stand_in")


def collate_windows(windows: list[dict], *, epoch: int, batch_index: int) -> dict:
    batch = {name: torch.from_numpy(np.stack([np.asarray(w[name]) for w in windows])) for name in TENSOR_FIELDS}
    batch["keys"] = [w["key"] for w in windows]
    batch["epoch"] = epoch
    batch["batch_index"] = batch_index
    return batch
