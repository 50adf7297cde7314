"""The training loop as a Ray Train ``TorchTrainer``: Ray starts one worker per GPU (or CPU
worker), creates the process group, and every worker runs ``train(cfg)``, the same loop torchrun
runs. Checkpoints go to ``cfg.out`` (a filesystem every worker and the driver see), as in any run:
Ray's own checkpoint upload is not used, so one resume rule serves all launchers."""
from __future__ import annotations

import dataclasses
import os

from .config import TrainConfig


def _worker(config: dict) -> None:
    from .loop import train

    return train(TrainConfig(**config))  # rank 0's summary becomes Result.return_value


def train_with_ray(cfg: TrainConfig, num_workers: int, use_gpu: bool, resources_per_worker: dict | None = None,
                   storage_path: str | None = None):
    """Run ``cfg`` on ``num_workers`` Ray Train workers (connects to RAY_ADDRESS or starts Ray)."""
    # workers resolve relative paths against their own working directory: make them absolute
    cfg = dataclasses.replace(cfg, out=os.path.abspath(cfg.out),
                              data=cfg.data if "://" in cfg.data else os.path.abspath(cfg.data))
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="loopy-train", storage_path=storage_path or f"{cfg.out}/ray"),
    )
    return trainer.fit()
