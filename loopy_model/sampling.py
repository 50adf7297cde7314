"""Audio-only sampling (paper 3.4 "Inference"): three-pass classifier-free guidance, DDIM, and
autoregressive clips whose motion frames are the latents already generated.

Guidance, as reconstructed in DESIGN.md from the paper's prose:
    e = e_noref + ref_cfg * (e_noaudio - e_noref) + audio_cfg * (e_all - e_noaudio)
with e_all all conditions, e_noaudio the audio features and A2L motion latents zeroed, e_noref
additionally the reference removed from self-attention (and, as in training's reference drop,
the motion frames from the inter-clip attention). audio_cfg = 5, ref_cfg = 3, DDIM 25 steps.
The three passes run as one batched forward; the ReferenceNet runs once per clip (the reference
tokens once per video), not once per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from loopy_model import temporal_segment as tsm
from loopy_model.data.windows import audio_window_rows
from loopy_model.models import LoopyModel

PASSES = ("all", "noaudio", "noref")


@dataclass(frozen=True)
class GuidanceConfig:
    audio_cfg: float = 5.0
    ref_cfg: float = 3.0
    steps: int = 25
    eta: float = 0.0  # DDIM (0) .. DDPM-like (1)


def combine_guidance(e_all: torch.Tensor, e_noaudio: torch.Tensor, e_noref: torch.Tensor,
                     audio_cfg: float, ref_cfg: float) -> torch.Tensor:
    return e_noref + ref_cfg * (e_noaudio - e_noref) + audio_cfg * (e_all - e_noaudio)


def pass_masks(batch: int, device) -> dict[str, torch.Tensor]:
    """ref_keep / audio_keep for the three passes stacked pass-major: [all; noaudio; noref]."""
    t, f = torch.ones(batch, dtype=torch.bool, device=device), torch.zeros(batch, dtype=torch.bool, device=device)
    return {"ref_keep": torch.cat([t, t, f]), "audio_keep": torch.cat([t, f, f])}


@torch.no_grad()
def sample_clip(model: LoopyModel, scheduler: DDIMScheduler, ctx, audio: torch.Tensor, noise: torch.Tensor,
                guidance: GuidanceConfig, generator: torch.Generator | None = None, progress: bool = False,
                motion_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise one clip: ``noise`` [B, F, c, H, W] -> latents, with ``ctx`` from
    ``model.reference_context`` (one copy; tiled here for the three passes)."""
    b = noise.shape[0]
    masks = pass_masks(b, noise.device)
    ctx3 = ctx.tiled(masks["ref_keep"], motion_mask)
    audio3 = audio.repeat(3, *([1] * (audio.dim() - 1)))
    scheduler.set_timesteps(guidance.steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="denoise", leave=False, disable=not progress):
        x_in = scheduler.scale_model_input(x, t).repeat(3, 1, 1, 1, 1)
        out = model.denoise(x_in, t.expand(3 * b).to(noise.device), ctx3, audio=audio3,
                            a2l_condition=torch.zeros(3 * b, dtype=torch.long, device=noise.device),
                            audio_keep=masks["audio_keep"])
        e = combine_guidance(*out.float().chunk(3), guidance.audio_cfg, guidance.ref_cfg)
        x = scheduler.step(e, t, x, eta=guidance.eta, generator=generator).prev_sample
    return x


def audio_windows(features: torch.Tensor, start: int, num_frames: int, context: int = 2) -> torch.Tensor:
    """[T, L, D] -> [num_frames, 2*context+1, L, D] for frames start.. (clamped, as in training)."""
    rows = audio_window_rows(np.arange(start, start + num_frames), len(features), context)
    return features[torch.from_numpy(rows).to(features.device)]


@torch.no_grad()
def generate_latents(model: LoopyModel, scheduler: DDIMScheduler, ref_latent: torch.Tensor, audio: torch.Tensor,
                     num_frames_out: int, guidance: GuidanceConfig, seed: int = 0, progress: bool = True
                     ) -> torch.Tensor:
    """Autoregressive generation: ref_latent [c, H, W] (scaled), audio [T, L, D] per-frame features
    -> latents [num_frames_out, c, H, W]. Clip k's motion frames are the temporal-segment reduction
    of every latent generated before it (up to 124 frames; the first clip has none, masked)."""
    cfg = model.config
    f = cfg.num_frames
    device = ref_latent.device
    generator = torch.Generator(device="cpu").manual_seed(seed)  # CPU noise: the same video on any device
    ref = ref_latent[None]
    base = model.reference_context(ref, f, motion_latents=None)  # reference tokens: once per video
    done: list[torch.Tensor] = []
    clips = range(0, num_frames_out, f)
    for start in tqdm(clips, desc="clips", disable=not progress):
        history = torch.cat(done)[None] if done else None
        if history is None:
            motion, mask = None, None
        else:
            motion, mask = tsm.apply_temporal_segment(history, stride=cfg.motion_stride,
                                                      expand_ratio=cfg.motion_expand_ratio,
                                                      num_segments=cfg.motion_segments, mode=cfg.motion_mode)
        ctx = model.reference_context(ref, f, motion_latents=motion, motion_mask=mask, reuse=base) \
            if cfg.stage == 2 else base
        noise = torch.randn((1, f) + tuple(ref_latent.shape), generator=generator).to(device, ref_latent.dtype)
        window = audio_windows(audio, start, f)[None].to(device, ref_latent.dtype)
        clip = sample_clip(model, scheduler, ctx, window, noise, guidance, generator, progress=False,
                           motion_mask=ctx.motion_keep)
        done.append(clip[0])
    return torch.cat(done)[:num_frames_out]
