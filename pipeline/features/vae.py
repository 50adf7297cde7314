"""SD 1.5 VAE latents: the posterior mean of every 512x512 frame, encoded in fp32.

Contract (schemas 2.0: ``latent.npy`` float16 [T,4,64,64]): the mean of the diagonal Gaussian
posterior q(z|x) of diffusers' ``AutoencoderKL.encode``, *unscaled*; the trainer multiplies by the
scaling factor 0.18215 (recorded in meta) itself. With ``store_std`` (config
``features.vae_store_std``) channels 4..7 hold the posterior std as well ([T,8,64,64]) and the
trainer can sample ``z = mean + std * eps`` as latent-diffusion training does (Rombach et al. 2022;
diffusers train_text_to_image.py: ``vae.encode(x).latent_dist.sample()``).

Why the mean only by default (definitions audit item 4): SD 1.5's posterior std is tiny next to
the mean, so the 4 std channels doubled the largest member for almost no information.
Why fp32: bf16 autocast moved the mean by a relative error far above fp16 storage rounding
(measured: docs/features.md, benchmarks/vae_precision.py); ``dtype`` float16/bfloat16 autocast
remains available on CUDA only, as an explicit choice.

Weights: ``full`` reads ``model_dir/sd-vae`` (a diffusers directory: config.json +
diffusion_pytorch_model.safetensors) or a single state-dict file with either diffusers key names or
the original LDM/CompVis ones (``encoder.down.0.block.0...``, e.g. vae-ft-mse-840000-ema-pruned);
``smoke`` builds a tiny randomly initialised AutoencoderKL with the same 8x downsampling.
Only safetensors, or torch.load(weights_only=True); never pickle.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pipeline.models.registry import FULL_MODELS, require_file, verified_file, verified_model_path

from .precision import tf32_mode

SCALING_FACTOR = 0.18215  # SD 1.x VAE config "scaling_factor"
LATENT_CHANNELS = 4
DOWNSAMPLE = 8

# vae/config.json of stable-diffusion-v1-5 (diffusers format), used when a single weights file is
# given without a config and to check key-name compatibility in tests.
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512, scaling_factor=SCALING_FACTOR,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

# The real architecture (4 levels -> 8x downsampling, 4 latent channels, mid-block attention),
# only narrower and one resnet per level: fast enough for CPU tests.
SMOKE_VAE_CONFIG = dict(SD15_VAE_CONFIG, block_out_channels=(4, 4, 4, 4), norm_num_groups=2, layers_per_block=1)
SMOKE_SEED = 0
SMOKE_ID = "smoke:tiny-autoencoderkl-seed0"
REGISTRY_VAE = "sd-vae"  # model_dir/sd-vae: the registry's files (pinned sha256)


def build_smoke_vae():
    from diffusers import AutoencoderKL

    # fork_rng: deterministic weights without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SMOKE_SEED)
        return AutoencoderKL(**SMOKE_VAE_CONFIG).eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = verified_file(path, "VAE weights file")  # its recorded sha256, before anything parses it
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # .ckpt/.pt/.bin: tensors only; weights_only refuses arbitrary pickled objects.
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def _is_ldm_layout(keys) -> bool:
    # original CompVis names: "encoder.down.0.block.0.norm1.weight" (optionally prefixed by
    # "first_stage_model." in a full SD checkpoint); diffusers: "encoder.down_blocks.0.resnets.0..."
    return any(re.search(r"(^|\.)encoder\.down\.\d+\.block\.", k) for k in keys)


def load_vae_file(path: str | Path, config: dict | None = None):
    """An AutoencoderKL from one weights file (diffusers or original LDM key names), strict."""
    from diffusers import AutoencoderKL

    path = Path(path)
    config = dict(SD15_VAE_CONFIG if config is None else config)
    sd = _read_state_dict(path)
    if _is_ldm_layout(sd):
        # diffusers' own LDM -> diffusers mapping (the one AutoencoderKL.from_single_file uses);
        # it also strips "first_stage_model." / "vae." prefixes of full SD checkpoints.
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        sd = convert_ldm_vae_checkpoint(sd, config)
    model = AutoencoderKL(**config)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: weights of another width/config
        raise ValueError(f"{path}: weights do not fit the VAE config: {str(e).splitlines()[1].strip()} ...") from None
    if missing or unexpected:
        raise ValueError(f"{path}: not an SD VAE state dict with the expected key names: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]})")
    return model.eval()


def load_vae_dir(path: str | Path):
    """``AutoencoderKL.from_pretrained`` on a local diffusers directory; refuses partial loads."""
    from diffusers import AutoencoderKL

    path = Path(path)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # recorded sha256s, before diffusers reads
        verified_file(require_file(path.parent, f"{path.name}/{name}", "sd-vae"), "sd-vae model file")
    model, info = AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise ValueError(f"{path}: weights do not match the config: {bad}")
    return model.eval()


def load_vae(profile: str, model_dir: str | Path | None = None, vae_model: str = REGISTRY_VAE):
    """(model, model_id) for a profile. ``full``: ``model_dir/sd-vae`` directory, or a single file
    ``model_dir/sd-vae.safetensors`` when no directory is there. Another ``vae_model`` (config
    ``features.vae_model``) names one's own VAE in ``model_dir`` (registered: its sha256 recorded), a
    diffusers directory or one weights file; its model id is ``local:<vae_model>``."""
    if profile == "smoke":
        return build_smoke_vae(), SMOKE_ID
    if profile != "full":
        raise ValueError(f"unknown profile {profile!r}")
    if vae_model != REGISTRY_VAE:
        path = require_file(model_dir, vae_model, "vae") if not (Path(model_dir or "") / vae_model).is_dir() \
            else Path(model_dir) / vae_model
        return (load_vae_dir(path) if path.is_dir() else load_vae_file(path)), f"local:{vae_model}"
    model_id = FULL_MODELS["sd-vae"].model_id
    single = None if model_dir is None else Path(model_dir) / "sd-vae.safetensors"
    if single is not None and single.is_file() and not single.with_suffix("").is_dir():
        return load_vae_file(single), model_id
    # FileNotFoundError naming the first missing file of the registry entry; UntrustedModelFile for a changed one
    return load_vae_dir(verified_model_path(model_dir, "sd-vae")), model_id


def autocast_context(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA (GroupNorm and softmax stay fp32 under autocast); fp32 elsewhere."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def frames_to_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1], the range the SD VAE was trained on."""
    return frames.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.inference_mode()
def encode_frames(vae, frames: np.ndarray, *, batch_size: int = 16, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, store_std: bool = False, tf32: bool = False) -> np.ndarray:
    """uint8 [T,H,W,3] -> float16 [T,4,H/8,W/8] posterior mean (``store_std``: [T,8,...], mean ++ std),
    ``batch_size`` frames at a time, computed in ``dtype`` (fp32 unless asked otherwise on CUDA);
    ``tf32``: float32 convolutions/matmuls on CUDA in TF32 (precision.py), else strict fp32.

    Frames travel to the device as uint8 (4x less transfer than float) and are converted there.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    device = torch.device(device)
    T, H, W, _ = frames.shape
    channels = 2 * LATENT_CHANNELS if store_std else LATENT_CHANNELS
    out = np.empty((T, channels, H // DOWNSAMPLE, W // DOWNSAMPLE), dtype=np.float16)
    for i in range(0, T, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch_size])).to(device, non_blocking=True)
        with autocast_context(device, dtype), tf32_mode(tf32):
            post = vae.encode(frames_to_input(x)).latent_dist
        z = torch.cat([post.mean, post.std], dim=1) if store_std else post.mean
        out[i:i + len(x)] = z.float().to(torch.float16).cpu().numpy()
    return out
