"""TF32 on CUDA: which float32 the feature models really compute in.

PyTorch lets cuDNN run float32 convolutions in TF32 (10-bit mantissa) by default
(``torch.backends.cudnn.allow_tf32 = True``) while float32 matmuls stay strict; so a "float32"
VAE encode on a GPU is a TF32 encode unless asked otherwise. Measured on an NVIDIA H200 with SD
1.5's VAE (benchmarks/gpu_features.py, docs/benchmarks.md): TF32 runs the encoder 4.0x as fast
as strict fp32 (101.5 vs 25.6 frames/s at batch 16) and moves the posterior mean by at most 2.1%
of its standard deviation (fp16 autocast: 3.8%, bf16: 35%). The choice is the config's
(``features.tf32``), recorded in each sample's meta, and never inherited from a process default.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """cuDNN convolutions and CUDA matmuls in TF32 (``enabled``) or strict fp32 inside the block;
    the process's flags are restored after it. No effect on CPU computations."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
