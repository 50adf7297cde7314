"""Named model presets, in one place (torchtitan's flavours; diffusers' tiny test configs).

- ``tiny``: a few thousand parameters per U-Net, 16x16 latents, 4 target frames and 4 motion
  latents: what CI and the CPU tests run (a stage-2 step well under a second on 2 cores).
- ``paper``: SD 1.5's U-Net (both nets), 512x512 (64x64 latents), 12 target frames, 20 motion
  latents, wav2vec2-base all layers (13 x 768), Hallo's audio projection, AnimateDiff v2's
  temporal settings (8 heads, positional table of 32 = 20 + 12).

A preset gives the model config and the data shapes it is trained on; the audio layout is taken
from the dataset when a model is created (``train.build_model``) and checked when one is loaded.
"""
from __future__ import annotations

import copy

from loopy_model.weights import SD15_UNET_CONFIG

# SD 1.5's U-Net (runwayml/stable-diffusion-v1-5 unet/config.json), for both U-Nets.
SD15_UNET = dict(SD15_UNET_CONFIG)

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
)

PRESETS = {
    "tiny": {
        "model": dict(unet=TINY_UNET, text_context_tokens=4, audio_context_tokens=4, audio_context_dim=16,
                      audio_proj_hidden=32, audio_heads=2, temporal_heads=2, temporal_max_frames=16,
                      num_motion_latents=4, a2l_dim=16, a2l_embeddings=8, a2l_heads=2,
                      # 4 target frames; TSM s=2, r=2, 2 segments (6 preceding frames -> 4 latents)
                      num_frames=4, motion_stride=2, motion_expand_ratio=2, motion_segments=2),
        "data": dict(latent_size=16),
    },
    "paper": {
        "model": dict(unet=SD15_UNET, text_context_tokens=77, audio_context_tokens=32, audio_context_dim=768,
                      audio_proj_hidden=512, audio_heads=8, temporal_heads=8, temporal_max_frames=32,
                      num_motion_latents=20, a2l_dim=256, a2l_embeddings=64, a2l_heads=4,
                      num_frames=12, motion_stride=4, motion_expand_ratio=2, motion_segments=5),
        "data": dict(latent_size=64),
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
