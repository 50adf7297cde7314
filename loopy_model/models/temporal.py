"""Inter-clip and intra-clip temporal layers (paper 3.2).

Both are AnimateDiff motion modules: diffusers' ``AnimateDiffTransformer3D`` (GroupNorm ->
proj_in -> BasicTransformerBlock with two temporal self-attentions and sinusoidal positions ->
proj_out, residual), so ``MotionAdapter`` / ``mm_sd_v15_v2`` weights load into either one by
name (``loopy_model/weights.py``). ``proj_out`` starts at zero, as AnimateDiff's does: a fresh
layer is the identity, so a fresh stage-2 model computes exactly the stage-1 function.

- intra-clip: temporal attention over the F current frames only (the stock module);
- inter-clip: the M motion-frame features (the ReferenceNet's output at the same block, from
  the temporal-segment-reduced motion latents) are concatenated with the F current frames along
  time, a learnable type embedding tells the two apart ("to distinguish the types of latents,
  we add learnable temporal embeddings"), attention runs over all M + F positions (20 + 12 = 32,
  AnimateDiff v2's positional table), and only the current frames' rows are written back.
"""
from __future__ import annotations

import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn


def temporal_layer_kwargs(channels: int, heads: int, max_frames: int, norm_groups: int) -> dict:
    """AnimateDiff v2 motion-module settings (diffusers MotionAdapter defaults) for one block."""
    return dict(num_attention_heads=heads, attention_head_dim=channels // heads, in_channels=channels,
                norm_num_groups=norm_groups, cross_attention_dim=None, activation_fn="geglu",
                attention_bias=False, double_self_attention=True, positional_embeddings="sinusoidal",
                num_positional_embeddings=max_frames)


def masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``norm`` over [B, C, T, H, W] with statistics from the kept time steps only.

    With everything kept this is ``norm(x)`` (AnimateDiff normalises over its whole sequence);
    a motion slot left out of attention (no history, or the reference dropped) must not shift the
    statistics the current frames are normalised with either, or what fills it would leak in.
    """
    if keep is None:
        return norm(x)
    b, c, t = x.shape[:3]
    g = norm.num_groups
    xf = x.float().view(b, g, c // g, t, -1)
    w = keep.to(xf.dtype).view(b, 1, 1, t, 1)
    count = w.sum(3, keepdim=True).clamp(min=1) * (c // g) * xf.shape[-1]
    mean = (xf * w).sum((2, 3, 4), keepdim=True) / count
    var = (((xf - mean) ** 2) * w).sum((2, 3, 4), keepdim=True) / count
    out = ((xf - mean) * torch.rsqrt(var + norm.eps)).view_as(x).to(x.dtype)
    return out * norm.weight.view(1, c, 1, 1, 1) + norm.bias.view(1, c, 1, 1, 1)


class IntraClipTemporalLayer(AnimateDiffTransformer3D):
    """Temporal self-attention over the current clip's frames; zero-initialised output."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)


class InterClipTemporalLayer(AnimateDiffTransformer3D):
    """Temporal self-attention over [motion frames; current frames]; updates the current rows."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        inner = self.proj_in.out_features
        self.type_embedding = nn.Parameter(torch.randn(2, inner) * 0.02)  # 0: motion frame, 1: current
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, motion_states: torch.Tensor, num_frames: int,
                motion_keep: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B*F, C, H, W], motion_states [B*M, C, H, W], motion_keep [B, M] bool
        (False: the slot is left out of attention). Returns [B*F, C, H, W]."""
        rows, c, h, w = hidden_states.shape
        b = rows // num_frames
        m = motion_states.shape[0] // b
        seq = torch.cat([motion_states.view(b, m, c, h, w), hidden_states.view(b, num_frames, c, h, w)], 1)
        keep = None
        if motion_keep is not None and not bool(motion_keep.all()):
            keep = torch.cat([motion_keep, motion_keep.new_ones(b, num_frames)], 1)  # [B, M+F]
        seq = masked_group_norm(self.norm, seq.permute(0, 2, 1, 3, 4), keep)
        seq = seq.permute(0, 3, 4, 2, 1).reshape(b * h * w, m + num_frames, c)
        seq = self.proj_in(seq)
        kind = torch.cat([seq.new_zeros(m, dtype=torch.long), seq.new_ones(num_frames, dtype=torch.long)])
        seq = seq + self.type_embedding[kind].to(seq.dtype)
        mask = None if keep is None else keep.repeat_interleave(h * w, 0)[:, None, :]  # [B*H*W, 1, M+F]
        for block in self.transformer_blocks:
            seq = block(seq, attention_mask=mask, encoder_attention_mask=mask)
        out = self.proj_out(seq[:, m:])  # only the current clip's rows leave the layer
        out = out.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(rows, c, h, w)
        return hidden_states + out
