"""The Loopy denoiser (arXiv 2409.02634, sections 3.1-3.4), device- and launcher-free.

    context.py     LoopyContext: what one forward passes between the two U-Nets
    processors.py  attention processors: reference write (ReferenceNet attn1) / read (denoiser attn1)
    temporal.py    inter-clip and intra-clip temporal layers (AnimateDiff parameter names)
    audio.py       audio projection (Hallo) and zero-initialised audio cross-attention
    a2l.py         audio-to-latents module
    blocks.py      LoopyTransformer2DModel: the stock spatial transformer + Loopy's layers after it
    loopy.py       LoopyModel (ModelMixin/ConfigMixin): builds both U-Nets from config, forward
"""
from .a2l import A2L_CONDITIONS, AudioToLatents
from .context import LoopyContext
from .loopy import LoopyModel, parameter_groups

__all__ = ["A2L_CONDITIONS", "AudioToLatents", "LoopyContext", "LoopyModel", "parameter_groups"]
