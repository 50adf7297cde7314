"""Audio condition (paper 3.3): wav2vec2 features of all layers in +-2-frame windows, projected
to context tokens and injected by cross-attention after each spatial transformer.

``AudioProjModel`` is Hallo's (``hallo/models/audio_proj.py``: window x layers x dim -> 512 ->
512 -> 32 tokens x 768, LayerNorm), with Hallo's parameter names. The cross-attention is the
paper's "attended audio feature is added to the noisy latents feature obtained from
self-attention"; its output projection starts at zero (Hallo's audio blocks do not, so its stage
2 does not start from the stage-1 function).
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn


class AudioProjModel(nn.Module):
    def __init__(self, window: int, layers: int, channels: int, intermediate_dim: int = 512,
                 output_dim: int = 768, context_tokens: int = 32):
        super().__init__()
        self.context_tokens, self.output_dim = context_tokens, output_dim
        self.proj1 = nn.Linear(window * layers * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, F, window, layers, dim] -> [B*F, context_tokens, output_dim]."""
        x = audio.flatten(0, 1).flatten(1)
        x = torch.relu(self.proj2(torch.relu(self.proj1(x))))
        return self.norm(self.proj3(x).view(-1, self.context_tokens, self.output_dim))


class AudioCrossAttention(nn.Module):
    """Pre-norm cross-attention from the latents (queries) to the audio tokens (keys/values)."""

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(query_dim=channels, cross_attention_dim=context_dim, heads=heads,
                              dim_head=channels // heads, out_bias=True)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, hidden_states: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
        """hidden_states [B*F, C, H, W], audio_tokens [B*F, T, D] -> [B*F, C, H, W]."""
        rows, c, h, w = hidden_states.shape
        x = hidden_states.flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm(x), encoder_hidden_states=audio_tokens)
        return x.transpose(1, 2).reshape(rows, c, h, w)
