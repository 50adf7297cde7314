"""Everything a run needs before its first step: processes, device, data, model.

Launchers: a plain process (world 1), ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the
environment; NCCL on GPUs, gloo on CPU) or Ray Train (which has already created the process
group; ``ray.train.torch.get_device()`` names the device). Library code never chooses more than
that: the model is built on CPU and moved once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from loopy_model.data import LoaderConfig, StreamingLoader, StreamingWindowDataset, WindowConfig
from loopy_model.models import LoopyModel
from loopy_model.presets import preset

from .checkpoint import latest_checkpoint, resolve_model_dir, verified_model_dir
from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool  # we created it (torchrun) and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        owns = True
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
    return World(rank, size, local_rank, device, owns)


def _device(local_rank: int) -> torch.device:
    try:  # inside a Ray Train worker, Ray has assigned the GPU
        import ray.train
        import ray.train.torch

        if ray.train.get_context().get_world_size() and torch.cuda.is_available():
            return ray.train.torch.get_device()
    except Exception:  # not under Ray Train
        pass
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------------------- data
def window_config(cfg: TrainConfig) -> WindowConfig:
    """The loader's windows for the preset's clip shapes (checked against the model in check_layout)."""
    shapes = {**preset(cfg.preset)["model"], **cfg.model_overrides}
    return WindowConfig(num_frames=1 if cfg.stage == 1 else shapes["num_frames"],  # stage 1: one frame
                        windows_per_clip=cfg.windows_per_clip, motion_stride=shapes["motion_stride"],
                        motion_expand_ratio=shapes["motion_expand_ratio"], motion_segments=shapes["motion_segments"],
                        motion_mode=shapes.get("motion_mode", "uniform"))


def build_loader(cfg: TrainConfig, world: World) -> StreamingLoader:
    # one loader batch = one micro-batch: the clips of an optimiser step / grad_accum, over all ranks
    batch = (cfg.global_batch_size or world.size * cfg.grad_accum) // cfg.grad_accum
    dataset = StreamingWindowDataset(LoaderConfig(
        cfg.data, global_batch_size=batch, seed=cfg.seed, where=cfg.where, allow_smoke=cfg.allow_smoke,
        split=cfg.split, balance=cfg.balance, balance_temperature=cfg.balance_temperature,
        storage_options=cfg.storage_options, cache_dir=cfg.cache_dir, verify_sha256=cfg.verify_shards,
        windows=window_config(cfg)),
        rank=world.rank, world_size=world.size)
    return StreamingLoader(dataset, num_workers=cfg.num_workers, pin_memory=world.device.type == "cuda")


@dataclass(frozen=True)
class DataLayout:
    """What the shards hold, as the model must expect it (schemas/: latent.npy, audio.npy)."""
    latent_channels: int  # c (the loader samples z from mean+std when 2c are stored)
    latent_size: int
    audio_layers: int  # L (wav2vec2 hidden states incl. the CNN projection)
    audio_dim: int  # D


def data_layout(loader: StreamingLoader) -> DataLayout:
    ds = loader.dataset
    shard, key = ds.readable_sample()  # an unreadable shard is skipped here as in training
    latent, audio = shard.npy(key, "latent.npy").shape, shard.npy(key, "audio.npy").shape
    c = ds.cfg.windows.latent_channels
    if latent[1] not in (c, 2 * c) or latent[2] != latent[3]:
        raise ValueError(f"{ds.index.uri}: latent.npy of {key} is {list(latent)}; the model expects "
                         f"[T, {c} or {2 * c} (mean+std), H, H]")
    if len(audio) != 3:
        raise ValueError(f"{ds.index.uri}: audio.npy of {key} is {list(audio)}; expected [T, layers, dim]")
    return DataLayout(c, int(latent[2]), int(audio[1]), int(audio[2]))


def check_layout(model: LoopyModel, layout: DataLayout, where: str, windows: WindowConfig | None = None) -> None:
    mc = model.config
    wrong = []
    if windows is not None:
        clip = (mc.motion_stride, mc.motion_expand_ratio, mc.motion_segments, mc.motion_mode)
        loader = (windows.motion_stride, windows.motion_expand_ratio, windows.motion_segments, windows.motion_mode)
        if clip != loader or windows.num_frames not in (1, mc.num_frames):
            wrong.append(f"clip shapes: loader {windows.num_frames} frames, TSM {loader}; model {mc.num_frames} "
                         f"frames, TSM {clip} (choose the --preset the model was trained with)")
    if mc.unet["in_channels"] != layout.latent_channels:
        wrong.append(f"latent channels: data {layout.latent_channels}, model {mc.unet['in_channels']}")
    if (mc.audio_layers, mc.audio_dim) != (layout.audio_layers, layout.audio_dim):
        wrong.append(f"audio features: data {layout.audio_layers} layers x {layout.audio_dim}, "
                     f"model {mc.audio_layers} x {mc.audio_dim}")
    if wrong:
        raise ValueError(f"the dataset does not fit the model from {where}: " + "; ".join(wrong))


# ---------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, layout: DataLayout) -> tuple[LoopyModel, str]:
    """The model a run starts from, and where it came from (for the log)."""
    model, origin = _build_model(cfg, layout)
    check_layout(model, layout, origin, window_config(cfg))
    return model, origin


def _build_model(cfg: TrainConfig, layout: DataLayout) -> tuple[LoopyModel, str]:
    if cfg.resume and latest_checkpoint(cfg.out) is not None:
        path = latest_checkpoint(cfg.out) / "model"
        model = LoopyModel.from_pretrained(str(verified_model_dir(path)), low_cpu_mem_usage=False)
        check_layout(model, layout, str(path))
        return model, f"resumed from {path}"
    model_cfg = preset(cfg.preset)["model"]
    model_cfg.update(audio_layers=layout.audio_layers, audio_dim=layout.audio_dim, **cfg.model_overrides)
    if cfg.init is None:
        return LoopyModel(stage=cfg.stage, **model_cfg), f"random init ({cfg.preset} preset)"
    init_dir = resolve_model_dir(cfg.init)
    if init_dir is not None:  # a Loopy checkpoint (e.g. stage 1 for stage 2)
        model = LoopyModel.from_pretrained(str(verified_model_dir(init_dir)), low_cpu_mem_usage=False)
        check_layout(model, layout, str(init_dir))
        if model.config.stage == 1 and cfg.stage == 2:
            return model.to_stage2(), f"stage 1 {init_dir} + fresh stage-2 modules"
        if model.config.stage != cfg.stage:
            raise ValueError(f"{init_dir} is a stage-{model.config.stage} model; stage {cfg.stage} cannot start from it")
        return model, f"initialised from {init_dir}"
    from loopy_model.weights import empty_prompt_embedding, sd15_unet_state_dict  # SD 1.5 into both U-Nets

    model = LoopyModel(stage=1, **model_cfg)
    model.load_unet_weights(sd15_unet_state_dict(cfg.init))
    context = empty_prompt_embedding(cfg.init)  # SD's own unconditional context, when it ships CLIP
    if context is not None:
        if context.shape[1:] != model.text_context.shape[1:]:
            raise ValueError(f"{cfg.init}: CLIP's empty-prompt embedding is {list(context.shape[1:])}, the model's "
                             f"text context {list(model.text_context.shape[1:])} (text_context_tokens, cross_attention_dim)")
        model.text_context.data.copy_(context)
    if cfg.stage == 2:
        log.warning("stage 2 from SD 1.5 weights directly: the paper trains stage 1 first")
        model = model.to_stage2()
    return model, f"SD 1.5 U-Net weights from {Path(cfg.init)}"
