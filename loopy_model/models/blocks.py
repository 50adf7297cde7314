"""The spatial transformer of both U-Nets, with Loopy's layers after it.

``LoopyTransformer2DModel`` *is* diffusers' ``Transformer2DModel`` (same parameters, same names,
so SD 1.5 weights load unchanged) and runs it first. Then, by role:

- ``reference`` (ReferenceNet): stores its output for the motion-frame rows in the context; the
  inter-clip layer of the denoiser block at the same position reads it (paper 3.2: motion frames
  "are processed frame-by-frame through the reference network for feature extraction. Within
  each residual block, the features obtained from the reference network are concatenated with
  the features from the denoising U-Net along the temporal dimension").
- ``denoiser`` (stage 2): audio cross-attention -> inter-clip temporal -> intra-clip temporal,
  the order of Hallo/EchoMimic (spatial -> audio -> temporal) with the paper's inter layer first
  ("The inter-clip temporal layer first handles the cross-clip temporal relationships").

The layers are built at construction (``LoopyModel.__init__``), so ``save_pretrained`` /
``from_pretrained`` round-trip them. With gradient checkpointing on, they are recomputed in the
backward pass too (non-reentrant ``torch.utils.checkpoint``, diffusers' default).
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput

from .audio import AudioCrossAttention
from .context import LoopyContext
from .temporal import InterClipTemporalLayer, IntraClipTemporalLayer, temporal_layer_kwargs


class LoopyTransformer2DModel(Transformer2DModel):
    role: str = "plain"  # "reference" | "denoiser"
    block_id: int = -1  # position among the U-Net's spatial transformers (same in both U-Nets)

    def add_loopy_layers(self, *, audio_context_dim: int, audio_heads: int, temporal_heads: int,
                         temporal_max_frames: int) -> None:
        """Stage-2 layers of a denoiser block (all zero-initialised on their output)."""
        channels = self.config.in_channels
        self.audio_attn = AudioCrossAttention(channels, audio_context_dim, audio_heads)
        kwargs = temporal_layer_kwargs(channels, temporal_heads, temporal_max_frames, self.config.norm_num_groups)
        self.inter_temporal = InterClipTemporalLayer(**kwargs)
        self.intra_temporal = IntraClipTemporalLayer(**kwargs)

    @property
    def has_loopy_layers(self) -> bool:
        return hasattr(self, "intra_temporal")

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                class_labels=None, cross_attention_kwargs=None, attention_mask=None,
                encoder_attention_mask=None, return_dict: bool = True):
        out = super().forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, class_labels,
                              cross_attention_kwargs, attention_mask, encoder_attention_mask, return_dict=False)[0]
        ctx: LoopyContext | None = (cross_attention_kwargs or {}).get("loopy")
        if ctx is not None and self.role == "reference" and ctx.capture and ctx.num_motion:
            ctx.motion_bank[self.block_id] = out[ctx.ref_rows:]
        elif ctx is not None and self.role == "denoiser" and self.has_loopy_layers:
            args = (out, ctx.audio_tokens, ctx.motion_bank.get(self.block_id), ctx.motion_keep, ctx.num_frames)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                out = self._gradient_checkpointing_func(self._loopy_layers, *args)
            else:
                out = self._loopy_layers(*args)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _loopy_layers(self, hidden_states, audio_tokens, motion_states, motion_keep, num_frames: int):
        if audio_tokens is not None:
            hidden_states = self.audio_attn(hidden_states, audio_tokens)
        if motion_states is not None:
            hidden_states = self.inter_temporal(hidden_states, motion_states, num_frames, motion_keep)
        return self.intra_temporal(hidden_states, num_frames=num_frames)
