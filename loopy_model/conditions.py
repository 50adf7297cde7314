"""Condition masks and dropout (paper 3.4) and the model inputs built from a loader batch.

"During training, c_audio and motion latents are masked to all-zero features with a 10%
probability. [...] c_ref has a 15% probability of being dropped [...] When c_ref is dropped,
motion frames are also dropped [...] Additionally, motion frames have an independent 40%
probability of being masked to all-zero features." And (3.3) one A2L condition per sample,
"with equal probability from audio embeddings and facial movement-related features".

Every draw comes from the sample's own generator (seeded by the sample's global position; see
``train/loop.py``), so a sample gets the same masks whichever rank, world size or resume step
draws it. The masks are model *inputs*: the model has no training-only path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopy_model.models.a2l import A2L_CONDITIONS


# The A2L variances arrive normalised by the clip's face size squared (motion.npy schema 2.0;
# pipeline/features/motion.py): a head moving with an RMS of 1% of the face size has variance 1e-4.
# In units of that, log1p spreads the heavy-tailed values over O(1): 1% -> 0.69, 10% -> 4.6.
MOTION_VAR_UNIT = 1e-4


def motion_condition(normalised_var: torch.Tensor) -> torch.Tensor:
    """Face-size-normalised variance -> the A2L scalar input: log1p(var / (1% of face size)^2)."""
    return torch.log1p(normalised_var.float().clamp(min=0) / MOTION_VAR_UNIT)


@dataclass(frozen=True)
class ConditionConfig:
    ref_drop: float = 0.15
    audio_drop: float = 0.10  # audio features and A2L motion latents together
    motion_zero: float = 0.40


def draw_conditions(cfg: ConditionConfig, generators: list[torch.Generator], a2l_valid: torch.Tensor) -> dict:
    """Per-sample keep flags (True = condition present) and the A2L condition index.

    A sample whose window has no valid facial features (``a2l_valid`` False: clip shorter than
    one window) always uses audio for A2L.
    """
    u = torch.stack([torch.rand(4, generator=g) for g in generators])  # [B, 4], fixed draw order
    ref_keep = u[:, 0] >= cfg.ref_drop
    condition = (u[:, 3] * len(A2L_CONDITIONS)).long().clamp(max=len(A2L_CONDITIONS) - 1)
    return {
        "ref_keep": ref_keep,
        "audio_keep": u[:, 1] >= cfg.audio_drop,
        "motion_keep": u[:, 2] >= cfg.motion_zero,
        "a2l_condition": torch.where(a2l_valid.bool(), condition, torch.zeros_like(condition)),
    }


def resize_latents(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """[..., c, H, W] -> [..., c, size, size] (area average); the tiny preset trains on 16x16."""
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    lead = x.shape[:-3]
    out = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="area")
    return out.view(*lead, *out.shape[1:])


def model_inputs(batch: dict, stage: int, latent_size: int | None = None) -> dict:
    """Loader batch (loopy_model/data/collate.py) -> LoopyModel keyword inputs (CPU tensors).

    Keypoints (pixels of the 512 crop, DWPose) are mapped to [-1, 1]; the variances (normalised by
    face size^2 in the curation job, heavy-tailed) go through ``motion_condition`` (definitions
    audit, item 6).
    """
    pixels = 8 * batch["latents"].shape[-1]  # the VAE's downsampling factor is 8
    out = {
        "latents": resize_latents(batch["latents"].float(), latent_size),
        "ref_latents": resize_latents(batch["ref_latent"].float(), latent_size),
        "frame_mask": batch["target_mask"].bool(),
    }
    if stage == 2:
        kps = batch["kps"].float()
        out.update(
            motion_latents=resize_latents(batch["motion_latents"].float(), latent_size),
            motion_mask=batch["motion_mask"].bool(),
            audio=batch["audio"].float(),
            keypoints=torch.cat([kps[..., :2] / pixels * 2 - 1, kps[..., 2:]], -1),
            head_motion_var=motion_condition(batch["head_motion_var"]),
            expression_var=motion_condition(batch["expression_var"]),
        )
    return out
