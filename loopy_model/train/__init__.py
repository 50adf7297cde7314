"""The two-stage Loopy trainer (paper 3.4), applied from outside the model (torchtitan style).

    config.py      TrainConfig: every knob, the paper's values as defaults, named presets
    setup.py       distributed init (torchrun / Ray Train / single process), device, model build
    checkpoint.py  atomic checkpoints: model + EMA (safetensors), optimiser, scheduler, loader, RNG
    metrics.py     CSV + TensorBoard + progress bar
    loop.py        train(cfg): the loop (one code path for 1 process, torchrun and Ray Train)
    ray_launch.py  the same loop as a Ray Train TorchTrainer
"""
from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
