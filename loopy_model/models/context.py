"""What one Loopy forward passes from the ReferenceNet to the denoising U-Net.

A fresh ``LoopyContext`` is made for every forward and handed to both U-Nets through
``cross_attention_kwargs={"loopy": ctx}``: diffusers passes it unchanged to every transformer
block and attention processor, so no ``forward`` is replaced and nothing outlives the call (the
Moore-AnimateAnyone ``bank`` needs ``clear()`` after every step, and leaks when it is forgotten).

Batch layout: the ReferenceNet runs on ``[ref (B rows); motion frames (B*M rows)]``, the denoiser
on ``B*F`` rows, sample-major (frame f of sample b is row ``b*F + f``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoopyContext:
    batch_size: int  # B
    num_frames: int  # F, target frames per sample in the denoiser
    num_motion: int = 0  # M, motion-frame latents per sample in the ReferenceNet (0: none)
    # [B] bool: the reference is visible to the denoiser's self-attention (paper 3.4: dropped 15%).
    ref_keep: torch.Tensor | None = None
    # [B, M] bool: motion tokens visible to the inter-clip temporal attention (the loader's
    # history mask, and False for every slot of a sample whose reference is dropped, paper 3.4).
    motion_keep: torch.Tensor | None = None
    audio_tokens: torch.Tensor | None = None  # [B*F, T, D] projected audio for the audio cross-attention
    capture: bool = False  # ReferenceNet writers store only while True (not on checkpoint recompute)
    ref_rows: int = 0  # leading ReferenceNet rows that are reference frames (0: motion frames only)
    ref_bank: dict[int, torch.Tensor] = field(default_factory=dict)  # attn1 id -> [B, N, C] attn1 input
    motion_bank: dict[int, torch.Tensor] = field(default_factory=dict)  # block id -> [B*M, C, h, w]

    def tiled(self, ref_keep: torch.Tensor, motion_mask: torch.Tensor | None = None) -> "LoopyContext":
        """The same features for ``n = len(ref_keep) // batch_size`` copies of the batch (pass-major:
        row ``p * B + b``), e.g. the three guidance passes of inference batched into one forward.
        ``motion_mask`` [B, M] is the history mask (default: every slot that was visible)."""
        n = len(ref_keep) // self.batch_size
        ctx = LoopyContext(batch_size=len(ref_keep), num_frames=self.num_frames, num_motion=self.num_motion,
                           ref_keep=ref_keep.bool())
        ctx.ref_bank = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.ref_bank.items()}
        ctx.motion_bank = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.motion_bank.items()}
        if self.num_motion:
            base = motion_mask if motion_mask is not None else self.motion_keep
            ctx.motion_keep = base.bool().repeat(n, 1).to(ctx.ref_keep.device) & ctx.ref_keep[:, None]
        return ctx
