"""Optional learned no-reference image quality: CNNIQA as packaged by pyiqa, from a local file.

Kang, Ye, Li & Doermann, "Convolutional neural networks for no-reference image quality
assessment", CVPR 2014; pyiqa's (chaofengc/IQA-PyTorch) ``pyiqa/archs/cnniqa_arch.py`` version:
RGB input in [0, 1] (the paper's network on grey normalised patches, widened to 3 channels by
pyiqa), one 7x7 convolution with 50 kernels, global max and min pooling, two 800-unit ReLU
layers with dropout, one output (higher = better; pyiqa's ``cnniqa`` is trained on KonIQ-10k).
Attribute names are pyiqa's, so its published ``CNNIQA_koniq10k-*.pth`` (a ``torch.save`` of
``{"params": state_dict}``, which pyiqa reads with ``load_pretrained_network(..., 'params')``)
loads with ``strict=True``. We never download: the file must already be in the model directory
(``score.learned_iqa_model``), read with ``torch.load(weights_only=True)`` or safetensors.

Off by default (``score.learned_iqa``); when on, the crop stage scores every
``LEARNED_IQA_STRIDE``-th 512 crop frame and stores the mean as ``learned_iqa``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_ID = "pyiqa-cnniqa"
LEARNED_IQA_STRIDE = 25  # one frame per second of the 25 fps clip

# pyiqa cnniqa_arch.py: the official state dict's keys and shapes (ker_size 7, n_kers 50, 800, 800)
OFFICIAL_SHAPES = {"conv1.weight": (50, 3, 7, 7), "conv1.bias": (50,), "fc1.weight": (800, 100), "fc1.bias": (800,),
                   "fc2.weight": (800, 800), "fc2.bias": (800,), "fc3.weight": (1, 800), "fc3.bias": (1,)}


class CNNIQA(nn.Module):
    """pyiqa's CNNIQA, layer for layer (attribute names = state-dict keys)."""

    model_id = MODEL_ID

    def __init__(self, ker_size: int = 7, n_kers: int = 50, n1_nodes: int = 800, n2_nodes: int = 800):
        super().__init__()
        self.conv1 = nn.Conv2d(3, n_kers, ker_size)
        self.fc1 = nn.Linear(2 * n_kers, n1_nodes)
        self.fc2 = nn.Linear(n1_nodes, n2_nodes)
        self.fc3 = nn.Linear(n2_nodes, 1)
        self.dropout = nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, H, W] RGB in [0, 1] -> [N, 1] quality."""
        h = self.conv1(x)
        h1 = F.max_pool2d(h, (h.size(-2), h.size(-1)))
        h2 = -F.max_pool2d(-h, (h.size(-2), h.size(-1)))
        h = torch.cat((h1, h2), 1).squeeze(3).squeeze(2)  # max-min pooling
        h = F.relu(self.fc1(h))
        h = self.dropout(h)
        h = F.relu(self.fc2(h))
        return self.fc3(h)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: safetensors, or a torch file read with
    ``weights_only=True`` holding the state dict or ``{"params": state_dict}`` (pyiqa's layout).
    A ``module.`` prefix (DataParallel training) is removed, as pyiqa's ``clean_state_dict`` does."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"learned quality model weights not found: {path} (copy the file there; "
                                "the pipeline never downloads)")
    from pipeline.models.registry import verified_file

    path = verified_file(path, "learned quality model weights file")  # recorded sha256, before any parse
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file in the error
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "params" in sd and isinstance(sd["params"], dict):
        sd = sd["params"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or {{'params': state_dict}})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_cnniqa(path: str | Path) -> CNNIQA:
    """CNNIQA with the weights of a local file, strict: a missing, extra or misshapen key is an
    error naming the file."""
    sd = read_state_dict(path)
    model = CNNIQA()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: not pyiqa CNNIQA weights: {e}") from e
    return model.eval()


@torch.no_grad()
def score_frames(model: CNNIQA, frames: np.ndarray) -> np.ndarray:
    """Quality of each RGB uint8 frame [N, H, W, 3] (the whole image, as pyiqa scores it)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    device = next(model.parameters()).device
    return model(x.to(device)).squeeze(1).cpu().numpy().astype(np.float64)


def load_learned_iqa(model_dir: str | None, model_file: str) -> CNNIQA:
    """The crop stage's optional model: ``model_dir/model_file``, on the GPU when the actor has one."""
    if not model_dir:
        raise FileNotFoundError(f"score.learned_iqa needs model_dir holding {model_file} (copy it there; "
                                "the pipeline never downloads)")
    model = load_cnniqa(Path(model_dir) / model_file)
    if torch.cuda.is_available():
        model = model.cuda()
    return model
