"""Audio-to-latents (paper 3.3, Figure 4).

"We maintain a set of learnable embeddings. For each input condition, we map it to a query
feature using a fully connected (FC) layer, while the learnable embeddings serve as key and value
features for attention computation to obtain a new feature based on the learnable embeddings.
These new features, referred to as motion latents, replace the input condition [...] are then
dimensionally transformed via an FC layer and added to the timestep embedding."

Conditions, per target frame: the audio embedding (the 5-frame window of all wav2vec2 layers),
the face landmarks (68 DWPose points, normalised to [-1, 1] with their scores), and the window's
head-motion and expression variances (the curation job's face-size-normalised values through
``loopy_model.conditions.motion_condition``, the same for
every frame of the window). Training draws one condition per sample with equal probability;
inference uses audio only. All four queries are computed every step and one is selected with a
one-hot weight, so every parameter takes part in every step (static DDP graph).

The final FC is the denoising U-Net's own ``class_embedding`` (diffusers
``class_embed_type="simple_projection"``: ``emb = emb + Linear(class_labels)``), zero-initialised
by the model, so a fresh module changes nothing.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

A2L_CONDITIONS = ("audio", "landmarks", "head_motion", "expression")


class AudioToLatents(nn.Module):
    def __init__(self, audio_dim: int, num_keypoints: int = 68, dim: int = 256, num_embeddings: int = 64,
                 heads: int = 4):
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_embeddings, dim) * dim ** -0.5)
        self.query = nn.ModuleDict({
            "audio": nn.Linear(audio_dim, dim),
            "landmarks": nn.Linear(num_keypoints * 3, dim),
            "head_motion": nn.Linear(1, dim),
            "expression": nn.Linear(1, dim),
        })
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, out_bias=True)

    def forward(self, condition: torch.Tensor, audio: torch.Tensor, keypoints: torch.Tensor | None = None,
                head_motion_var: torch.Tensor | None = None, expression_var: torch.Tensor | None = None
                ) -> torch.Tensor:
        """One motion latent per frame: [B*F, dim].

        condition [B] long (index into A2L_CONDITIONS), audio [B, F, window, L, D],
        keypoints [B, F, K, 3] normalised, variances [B] (motion_condition). Missing facial inputs are zeros.
        """
        b, f = audio.shape[:2]
        zeros = audio.new_zeros(b)
        keypoints = keypoints if keypoints is not None else audio.new_zeros(b, f, self.query["landmarks"].in_features // 3, 3)
        head = (head_motion_var if head_motion_var is not None else zeros).to(audio.dtype)
        expr = (expression_var if expression_var is not None else zeros).to(audio.dtype)
        inputs = {
            "audio": audio.flatten(2),
            "landmarks": keypoints.flatten(2).to(audio.dtype),
            "head_motion": head.view(b, 1, 1).expand(b, f, 1),
            "expression": expr.view(b, 1, 1).expand(b, f, 1),
        }
        choice = nn.functional.one_hot(condition.long(), len(A2L_CONDITIONS)).to(audio.dtype)  # [B, 4]
        query = sum(choice[:, i, None, None] * self.query[name](inputs[name])
                    for i, name in enumerate(A2L_CONDITIONS))  # [B, F, dim]
        kv = self.embeddings.to(query.dtype).expand(b * f, -1, -1)
        return self.attn(query.reshape(b * f, 1, -1), encoder_hidden_states=kv).squeeze(1)
