"""Register the weights files tests build (random weights with the official key names, ONNX exports with
the official signatures) the way a user registers their own: the real ``register_local_files`` (what
``jobs/fetch_models.py --register`` runs) records their sha256 in a ``models.lock.json``, and the
loaders, which refuse any weights file without a recorded hash, accept them.

Files under a name the registry pins (det_10g.onnx, 1k3d68.onnx, w600k_r50.onnx,
sd-vae/diffusion_pytorch_model.safetensors) cannot be registered: random stand-ins get other names.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.models.registry import register_local_files


def register(path, root=None) -> Path:
    """Record ``path`` (a file, or every file below a directory) in ``root/models.lock.json``; ``root``
    defaults to the file's directory (a directory: itself). Returns ``path``."""
    path = Path(path).absolute()
    root = Path(root).absolute() if root is not None else (path if path.is_dir() else path.parent)
    register_local_files(root, path.relative_to(root).as_posix() if path != root else ".", log=lambda *_: None)
    return path
