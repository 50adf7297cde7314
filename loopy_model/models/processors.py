"""Attention processors that fuse the ReferenceNet into the denoiser's spatial self-attention.

Paper 3.1: "During the spatial attention layer computation in the denoising U-Net, the key and
value features from corresponding positions in the reference net are concatenated with the
denoising U-Net's features along the token dimension." As in Moore-AnimateAnyone
(``src/models/mutual_self_attention.py``), what is concatenated is the *input* of the
ReferenceNet's ``attn1`` (its normalised hidden states); the denoiser's own ``to_k``/``to_v``
project it. Unlike Moore, this is done with processors installed by ``set_attn_processor`` and
a per-call context (``context.py``), the reference K/V are projected once per sample rather than
once per frame, and the 15% reference drop (paper 3.4) is a per-sample key mask, so every
parameter takes part in every step (DDP needs no ``find_unused_parameters``).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .context import LoopyContext


class LoopyAttnProcessor(AttnProcessor2_0):
    """Plain SDPA attention that accepts (and ignores) the ``loopy`` context.

    diffusers' ``Attention.forward`` warns on every call about kwargs its processor does not
    declare; every attention that receives ``cross_attention_kwargs`` gets this one or a subclass.
    """

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, loopy: LoopyContext | None = None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceWriteProcessor(LoopyAttnProcessor):
    """ReferenceNet ``attn1``: stores the reference rows' input, then attends as usual."""

    def __init__(self, layer_id: int):
        super().__init__()
        self.layer_id = layer_id

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 loopy: LoopyContext | None = None):
        if loopy is not None and loopy.capture and loopy.ref_rows:
            loopy.ref_bank[self.layer_id] = hidden_states[: loopy.ref_rows]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceReadProcessor(LoopyAttnProcessor):
    """Denoiser ``attn1``: self-attention over [own tokens; reference tokens of the same sample]."""

    def __init__(self, layer_id: int):
        super().__init__()
        self.layer_id = layer_id

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 loopy: LoopyContext | None = None):
        ref = loopy.ref_bank.get(self.layer_id) if loopy is not None else None
        if ref is None:  # no reference (e.g. the denoiser used alone): plain self-attention
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NotImplementedError("reference attention supports SD-style self-attention only")
        rows, tokens, _ = hidden_states.shape  # rows = B * F
        frames = loopy.num_frames
        q = attn.to_q(hidden_states)
        k = torch.cat([attn.to_k(hidden_states), attn.to_k(ref).repeat_interleave(frames, 0)], 1)
        v = torch.cat([attn.to_v(hidden_states), attn.to_v(ref).repeat_interleave(frames, 0)], 1)
        mask = None
        if loopy.ref_keep is not None and not bool(loopy.ref_keep.all()):
            # [rows, 1, 1, tokens + ref tokens]: own tokens always visible, reference per sample
            keep = loopy.ref_keep.to(hidden_states.device).repeat_interleave(frames)
            mask = torch.ones(rows, 1, 1, k.shape[1], dtype=torch.bool, device=hidden_states.device)
            mask[:, 0, 0, tokens:] = keep[:, None]
        heads, head_dim = attn.heads, q.shape[-1] // attn.heads
        q, k, v = (x.view(rows, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(rows, tokens, heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


# "<block>.attentions.<j>.transformer_blocks.<k>.attn1.processor": the spatial transformers' own
# self-attention, not the temporal/audio layers that blocks.py adds under the same transformer.
_SPATIAL_ATTN1 = re.compile(r"\.attentions\.\d+\.transformer_blocks\.\d+\.attn1\.processor$")


def spatial_self_attentions(unet) -> list[str]:
    """Processor names of the spatial transformers' ``attn1`` in module order (the layer ids)."""
    return [name for name in unet.attn_processors if _SPATIAL_ATTN1.search(name)]


def install_processors(unet, role: str) -> int:
    """Reference writers (``role="reference"``) or readers (``"denoiser"``) on every spatial
    ``attn1``; ``LoopyAttnProcessor`` everywhere else. Returns the number of reference layers."""
    ids = {name: i for i, name in enumerate(spatial_self_attentions(unet))}
    cls = ReferenceWriteProcessor if role == "reference" else ReferenceReadProcessor
    unet.set_attn_processor({name: cls(ids[name]) if name in ids else LoopyAttnProcessor()
                             for name in unet.attn_processors})
    return len(ids)
