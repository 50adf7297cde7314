"""Loopy training windows drawn from one clip (paper sections 3.2, 3.3, 3.5 and 4).

Per window (``F = num_frames = 12`` target frames starting at ``t0``):
- ``latents`` [F, c, H, W]: VAE latents of frames t0..t0+F-1. latent.npy (schema 2.0) holds the
  posterior mean (channels 0..c-1), and the std (c..2c-1) only when curated with
  ``features.vae_store_std``. With the std present and ``latent_sampling="sample"`` the latent is
  ``z = mean + std * noise`` (the VAE's ``latent_dist.sample()``); otherwise (mean-only shards, the
  default, or ``latent_sampling="mean"``) it is the mean: SD 1.5's posterior std is far below the
  mean's scale, so the sample and the mean differ little. Latents are multiplied by
  ``latent_scale`` (SD 1.5's 0.18215, the space the U-Net is trained in).
- ``motion_latents`` [20, c, H, W] + ``motion_mask`` [20]: the 124 frames before t0 reduced by
  the temporal segment module (s=4, r=2; loopy_model/temporal_segment.py). Frames before the
  start of the clip do not exist: their slots are zero and masked out.
- ``ref_latent`` [c, H, W]: the reference frame, "randomly selected from a frame within the
  video clip" (section 4) by default; ``reference`` picks another policy.
- ``audio`` [F, 2a+1, L, D]: for every target frame t the audio features (all wav2vec2 layers)
  of frames t-a..t+a, a=2, clamped to the clip (the +-2 frame audio windows of EMO/Loopy 3.3).
- audio-to-latents conditions (section 3.3/3.5): ``kps`` [F, 68, 3] of the window, and
  ``head_motion_var``, ``expression_var`` from motion.npy at the window start (motion.npy row i
  covers frames i..i+11, computed by the curation job with the section-3.5 definitions): the
  face-size-normalised columns (``schemas.MOTION_COLUMNS`` head_var_norm, expression_var_norm),
  so the condition does not depend on how large the face is in the crop. A NaN there (too few
  keypoints above DWPose's score threshold) makes the window's A2L condition invalid
  (``a2l_valid`` False: audio is used) and the value 0.
- ``target_mask`` [F]: False for frames past the end of a clip shorter than F (padded with its
  last frame); normally all True.

All randomness comes from the generator passed in, seeded by (seed, epoch, global position),
so a window is the same whatever rank, worker or thread draws it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import schemas
from loopy_model import temporal_segment as tsm

# motion.npy columns the A2L conditions read (schema 2.0)
MOTION_HEAD = schemas.MOTION_COLUMNS.index("head_var_norm")
MOTION_EXPRESSION = schemas.MOTION_COLUMNS.index("expression_var_norm")

REFERENCE_POLICIES = ("random", "first", "center", "outside_window")


@dataclass(frozen=True)
class WindowConfig:
    num_frames: int = 12
    windows_per_clip: int = 1
    motion_stride: int = tsm.STRIDE
    motion_expand_ratio: int = tsm.EXPAND_RATIO
    motion_segments: int = tsm.NUM_SEGMENTS
    motion_mode: str = "uniform"  # uniform | mean | random (paper Table 3)
    audio_context: int = 2  # frames each side
    reference: str = "random"
    latent_sampling: str = "sample"  # sample | mean
    latent_channels: int = 4
    latent_scale: float = 0.18215

    def __post_init__(self):
        if self.motion_mode not in tsm.MODES:
            raise ValueError(f"motion_mode must be one of {tsm.MODES}")
        if self.reference not in REFERENCE_POLICIES:
            raise ValueError(f"reference must be one of {REFERENCE_POLICIES}")
        if self.latent_sampling not in ("sample", "mean"):
            raise ValueError("latent_sampling must be 'sample' or 'mean'")
        if self.num_frames < 1 or self.windows_per_clip < 1 or self.audio_context < 0:
            raise ValueError("num_frames and windows_per_clip must be >= 1, audio_context >= 0")

    @property
    def num_motion_latents(self) -> int:
        return tsm.num_motion_latents(self.motion_stride, self.motion_segments)


def reference_frame(policy: str, n: int, t0: int, f: int, rng: np.random.Generator) -> int:
    if policy == "random":
        return int(rng.integers(0, n))
    if policy == "first":
        return 0
    if policy == "center":
        return n // 2
    outside = np.concatenate([np.arange(0, min(t0, n)), np.arange(min(t0 + f, n), n)])  # outside_window
    return int(rng.choice(outside)) if len(outside) else int(rng.integers(0, n))


def sample_latents(moments: np.ndarray, c: int, cfg: WindowConfig, rng: np.random.Generator) -> np.ndarray:
    """[n, c or 2c, H, W] fp16 moments -> [n, c, H, W] f32 latents, scaled.

    The noise comes from a torch generator seeded by ``rng``: torch's vectorised normal sampler
    is ~3x faster than numpy's, and this is the loader's biggest CPU cost per window.
    """
    moments = torch.from_numpy(moments)
    z = moments[:, :c].float()
    if cfg.latent_sampling == "sample" and moments.shape[1] == 2 * c:
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        z.addcmul_(moments[:, c:].float(), torch.randn(z.shape, generator=gen))
    return z.mul_(cfg.latent_scale).numpy()


def reduce_motion(z: np.ndarray, at, motion_frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One latent per TSM slot: its frame (uniform/random) or the mean of its sub-block (mean).

    Frames before the clip start (negative) do not exist: a slot without any is zero, masked.
    """
    if all(len(m) == 1 for m in motion_frames):  # uniform / random: a gather
        frames = np.concatenate(motion_frames)
        mask = frames >= 0
        out = np.zeros((len(frames),) + z.shape[1:], dtype=np.float32)
        out[mask] = z[at(frames[mask])]
        return out, mask
    out = np.zeros((len(motion_frames),) + z.shape[1:], dtype=np.float32)
    mask = np.zeros(len(motion_frames), dtype=bool)
    for i, frames in enumerate(motion_frames):
        real = frames[frames >= 0]
        if len(real):
            out[i], mask[i] = z[at(real)].mean(0), True
    return out, mask


def audio_window_rows(frames: np.ndarray, n: int, context: int = 2) -> np.ndarray:
    """[len(frames), 2*context+1] audio rows of each frame's window t-context..t+context, clamped to
    the clip's n frames (EMO/Loopy 3.3). Training windows and inference use this one definition."""
    return np.clip(np.asarray(frames)[:, None] + np.arange(-context, context + 1)[None, :], 0, n - 1)


def clip_windows(shard, key: str, rng: np.random.Generator, cfg: WindowConfig) -> tuple[list[dict], int]:
    """Draw ``cfg.windows_per_clip`` windows from sample ``key`` of an open shard.

    Returns (windows, bytes read from the shard).
    """
    latent, audio = shard.npy(key, "latent.npy"), shard.npy(key, "audio.npy")
    kps, motion = shard.npy(key, "kps.npy"), shard.npy(key, "motion.npy")
    n, c, f = len(latent), cfg.latent_channels, cfg.num_frames
    if latent.shape[1] not in (c, 2 * c):
        raise ValueError(f"{key}: latent.npy has {latent.shape[1]} channels, expected {c} or {2 * c}")
    if len(audio) != n or len(kps) != n:
        raise ValueError(f"{key}: latent/audio/kps have {n}/{len(audio)}/{len(kps)} frames")
    if len(motion.shape) != 2 or motion.shape[1] != len(schemas.MOTION_COLUMNS):
        raise ValueError(f"{motion.name}: shape {list(motion.shape)} is not the schema {schemas.SCHEMA_VERSION} layout "
                         f"[T-W+1, {len(schemas.MOTION_COLUMNS)}] {schemas.MOTION_COLUMNS} (a 2-column motion.npy "
                         "is schema 1.0: raw variances only); re-run the curation features stage for this shard")
    groups = tsm.temporal_segment_groups(cfg.motion_stride, cfg.motion_expand_ratio, cfg.motion_segments,
                                         "mean" if cfg.motion_mode == "mean" else "uniform")
    out = []
    for _ in range(cfg.windows_per_clip):
        t0 = int(rng.integers(0, max(n - f, 0) + 1))
        ref = reference_frame(cfg.reference, n, t0, f, rng)
        if cfg.motion_mode == "random":  # one random frame per sub-block, drawn per window
            groups = tsm.temporal_segment_groups(cfg.motion_stride, cfg.motion_expand_ratio,
                                                 cfg.motion_segments, "random", rng)
        target = t0 + np.arange(f)
        target_mask = target < n
        target = np.minimum(target, n - 1)
        motion_frames = [t0 + g for g in groups]
        # every latent row this window needs, read once and sampled once (same frame -> same z)
        rows = np.unique(np.concatenate([target, [ref]] + [m[m >= 0] for m in motion_frames]))
        z = sample_latents(latent.rows(rows), c, cfg, rng)
        at = lambda frames: np.searchsorted(rows, frames)  # noqa: E731 - frame -> row of z

        motion_z, motion_mask = reduce_motion(z, at, motion_frames)
        audio_rows = audio_window_rows(target, n, cfg.audio_context)
        audio_win = audio.rows(audio_rows.ravel()).reshape(audio_rows.shape + tuple(audio.shape[1:]))
        if len(motion):
            row = motion.rows([min(t0, len(motion) - 1)])[0]
            head_var, expr_var = np.float32(row[MOTION_HEAD]), np.float32(row[MOTION_EXPRESSION])
        else:  # clip shorter than one 12-frame window: no variances were computed
            head_var = expr_var = np.float32(np.nan)
        motion_ok = bool(np.isfinite(head_var) and np.isfinite(expr_var))  # NaN: too few valid keypoints
        out.append({
            "key": key,
            "frame_start": t0,
            "ref_index": ref,
            "num_clip_frames": n,
            "latents": z[at(target)],
            "target_mask": target_mask,
            "motion_latents": motion_z,
            "motion_mask": motion_mask,
            "ref_latent": z[at(ref)],
            "audio": audio_win,
            "kps": kps.rows(target).astype(np.float32),
            "head_motion_var": head_var if motion_ok else np.float32(0),
            "expression_var": expr_var if motion_ok else np.float32(0),
            "a2l_valid": motion_ok and bool(target_mask.all()),
        })
    return out, latent.bytes_read + audio.bytes_read + kps.bytes_read + motion.bytes_read
